"""CPU benchmark of exact nearest-code search and VQ layers: vqkit versus baselines.

Every (shape, method) pair runs in its own child process under an address-space
cap (``RLIMIT_AS``), so a method that needs more memory than the cap fails with
an allocation error, reported as ``OOM``, instead of swapping or taking the
machine down. The parent collects one JSON line per child and writes

* ``<out-dir>/search_cpu.json``: every measurement plus run metadata, and
* ``<out-dir>/search_cpu.md``: one Markdown table per shape and a target check.

``<out-dir>`` defaults to ``benchmarks/results/search_cpu/`` (``search_cpu_quick/``
with ``--quick``). Usage, from the repository root::

    python -m benchmarks.bench_search --quick                 # smoke test, shape Q2
    python -m benchmarks.bench_search                         # all shapes, all methods
    python -m benchmarks.bench_search --shapes S2 --methods gemm_floor,vqkit_search \\
        --out-dir benchmarks/results/search_cpu_s2_subset

Timing and memory: ``benchmarks.common.measure``. One warm-up call, then up to
``--repeats`` timed calls (fewer when the calls are slow: the timed calls stop once
they have used ``--time-budget`` seconds). Median and min are reported. Memory is the
resident set size (RSS, from /proc/self/status): after the inputs and modules are
built, freed heap is returned to the OS (``malloc_trim``), VmRSS is read as the
baseline and the peak counter VmHWM is reset (``echo 5 > /proc/self/clear_refs``).
After the warm-up and timed calls, VmHWM - baseline is the peak extra memory of one
call (each call's outputs and gradients are dropped before the next one starts,
outside the timed region).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import MIB, SEARCH_QUICK_SHAPES, SEARCH_SHAPES, fmt

MODULE = "benchmarks.bench_search"
SHAPES = SEARCH_SHAPES
QUICK_SHAPES = SEARCH_QUICK_SHAPES
ALL_SHAPES = {**SHAPES, **QUICK_SHAPES}
# --quick: one tiny shape whose K spans two column tiles, every method, 2 repeats
QUICK_DEFAULT = ("Q2",)
VQKIT_METHODS = ("vqkit_search", "vqkit_fwd", "vqkit_fwd_bwd", "vqkit_ema_fwd")
SEED = 0
CHECK_ROWS = 256
TIE_RTOL = 1e-4


# --------------------------------------------------------------------------- methods
#
# Each method builds its module from the inputs X (N, D) and W (K, D) and returns a
# Case: ``run()`` is the timed call, ``cleanup()`` drops what a call left behind
# (gradients), untimed, and ``check()`` returns (indices of the first ``rows`` rows of
# X, the codebook they index) for the agreement check, or is None.


def _nothing() -> None:
    pass


class Case(NamedTuple):
    run: Callable[[], object]
    cleanup: Callable[[], object] = _nothing
    check: Callable[[], tuple] | None = None


def gemm_floor(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    # torch.empty does not touch the pages: the N x K output becomes resident
    # during the warm-up, so it is counted as this method's extra memory.
    y = torch.empty(x.shape[0], w.shape[0])
    return Case(lambda: torch.mm(x, w.t(), out=y))


def faiss_flat(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(w.numpy())
    xn = x.numpy()

    def check():
        _, idx = index.search(xn[:rows], 1)
        return torch.from_numpy(idx[:, 0]).long(), w

    return Case(lambda: index.search(xn, 1), check=check)


def vqkit_search(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    from vqkit import nearest_code

    return Case(lambda: nearest_code(x, w), check=lambda: (nearest_code(x[:rows], w)[0], w))


def _vqkit_layer(x: torch.Tensor, w: torch.Tensor):
    """VectorQuantizer(K, D, channels_last=True) with codebook W; the input as (1, N, D)."""
    from vqkit import VectorQuantizer

    vq = VectorQuantizer(w.shape[0], w.shape[1], channels_last=True)
    with torch.no_grad():
        vq.codebook.copy_(w)
    return vq, x.view(1, *x.shape)


@torch.no_grad()
def _layer_indices(vq, x3: torch.Tensor, rows: int):
    return vq(x3[:, :rows]).indices.reshape(-1), vq.codebook.detach()


def vqkit_fwd(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    vq, x3 = _vqkit_layer(x, w)
    return Case(torch.no_grad()(lambda: vq(x3)), check=lambda: _layer_indices(vq, x3, rows))


def vqkit_fwd_bwd(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    vq, x3 = _vqkit_layer(x, w)
    xg = x3.clone().requires_grad_(True)

    def run() -> None:
        out = vq(xg)
        (out.loss + out.quantized.sum()).backward()

    def cleanup() -> None:
        xg.grad = None
        vq.codebook.grad = None

    return Case(run, cleanup, lambda: _layer_indices(vq, x3, rows))


def vqkit_ema_fwd(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    from vqkit import VectorQuantizerEMA

    vq = VectorQuantizerEMA(w.shape[0], w.shape[1], channels_last=True)
    with torch.no_grad():
        vq.codebook.copy_(w)
        vq.reset_statistics()
    vq.train()
    x3 = x.view(1, *x.shape)

    def check():
        before = vq.codebook.clone()  # the output uses the pre-update codebook
        return vq(x3[:, :rows]).indices.reshape(-1), before

    return Case(lambda: vq(x3), check=check)


def _classic_forward(inp: torch.Tensor, emb: torch.Tensor, beta: float = 0.25):
    """The classic VQ-VAE layer: (loss, straight-through output, perplexity, codes)."""
    # Squared distances to every code, N x K, by the expanded formula.
    dist = inp.pow(2).sum(dim=1, keepdim=True) + emb.pow(2).sum(dim=1) - 2.0 * inp @ emb.t()
    codes = dist.argmin(dim=1)
    onehot = torch.zeros(inp.shape[0], emb.shape[0], device=inp.device)
    onehot.scatter_(1, codes.unsqueeze(1), 1.0)
    quant = onehot @ emb
    loss = F.mse_loss(quant, inp.detach()) + beta * F.mse_loss(quant.detach(), inp)
    quant = inp + (quant - inp).detach()
    probs = onehot.mean(dim=0)
    ppl = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    return loss, quant, ppl, codes


def classic(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    emb = torch.nn.Parameter(w.clone())
    xg = x.clone().requires_grad_(True)

    def run() -> None:
        loss, quant, _, _ = _classic_forward(xg, emb)
        (loss + quant.sum()).backward()

    def cleanup() -> None:
        xg.grad = None
        emb.grad = None

    def check():
        with torch.no_grad():
            return _classic_forward(x[:rows], emb)[3], emb.detach()

    return Case(run, cleanup, check)


def _vqp(x: torch.Tensor, w: torch.Tensor, rows: int, **options) -> Case:
    """vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K, **options) with
    codebook W, training mode, forward + backward on (1, N, D)."""
    from vector_quantize_pytorch import VectorQuantize

    k, d = w.shape
    vq = VectorQuantize(dim=d, codebook_size=k, **options)
    cb = vq._codebook
    with torch.no_grad():
        cb.embed.copy_(w.view_as(cb.embed))
        if hasattr(cb, "embed_avg"):
            cb.embed_avg.copy_(w.view_as(cb.embed_avg))
    vq.train()
    xg = x.view(1, *x.shape).clone().requires_grad_(True)

    def run() -> None:
        quant, _, loss = vq(xg)
        (loss.sum() + quant.sum()).backward()

    def cleanup() -> None:
        xg.grad = None
        vq.zero_grad(set_to_none=True)

    def check():
        before = cb.embed.detach().clone().view(k, d)
        with torch.no_grad():
            vq.eval()
            _, idx, _ = vq(x[:rows].view(1, -1, d))
            vq.train()
        return idx.reshape(-1), before

    return Case(run, cleanup, check)


def vqp_ema(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    return _vqp(x, w, rows)


def vqp_learnable(x: torch.Tensor, w: torch.Tensor, rows: int) -> Case:
    return _vqp(x, w, rows, learnable_codebook=True, ema_update=False)


class Method(NamedTuple):
    description: str
    build: Callable[[torch.Tensor, torch.Tensor, int], Case]


METHODS: dict[str, Method] = {
    "gemm_floor": Method(
        "torch.mm(X, W.T, out=Y) into a preallocated N x K output (no search)", gemm_floor
    ),
    "faiss_flat": Method(
        "faiss.IndexFlatL2(D) with W added (build not timed); search(X, 1)", faiss_flat
    ),
    "vqkit_search": Method(
        "vqkit.nearest_code(X, W), default 32 MiB scratch, torch backend", vqkit_search
    ),
    "vqkit_fwd": Method(
        "vqkit.VectorQuantizer(K, D, channels_last=True) forward on (1, N, D), no grad", vqkit_fwd
    ),
    "vqkit_fwd_bwd": Method(
        "same layer, forward + (loss + quantized.sum()).backward(), input requires grad",
        vqkit_fwd_bwd,
    ),
    "vqkit_ema_fwd": Method(
        "vqkit.VectorQuantizerEMA(K, D, channels_last=True), "
        "training-mode forward incl. EMA codebook update, input without "
        "grad",
        vqkit_ema_fwd,
    ),
    "classic": Method(
        "classic VQ-VAE formula: dense N x K distances, argmin, dense one-hot, "
        "one-hot @ codebook, losses, straight-through; forward + backward",
        classic,
    ),
    "vqp_ema": Method(
        "vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K) "
        "defaults (EMA), training mode, forward + backward on (1, N, D)",
        vqp_ema,
    ),
    "vqp_learnable": Method(
        "VectorQuantize(..., learnable_codebook=True, ema_update=False), "
        "forward + backward on (1, N, D)",
        vqp_learnable,
    ),
}


# --------------------------------------------------------------------------- child


def _agreement(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor) -> dict:
    """Compare indices with a float64 reference, allowing near-tie flips."""
    x64 = x.to(torch.float64)
    d64 = torch.cdist(x64, codebook.to(torch.float64)).pow(2)
    ref_val, ref_idx = d64.min(dim=1)
    got = d64.gather(1, idx.view(-1, 1).long()).squeeze(1)
    exact = idx.view(-1) == ref_idx
    near_tie = (got - ref_val) <= TIE_RTOL * ref_val.clamp(min=1e-12)
    return {
        "check_rows": int(idx.numel()),
        "exact_agree": float(exact.double().mean()),
        "agree_with_ties": float((exact | near_tie).double().mean()),
    }


def _worker(args: argparse.Namespace) -> int:
    common.cap_address_space(args.mem_cap_gib)
    shape, method = args.worker
    n, d, k, _ = ALL_SHAPES[shape]
    rows = min(CHECK_ROWS, n)
    rec: dict = {
        "shape": shape,
        "method": method,
        "N": n,
        "D": d,
        "K": k,
        "mem_cap_gib": args.mem_cap_gib,
    }
    try:
        rec.update(common.torch_setup(args.threads))
        x, w = common.search_inputs(n, d, k, SEED)
        case = METHODS[method].build(x, w, rows)
    except ImportError as e:
        return common.emit({**rec, "status": "skipped", "error": f"{type(e).__name__}: {e}"})
    except (RuntimeError, MemoryError) as e:
        return common.emit({**rec, **common.error_fields(e, "setup")})

    rec.update(common.measure(case.run, case.cleanup, args.repeats, args.time_budget))
    if rec["status"] == "ok" and case.check is not None and not args.no_check:
        try:
            idx, codebook = case.check()
            rec.update(_agreement(x[:rows], idx, codebook))
        except (RuntimeError, MemoryError) as e:
            rec["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return common.emit(rec)


# --------------------------------------------------------------------------- parent


def _run_worker(shape: str, method: str, args: argparse.Namespace) -> dict:
    cmd = common.child_cmd(MODULE, "--worker", shape, method, *common.child_args(args))
    n, d, k, _ = ALL_SHAPES[shape]
    base = {
        "shape": shape,
        "method": method,
        "N": n,
        "D": d,
        "K": k,
        "loadavg_before": os.getloadavg(),
    }
    return common.run_child(cmd, base, args.timeout)


def _summarise(records: list[dict], shapes: list[str]) -> tuple[dict, list[str]]:
    """Per-shape table rows and the target checks."""
    by = {(r["shape"], r["method"]): r for r in records}

    def med(shape: str, method: str) -> float | None:
        r = by.get((shape, method))
        return r.get("median_s") if r and r.get("status") == "ok" else None

    lines: list[str] = []
    for shape in shapes:
        n, d, k, note = ALL_SHAPES[shape]
        nk_mib = n * k * 4 / MIB
        floor, fa = med(shape, "gemm_floor"), med(shape, "faiss_flat")
        title = f"### {shape}: N={n}, D={d}, K={k}"
        title += f" - {note}" if note else ""
        rows = []
        for r in records:
            if r["shape"] != shape:
                continue
            ok = r.get("status") == "ok"
            m = r.get("median_s") if ok else None
            peak = r.get("peak_extra_mib") if ok else None
            agree = r.get("agree_with_ties")
            agree_s = (
                "–"
                if agree is None
                else (
                    f"{agree:.4f}"
                    + (f" (exact {r['exact_agree']:.4f})" if r.get("exact_agree") != agree else "")
                )
            )
            status = r.get("status", "?")
            if status == "OOM" and r.get("error"):
                m_alloc = re.search(r"allocate (\d+) bytes", r["error"])
                if m_alloc:
                    status += f" (failed allocating {int(m_alloc.group(1)) / 2**30:.1f} GiB)"
            elif status != "ok" and r.get("error"):
                status += f": {r['error'][:60]}"
            rows.append(
                [
                    r["method"],
                    fmt(m, ".3f"),
                    fmt(r.get("min_s") if ok else None, ".3f"),
                    fmt(m / floor if m and floor else None, ".2f"),
                    fmt(m / fa if m and fa else None, ".2f"),
                    fmt(peak, ",.0f"),
                    fmt(peak / nk_mib if peak is not None else None, ".4f"),
                    agree_s,
                    status,
                ]
            )
        lines += [title, "", f"One N x K fp32 matrix = {nk_mib:,.0f} MiB.", ""]
        lines += common.md_table(
            [
                "method",
                "median s",
                "min s",
                "ratio to gemm_floor",
                "ratio to faiss",
                "peak extra MiB",
                "fraction of N x K",
                "index agreement",
                "status",
            ],
            rows,
            "lrrrrrrrl",
        )
        lines.append("")

    # Targets (only for shapes that were run).
    checks: dict = {}
    targets: list[list[str]] = []

    def add(name: str, shape: str, value: str, met: bool | None) -> None:
        checks.setdefault(name, []).append({"shape": shape, "value": value, "met": met})
        targets.append([name, shape, value, "n/a" if met is None else ("yes" if met else "**no**")])

    for shape in shapes:
        fb, floor, fa = (
            med(shape, "vqkit_fwd_bwd"),
            med(shape, "gemm_floor"),
            med(shape, "faiss_flat"),
        )
        if fb and floor:
            add("vqkit_fwd_bwd <= 1.5x gemm_floor", shape, f"{fb / floor:.2f}x", fb / floor <= 1.5)
        if fb and fa:
            add("vqkit_fwd_bwd <= 1.3x faiss_flat", shape, f"{fb / fa:.2f}x", fb / fa <= 1.3)
    for shape in shapes:
        if shape not in ("S2", "S3", "S4", "S5"):
            continue
        n, _, k, _ = ALL_SHAPES[shape]
        nk_mib = n * k * 4 / MIB
        for m in VQKIT_METHODS:
            r = by.get((shape, m))
            if r and r.get("status") == "ok":
                frac = r["peak_extra_mib"] / nk_mib
                add(
                    f"{m} peak extra <= 1/8 N x K",
                    shape,
                    f"{r['peak_extra_mib']:,.0f} MiB = {frac:.4f}",
                    frac <= 0.125,
                )
            elif r:
                add(f"{m} peak extra <= 1/8 N x K", shape, r.get("status", "?"), False)
    if "S5" in shapes:
        v, c = by.get(("S5", "vqkit_fwd_bwd")), by.get(("S5", "classic"))
        if v and c:
            add(
                "S5: vqkit runs, classic OOMs",
                "S5",
                f"vqkit_fwd_bwd {v.get('status')}, classic {c.get('status')}",
                v.get("status") == "ok" and c.get("status") == "OOM",
            )
    if "S2" in shapes:
        fb = med("S2", "vqkit_fwd_bwd")
        for other in ("classic", "vqp_ema", "vqp_learnable"):
            r = by.get(("S2", other))
            if not (fb and r):
                continue
            if r.get("status") == "ok":
                sp = r["median_s"] / fb
                add(f">= 10x faster than {other}", "S2", f"{sp:.1f}x", sp >= 10)
            else:
                add(f">= 10x faster than {other}", "S2", f"{other}: {r.get('status')}", None)
    tl = ["### Targets", ""] + common.md_table(["target", "shape", "value", "met"], targets, "llll")
    return checks, lines + tl


def _write(out_dir: Path, stem: str, meta: dict, records: list[dict], shapes: list[str]) -> None:
    checks, lines = _summarise(records, shapes)
    st = meta["settings"]
    head = [
        "# Nearest-code search benchmark (CPU)",
        "",
        *common.meta_lines(meta, ("torch", "faiss-cpu", "vector-quantize-pytorch", "vqkit")),
        f"- settings: up to {st['repeats']} timed repeats after 1 warm-up "
        f"(timed calls stop after {st['time_budget_s']:.0f} s), "
        f"memory cap {st['mem_cap_gib']} GiB (RLIMIT_AS) per worker, "
        f"timeout {st['timeout_s']} s per worker",
        "- peak extra = VmHWM - VmRSS baseline (inputs and modules built), over the "
        "warm-up and timed calls; index agreement on the first "
        f"{st['check_rows']} rows vs float64 cdist, near ties "
        f"(gap <= {st['tie_rtol']:g} relative) allowed",
        "- vqkit layers take the channels-last flat input (1, N, D); vqp takes (1, N, D); "
        "faiss index build is not timed",
    ]
    if meta.get("note"):
        head.append(f"- note: {meta['note']}")
    common.write_results(
        out_dir, stem, {**meta, "results": records, "targets": checks}, head + [""] + lines
    )


def _parent(args: argparse.Namespace) -> int:
    shapes = common.parse_list(
        args.shapes, QUICK_DEFAULT if args.quick else SHAPES, ALL_SHAPES, "shape"
    )
    methods = common.parse_list(args.methods, METHODS, METHODS, "method")
    out_dir = Path(args.out_dir) if args.out_dir else common.out_dir("search_cpu", args.quick)
    stem = "search_cpu"
    meta = common.run_meta(MODULE, args.note)
    meta["settings"] = {
        **common.child_settings(args),
        "seed": SEED,
        "check_rows": CHECK_ROWS,
        "tie_rtol": TIE_RTOL,
    }
    meta["methods"] = {m: METHODS[m].description for m in methods}
    meta["shapes"] = {
        s: dict(zip(("N", "D", "K", "note"), ALL_SHAPES[s], strict=True)) for s in shapes
    }
    common.run_jobs(
        [(s, m) for s in shapes for m in methods],
        lambda shape, method: _run_worker(shape, method, args),
        lambda job: f"{job[0]} {job[1]:14s}",
        lambda records: _write(out_dir, stem, meta, records, shapes),
        meta,
    )
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}", file=sys.stderr)
    return 0


def rerender(json_path: str) -> None:
    """Rewrite the .md next to a results .json (after a change of the table format)."""
    path = Path(json_path)
    data = json.loads(path.read_text())
    records = data.pop("results")
    data.pop("targets", None)
    _write(path.parent, path.stem, data, records, list(data["shapes"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", help=f"comma list from {','.join(ALL_SHAPES)} (default S1..S5)")
    p.add_argument("--methods", help=f"comma list from {','.join(METHODS)} (default all)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: shape Q2, 2 repeats (add --shapes Q1,Q2 for both)",
    )
    p.add_argument(
        "--out-dir",
        help="results folder (default benchmarks/results/search_cpu, "
        "search_cpu_quick with --quick)",
    )
    common.add_child_args(p, time_budget=30.0)
    p.add_argument("--no-check", action="store_true", help="skip the float64 index check")
    p.add_argument("--rerender", metavar="JSON", help="rewrite the .md of a results .json")
    p.add_argument("--worker", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.default_repeats(args)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.rerender:
        rerender(args.rerender)
        return 0
    return _worker(args) if args.worker else _parent(args)


if __name__ == "__main__":
    sys.exit(main())
