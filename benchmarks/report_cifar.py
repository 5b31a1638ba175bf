"""Collect finished CIFAR-10 runs into docs/results.md material: a table of the final
test evaluation, one plot of NMSE / perplexity / usage over training for every run,
and each run's reconstruction grid.

    python benchmarks/report_cifar.py runs/cifar10-ema runs/cifar10-vq \
        --names "EMA" "plain VQ" --out docs/img --prefix cifar10
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def load(run: Path) -> tuple[list[dict], list[dict], dict, dict]:
    train, evals = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        (evals if rec.get("kind") == "eval" else train).append(rec)
    final = json.loads((run / "eval.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    return train, evals, final, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--names", nargs="+")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--prefix", default="cifar10")
    args = ap.parse_args()
    names = args.names or [Path(r).name for r in args.runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = []
    for run, name in zip(map(Path, args.runs), names, strict=True):
        train, evals, final, cfg = load(run)
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["recon_nmse"] for r in train], label=f"{name} (train)")
        if evals:
            axes[0].plot([r["step"] for r in evals], [r["nmse"] for r in evals], "o--",
                         label=f"{name} (eval)")
        axes[1].plot(steps, [r["perplexity"] for r in train], label=name)
        k = cfg["model"]["num_embeddings"]
        axes[2].plot(steps, [r["window_usage"] * k for r in train], label=name)
        sec_per_step = [r["images_per_s"] for r in train if "images_per_s" in r]
        ips = sorted(sec_per_step)[len(sec_per_step) // 2] if sec_per_step else float("nan")
        rows.append(
            f"| {name} | {final['step']} | {final['nmse']:.4f} | {final['mse']:.5f} | "
            f"{final['psnr']:.2f} | {final['batch_perplexity']:.1f} | "
            f"{final['perplexity']:.1f} | {final['codes_used']} / {k} | "
            f"{1000 * cfg['train']['batch_size'] / ips:.0f} |"
        )
        shutil.copy(run / "recon.png", out / f"{args.prefix}_{run.name}_recon.png")
        if (run / "usage.png").exists():
            shutil.copy(run / "usage.png", out / f"{args.prefix}_{run.name}_usage.png")
    axes[0].set_yscale("log")
    axes[0].set_title("reconstruction NMSE")
    axes[1].set_title("batch perplexity (train)")
    axes[2].set_title("codes used per log window (train)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{args.prefix}_curves.png", dpi=110)
    print("| run | steps | test NMSE | test MSE | test PSNR dB | batch perplexity (test, 32 "
          "images) | perplexity (whole test set) | codes used (test) | ms/step (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
