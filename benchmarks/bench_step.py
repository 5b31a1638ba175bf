"""Time per training step of the VQ-VAE with each quantizer configuration of the CIFAR-10
comparisons (docs/results.md), in one run: the same model, data and batch, only the
quantizer options differ, so the ratios isolate what each quantizer (and revival) costs.

    python -m benchmarks.bench_step --data ../shared/data/cifar10-jpeg.tar.gz \\
        --steps 40 --rounds 3
    python -m benchmarks.bench_step --quick     # smoke test: built-in data, tiny run

Each round times every configuration once (interleaved, so drifts in machine load hit
all of them alike); a step is ``Trainer.train_step`` plus, at its cadence, the revival
(``revive_every``), i.e. what the training loop pays. Writes
``benchmarks/results/step_cpu/step_cpu.{json,md}`` (``step_cpu_quick/`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.bench_step"
STEM = "step_cpu"

CONFIGS: dict[str, dict] = {
    "ema K=512": {"quantizer": "ema"},
    "ema K=512 + init + revival": {"preset": "ema-healthy"},
    "vq K=512 (classic)": {"quantizer": "vq"},
    "vq K=512 + init + revival": {"preset": "vq-healthy"},
    "vq K=512 + init + revival + affine": {"preset": "vq-healthy", "affine_codebook": True},
    "ema K=4096": {"num_embeddings": 4096},
    "ema K=1024": {"num_embeddings": 1024},
    "ema K=1024 cosine d=8": {"num_embeddings": 1024, "use_cosine": True, "codebook_dim": 8},
    "rvq 4x6 (ema)": {"quantizer": "rvq", "num_quantizers": 4, "num_embeddings": 6},
    "fsq [8,5,5,5]": {"quantizer": "fsq", "levels": "8,5,5,5"},
    # 14 bits per position (K = 16384; docs/results.md, large codebooks on CIFAR-10);
    # random init: the k-means init runs once per run, not per step
    "ema K=16384 + revival": {"num_embeddings": 16384, "init": "random"},
    "simvq K=16384": {"quantizer": "simvq", "num_embeddings": 16384},
    "ibq K=16384 (entropy 0.05)": {"quantizer": "ibq", "num_embeddings": 16384, "init": "random"},
    "ibq K=16384 (no entropy)": {
        "quantizer": "ibq",
        "num_embeddings": 16384,
        "init": "random",
        "entropy_weight": 0.0,
    },
    "lfq 14 bits": {"quantizer": "lfq", "num_bits": 14},
    "bsq 14 bits": {"quantizer": "bsq", "num_bits": 14},
    "fsq [8,8,8,6,5]": {"quantizer": "fsq", "levels": "8,8,8,6,5"},
}


def build(name: str, data: str, batch: int, tmp: str):
    import torch

    from vqkit.training.tokenizer import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = TrainConfig.build(
        data=data,
        batch_size=batch,
        steps=0,
        out_dir=os.path.join(tmp, name.replace(" ", "_")),
        progress=False,
        **CONFIGS[name],
    )
    trainer = Trainer(cfg, overwrite=True)
    if cfg.init == "kmeans":
        trainer.init_codebook()
    return trainer


def time_steps(trainer, steps: int) -> float:
    """Seconds per step of ``steps`` steps of the training loop: ``train_step``, then the
    revival when due (as ``Trainer.fit`` runs it)."""
    import torch

    t0 = time.perf_counter()
    for _ in range(steps):
        x, _ = trainer.loader.next_batch()
        trainer.train_step(x)
        trainer.step += 1
        if trainer.health.due(trainer.step):
            with torch.no_grad():
                latents = trainer.model.encode_latents(x)
            trainer.health.revive(latents, trainer.step, trainer.optimizer)
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        default=str(common.CIFAR10_JPEG),
        help="dataset (default: the CIFAR-10 archive in ../shared/data)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="subset of configuration names")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: built-in data, batch 8, 2 timed steps after 1 warm-up, 1 round",
    )
    ap.add_argument(
        "--out-dir",
        help="results folder (default benchmarks/results/step_cpu, step_cpu_quick with --quick)",
    )
    ap.add_argument("--note", help="free text stored in the results (e.g. machine load)")
    args = ap.parse_args(argv)
    if args.quick:
        args.data, args.batch_size, args.steps, args.warmup, args.rounds = "builtin", 8, 2, 1, 1
    import torch

    names = args.only or list(CONFIGS)
    common.check_choices(names, CONFIGS, "configuration")
    out = Path(args.out_dir) if args.out_dir else common.out_dir(STEM, args.quick)
    meta = common.run_meta(MODULE, args.note, argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {n: build(n, args.data, args.batch_size, tmp) for n in names}
        for t in trainers.values():
            time_steps(t, args.warmup)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names:
                times[n].append(time_steps(trainers[n], args.steps))
            print(f"round {r + 1}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.0f} ms" for n in names))
    base = statistics.median(times[names[0]])
    rows = [
        {
            "config": n,
            "options": CONFIGS[n],
            "ms_per_step": 1e3 * statistics.median(times[n]),
            "rounds_ms": [1e3 * t for t in times[n]],
            "ratio_to_first": statistics.median(times[n]) / base,
        }
        for n in names
    ]
    common.finish_meta(meta)
    meta["settings"] = {
        "data": args.data,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
    }
    lines = [
        "# Time per training step by quantizer (CPU)",
        "",
        *common.meta_lines(meta, machine_extra=f", {torch.get_num_threads()} torch threads"),
        f"- batch {args.batch_size}, {args.steps} timed steps per round after {args.warmup} "
        f"warm-up, {args.rounds} interleaved rounds; revival included at its cadence; "
        f"data: {args.data}",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        *common.md_table(
            ["configuration", "ms/step (median of rounds)", f"ratio to {names[0]}"],
            [[r["config"], f"{r['ms_per_step']:.1f}", f"{r['ratio_to_first']:.2f}"] for r in rows],
        ),
    ]
    md = common.write_results(out, STEM, {**meta, "rows": rows}, lines)
    print("\n".join(lines))
    print(f"wrote {md} and {md.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
