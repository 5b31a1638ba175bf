"""Sampling speed of the prior: KV-cache decoding against full recomputation.

A prior of CIFAR-10 size (8 x 8 codes from a K = 512 tokenizer, 10 classes, the default
architecture of ``vqkit prior``) draws a batch of index maps, once with the KV cache (one
position's work per code) and once recomputing the whole prefix at every code (the
reference); both draw the same codes from the same seed. Speed in codes per second =
batch x 64 / wall time (median of the rounds); the weights are a fresh initialisation
(speed does not depend on them).

    python -m benchmarks.bench_prior --batch-sizes 1 16 --rounds 3

Writes benchmarks/results/prior_sampling/sampling_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from vqkit.prior import Prior, PriorConfig

MODULE = "benchmarks.bench_prior"


def build(device: torch.device) -> Prior:
    torch.manual_seed(0)
    cfg = PriorConfig(vocab_size=512, code_shape=[8, 8], num_classes=10)
    return Prior(cfg).to(device).eval()


def time_sampling(prior: Prior, batch: int, use_cache: bool, device: torch.device) -> float:
    """Seconds to draw ``batch`` index maps (classes in turn, default sampling)."""
    labels = torch.arange(batch, device=device) % 10
    g = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    prior.sample(batch, labels=labels, generator=g, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--out", default=str(common.out_dir("prior_sampling")))
    ap.add_argument("--note", help="free text stored in the results (e.g. machine load)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = common.run_meta(MODULE, args.note)
    prior = build(device)
    seq = prior.seq_len
    # warm-up (first-call allocations and kernel choices), and the equivalence check
    a = prior.sample(2, labels=1, generator=torch.Generator(device).manual_seed(1))
    b = prior.sample(2, labels=1, generator=torch.Generator(device).manual_seed(1),
                     use_cache=False)  # fmt: skip
    same = bool(torch.equal(a, b))
    rows = []
    for batch in args.batch_sizes:
        times: dict[str, list[float]] = {"cache": [], "recompute": []}
        for _ in range(args.rounds):  # interleaved: load drifts hit both alike
            times["cache"].append(time_sampling(prior, batch, True, device))
            times["recompute"].append(time_sampling(prior, batch, False, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "batch": batch,
            "cache_codes_per_s": batch * seq / med["cache"],
            "recompute_codes_per_s": batch * seq / med["recompute"],
            "speedup": med["recompute"] / med["cache"],
            "rounds_s": times,
        }
        rows.append(row)
        print(f"batch {batch}: cache {row['cache_codes_per_s']:.0f} codes/s, recompute "
              f"{row['recompute_codes_per_s']:.0f} codes/s, x{row['speedup']:.1f}")  # fmt: skip
    common.finish_meta(meta)
    meta.update(
        {
            "threads": torch.get_num_threads(),
            "device": str(device),
            "prior": {**prior.config.to_dict(), "params": prior.num_params()},
            "same_codes_cache_vs_recompute": same,
        }
    )
    c = prior.config
    lines = [
        f"# Prior sampling speed: KV cache vs full recomputation ({device.type})",
        "",
        *common.meta_lines(
            meta, machine_extra=f"; torch threads {meta['threads']}, device {device}"
        ),
        f"- prior: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, {c.pos} positions, "
        f"{prior.num_params() / 1e6:.2f} M parameters; 8 x 8 codes (T = {seq}), vocabulary "
        f"{c.vocab_size}, 10 classes",
        f"- median of {args.rounds} interleaved rounds after a warm-up; the cached and the "
        f"recomputed decoding drew the same codes from one seed: {same}",
        "",
        "| batch | KV cache (codes/s) | recompute (codes/s) | speed-up |",
        "|---:|---:|---:|---:|",
        *[
            f"| {r['batch']} | {r['cache_codes_per_s']:,.0f} | {r['recompute_codes_per_s']:,.0f} "
            f"| {r['speedup']:.1f}x |"
            for r in rows
        ],
    ]
    common.write_results(Path(args.out), f"sampling_{device.type}", {**meta, "rows": rows}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
