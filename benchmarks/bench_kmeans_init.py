"""Wall time of the k-means init (k-means++ seeding + Lloyd iterations, ``vqkit.codebook``)
at K = 4096, 16384, 65536 codes: the old defaults (16 vectors per code, 10 iterations)
against :func:`vqkit.codebook.kmeans_defaults` (unchanged up to 4096 codes), one thread.

    python -m benchmarks.bench_kmeans_init --codes 4096 16384 65536

The data are D = 64 vectors from a mixture of 4 K Gaussians (the time of a nearest-code
pass does not depend on the values). Above
``--truncate-above`` codes, the old init is TRUNCATED: the seeding and ONE Lloyd
iteration are timed on ``--sub-per-code`` vectors per code and the total extrapolated as
``(16 / sub) x (seeding + 10 x one iteration)`` (both are linear in the vectors; marked
``extrapolated``). Writes
``benchmarks/results/<--out-dir>/kmeans_init.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.bench_kmeans_init"
D = 64


def _data(n: int, k: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(4 * k, D, generator=g)
    pick = torch.randint(0, centres.shape[0], (n,), generator=g)
    return centres[pick] + torch.randn(n, D, generator=g)


def _time_init(x, k: int, iters: int, truncate: bool, sub: int) -> dict:
    import torch

    from vqkit.codebook import assignment_stats, kmeans, kmeans_plusplus
    from vqkit.search import nearest_code

    g = torch.Generator().manual_seed(1)
    if not truncate:
        t0 = time.perf_counter()
        kmeans(x, k, iters, generator=g)
        return {"seconds": time.perf_counter() - t0, "extrapolated": False}
    # seeding (rounds of distance updates) and a Lloyd iteration (one nearest-code pass
    # and the sums) both cost time linear in the vectors: timed on the first ``sub``
    # vectors and scaled
    xs, scale = x[:sub], x.shape[0] / sub
    t0 = time.perf_counter()
    centres = kmeans_plusplus(xs, k, generator=g)
    seed_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # one Lloyd iteration, as kmeans() does it
    idx, _ = nearest_code(xs, centres)
    counts, sums = assignment_stats(xs, idx, k)
    torch.where((counts > 0).unsqueeze(1), sums / counts.clamp(min=1.0).unsqueeze(1), centres)
    one = time.perf_counter() - t0
    return {
        "seconds": scale * (seed_s + iters * one),
        "measured_on": sub,
        "seeding_s": seed_s,
        "one_iteration_s": one,
        "extrapolated": True,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--codes", nargs="+", type=int, default=[4096, 16384, 65536])
    p.add_argument(
        "--truncate-above",
        type=int,
        default=4096,
        help="codes above which the old init is truncated (seeding and one iteration on "
        "4 vectors per code) and extrapolated",
    )
    p.add_argument(
        "--sub-per-code", type=int, default=4, help="vectors per code of a truncated old init"
    )
    p.add_argument("--out-dir", default=str(common.out_dir("kmeans_init")))
    p.add_argument("--note")
    args = p.parse_args(argv)
    import torch

    from vqkit.codebook import kmeans_defaults

    torch.set_num_threads(1)
    meta = common.run_meta(MODULE, args.note, argv)
    records, rows = [], []
    for k in args.codes:
        per_new, it_new = kmeans_defaults(k)
        x = _data(16 * k, k)
        old = _time_init(x, k, 10, truncate=k > args.truncate_above, sub=args.sub_per_code * k)
        new = _time_init(x[: per_new * k], k, it_new, truncate=False, sub=0)
        rec = {"codes": k, "old": {"per_code": 16, "iters": 10, **old}}
        rec["new"] = {"per_code": per_new, "iters": it_new, **new}
        records.append(rec)
        print(rec, flush=True)
        rows.append(
            [
                str(k),
                f"16 x {k} = {16 * k}, 10 it.",
                common.fmt(old["seconds"], ".1f")
                + (" (extrapolated)" if old["extrapolated"] else ""),
                f"{per_new} x {k} = {per_new * k}, {it_new} it.",
                common.fmt(new["seconds"], ".1f"),
                common.fmt(old["seconds"] / new["seconds"], ".1f"),
            ]
        )
    common.finish_meta(meta)
    md = [
        "# k-means init wall time (CPU, 1 thread)",
        "",
        *common.meta_lines(meta),
        "",
        *common.md_table(
            [
                "K",
                "old: vectors, iterations",
                "old s",
                "new: vectors, iterations",
                "new s",
                "old / new",
            ],
            rows,
        ),
    ]
    common.write_results(Path(args.out_dir), "kmeans_init", {"meta": meta, "records": records}, md)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
