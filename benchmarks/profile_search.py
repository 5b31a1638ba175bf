"""Profile vqkit's search and layer at one benchmark shape with torch.profiler.

    python benchmarks/profile_search.py --shape S2 [--what search|fwd_bwd] [--rows 20]

Prints the op table sorted by self CPU time (one warm-up call, then one profiled
call) and the time split of the search loop (GEMM tile vs. row-min vs. merge).
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_search import SHAPES
from torch.profiler import ProfilerActivity, profile


def _split(x: torch.Tensor, w: torch.Tensor) -> None:
    """Time the pieces of one pass of the tiled search by hand."""
    from vqkit import search

    n, k = x.shape[0], w.shape[0]
    tile_n, tile_k = search._tile_sizes(n, k, search.DEFAULT_SCRATCH_BYTES)
    sq = w.pow(2).sum(1)
    s = torch.empty(tile_n, tile_k)
    t_mm = t_min = 0.0
    for r0 in range(0, n, tile_n):
        xb = x[r0:r0 + tile_n]
        for c0 in range(0, k, tile_k):
            c1 = min(k, c0 + tile_k)
            st = s[: xb.shape[0], : c1 - c0] if c1 - c0 == tile_k else s.view(-1)[
                : xb.shape[0] * (c1 - c0)].view(xb.shape[0], c1 - c0)
            t0 = time.perf_counter()
            torch.addmm(sq[c0:c1], xb, w[c0:c1].t(), beta=1.0, alpha=-2.0, out=st)
            t1 = time.perf_counter()
            search._row_min(st)
            t2 = time.perf_counter()
            t_mm += t1 - t0
            t_min += t2 - t1
    print(f"tile {tile_n} x {tile_k}: addmm {t_mm:.3f} s, row-min {t_min:.3f} s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="S2")
    p.add_argument("--what", default="search", choices=["search", "fwd_bwd"])
    p.add_argument("--rows", type=int, default=15)
    a = p.parse_args()
    n, d, k, _ = SHAPES[a.shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(k, d, generator=g)
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
    print(f"{a.shape} {a.what}: {time.perf_counter() - t0:.3f} s (unprofiled)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    _split(x, w)


if __name__ == "__main__":
    main()
