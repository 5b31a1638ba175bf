"""Time per training step of the VQ-VAE with each quantizer configuration of the CIFAR-10
comparisons (docs/results.md), in one run: the same model, data and batch, only the
quantizer options differ, so the ratios isolate what each quantizer (and revival) costs.

    python benchmarks/bench_step.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --steps 40 --rounds 3

Each round times every configuration once (interleaved, so drifts in machine load hit
all of them alike); a step is ``Trainer.train_step`` plus, at its cadence, the revival
(``revive_every``), i.e. what the training loop pays. Writes
benchmarks/results/step_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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
}


def build(name: str, data: str, batch: int, tmp: str):
    import torch

    from vqkit.train import TrainConfig, Trainer

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
    every = trainer.config.revive_every
    t0 = time.perf_counter()
    for _ in range(steps):
        x, _ = trainer.loader.next_batch()
        trainer.train_step(x)
        trainer.step += 1
        if every and trainer.step % every == 0:
            trainer.revive(x)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="subset of configuration names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cpu"))
    args = ap.parse_args()
    import torch

    names = args.only or list(CONFIGS)
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
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    meta = {
        "command": "python benchmarks/bench_step.py "
        + f"--batch-size {args.batch_size} --steps {args.steps} --rounds {args.rounds}",
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
    }
    Path(args.out + ".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        "# Time per training step by quantizer (CPU)",
        "",
        f"- command: `{meta['command']}`",
        f"- commit {commit}, {meta['date']}; {meta['machine']}",
        f"- batch {args.batch_size}, {args.steps} timed steps per round after {args.warmup} "
        f"warm-up, {args.rounds} interleaved rounds; revival included at its cadence",
        "",
        f"| configuration | ms/step (median of rounds) | ratio to {names[0]} |",
        "|---|---:|---:|",
        *[f"| {r['config']} | {r['ms_per_step']:.1f} | {r['ratio_to_first']:.2f} |" for r in rows],
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
