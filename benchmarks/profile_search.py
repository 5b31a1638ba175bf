"""Profile vqkit's search and layer at one benchmark shape with torch.profiler.

From the repository root::

    python -m benchmarks.profile_search --shape S2 [--what search|fwd_bwd] [--rows 20]
    python -m benchmarks.profile_search --quick        # smoke test: shape Q2

Prints the op table sorted by self CPU time (one warm-up call, then one profiled
call) and the time split of the search loop (GEMM tile vs. row-min), and writes them to
``benchmarks/results/profile_search/<shape>_<what>.{md,json}``
(``profile_search_quick/`` with ``--quick``).

The split re-runs the tile loop by hand with vqkit's private tile helpers
(``vqkit.search._tile_sizes``, ``_row_min``); where those change it is skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common

MODULE = "benchmarks.profile_search"
SHAPES = {**common.SEARCH_SHAPES, **common.SEARCH_QUICK_SHAPES}


def _split(x: torch.Tensor, w: torch.Tensor) -> dict | None:
    """Time the pieces of one pass of the tiled search by hand."""
    from vqkit import search

    try:
        tile_sizes, row_min = search._tile_sizes, search._row_min
    except AttributeError as e:
        print(f"search split skipped: {e}")
        return None
    n, k = x.shape[0], w.shape[0]
    tile_n, tile_k = tile_sizes(n, k, search.DEFAULT_SCRATCH_BYTES)
    sq = w.pow(2).sum(1)
    s = torch.empty(tile_n, tile_k)
    t_mm = t_min = 0.0
    for r0 in range(0, n, tile_n):
        xb = x[r0 : r0 + tile_n]
        for c0 in range(0, k, tile_k):
            c1 = min(k, c0 + tile_k)
            st = (
                s[: xb.shape[0], : c1 - c0]
                if c1 - c0 == tile_k
                else s.view(-1)[: xb.shape[0] * (c1 - c0)].view(xb.shape[0], c1 - c0)
            )
            t0 = time.perf_counter()
            torch.addmm(sq[c0:c1], xb, w[c0:c1].t(), beta=1.0, alpha=-2.0, out=st)
            t1 = time.perf_counter()
            row_min(st)
            t2 = time.perf_counter()
            t_mm += t1 - t0
            t_min += t2 - t1
    print(f"tile {tile_n} x {tile_k}: addmm {t_mm:.3f} s, row-min {t_min:.3f} s")
    return {"tile_n": tile_n, "tile_k": tile_k, "addmm_s": t_mm, "row_min_s": t_min}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="S2", choices=list(SHAPES))
    p.add_argument("--what", default="search", choices=["search", "fwd_bwd"])
    p.add_argument("--rows", type=int, default=15, help="rows of the op table")
    p.add_argument("--quick", action="store_true", help="smoke test: shape Q2")
    p.add_argument(
        "--out-dir",
        help="results folder (default benchmarks/results/"
        "profile_search, profile_search_quick with --quick)",
    )
    p.add_argument("--note", help="free text stored in the results")
    a = p.parse_args(argv)
    if a.quick:
        a.shape = "Q2"
    out = Path(a.out_dir) if a.out_dir else common.out_dir("profile_search", a.quick)
    meta = common.run_meta(MODULE, a.note, argv)
    n, d, k, _ = SHAPES[a.shape]
    x, w = common.search_inputs(n, d, k, seed=0)
    from vqkit import VectorQuantizer, nearest_code

    if a.what == "search":

        def fn() -> None:
            nearest_code(x, w)
    else:
        vq = VectorQuantizer(k, d, channels_last=True)
        with torch.no_grad():
            vq.codebook.copy_(w)
        xg = x.view(1, n, d).clone().requires_grad_(True)

        def fn() -> None:
            out = vq(xg)
            (out.loss + out.quantized.sum()).backward()
            xg.grad = None
            vq.codebook.grad = None

    fn()
    t0 = time.perf_counter()
    fn()
    unprofiled = time.perf_counter() - t0
    print(f"{a.shape} {a.what}: {unprofiled:.3f} s (unprofiled)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows)
    print(table)
    split = _split(x, w)
    common.finish_meta(meta)
    meta["settings"] = {
        "shape": a.shape,
        "N": n,
        "D": d,
        "K": k,
        "what": a.what,
        "torch_threads": torch.get_num_threads(),
    }
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    data = {
        **meta,
        "unprofiled_s": unprofiled,
        "split": split,
        "ops": [
            {
                "name": e.key,
                "calls": e.count,
                "self_cpu_us": e.self_cpu_time_total,
                "cpu_total_us": e.cpu_time_total,
            }
            for e in ops[: a.rows]
        ],
    }
    lines = [
        f"# torch.profiler: vqkit {a.what} at {a.shape} (N={n}, D={d}, K={k})",
        "",
        *common.meta_lines(meta, machine_extra=f", {torch.get_num_threads()} torch threads"),
        *([f"- note: {a.note}"] if a.note else []),
        "",
        f"Unprofiled call: {unprofiled:.3f} s. One profiled call, ops by self CPU time:",
        "",
        "```",
        table.rstrip(),
        "```",
    ]
    if split:
        lines += [
            "",
            f"Search loop by hand, tile {split['tile_n']} x {split['tile_k']}: "
            f"addmm {split['addmm_s']:.3f} s, row-min {split['row_min_s']:.3f} s.",
        ]
    md = common.write_results(out, f"{a.shape}_{a.what}", data, lines)
    print(f"wrote {md} and {md.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
