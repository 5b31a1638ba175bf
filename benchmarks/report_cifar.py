"""Collect finished CIFAR-10 runs into docs/results.md material: one Markdown table
(and the same numbers as JSON) of each run's evaluation, one plot of NMSE / perplexity /
fraction of codes used over training for every run, and each run's reconstruction grid.

    python -m benchmarks.report_cifar runs/cifar10-ema runs/cifar10-vq \\
        --names "EMA" "plain VQ" --prefix cifar10
    python -m benchmarks.report_cifar --quick   # smoke test on two stored runs

Writes the table to ``benchmarks/results/<prefix>/<prefix>.{md,json}`` and the pictures
to ``docs/img/<prefix>_*.png``; ``--quick`` reports the stored runs
``benchmarks/results/cifar10-ema`` and ``cifar10-vq`` into
``benchmarks/results/report_cifar_quick/`` (pictures included).

By default the table holds the final evaluation on the whole eval split (``eval.json``);
``--at-step N`` takes the periodic evaluation logged at step N instead (a strided
subset of the eval split, the same for every run), so runs of different lengths can be
compared at the same step. Training figures (batch perplexity, NMSE) are means over the
last ``--window`` steps up to that point; ms/step is the median over the log records.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from benchmarks import common

MODULE = "benchmarks.report_cifar"


def load(run: Path) -> tuple[list[dict], list[dict], dict, dict]:
    train, evals = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        kind = rec.get("kind", "train")
        if kind in ("train", "eval"):  # not the 'resume' records of a resumed run
            (evals if kind == "eval" else train).append(rec)
    final = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    cfg = json.loads((run / "config.json").read_text())
    return train, evals, final, cfg


def code_budget(model: dict) -> tuple[int, float]:
    """(codes an index can take per position and stage, bits per latent position), asked
    of the quantizer the stored config builds (any registered kind)."""
    from vqkit.models.vqvae import VQVAEConfig

    config = VQVAEConfig.from_dict(model)
    quantizer = config.quantizer_options().build(config.embedding_dim)
    k, stages = quantizer.num_codes, quantizer.codes_per_position
    return k, stages * math.log2(k)


def describe(model: dict, train_cfg: dict) -> str:
    kind = model["quantizer"]
    parts = [kind]
    if kind == "rvq":
        stage = model.get(
            "stage", model.get("rvq_stage")
        )  # rvq_stage: the name older configs stored
        parts.append(f"{model['num_quantizers']}x{model['num_embeddings']} ({stage})")
    elif kind == "fsq":
        parts.append(f"[{model['levels']}]")
    elif kind in ("lfq", "bsq"):
        parts.append(f"{model['num_bits']} bits")
    else:
        parts.append(f"K={model['num_embeddings']}")
    if model.get("codebook_dim"):
        parts.append(f"d={model['codebook_dim']}")
    if model.get("use_cosine"):
        parts.append("cosine")
    if model.get("affine_codebook"):
        parts.append("affine")
    if train_cfg.get("codebook_lr_scale", 1.0) != 1.0:
        parts.append(f"codebook lr x{train_cfg['codebook_lr_scale']:g}")
    if train_cfg.get("init") == "kmeans":
        parts.append("k-means init")
    if train_cfg.get("revive_every"):
        parts.append(f"revive/{train_cfg['revive_every']} <{train_cfg['dead_threshold']}")
    return " ".join(parts)


def summarise(run: Path, at_step: int | None, window: int) -> dict:
    train, evals, final, cfg = load(run)
    if at_step is None:
        if not final:
            raise SystemExit(f"{run}: no eval.json (unfinished run?); use --at-step")
        result, source = final, "final, whole eval split"
        step = int(final["step"])
    else:
        match = [r for r in evals if r["step"] == at_step]
        if not match:
            raise SystemExit(f"{run}: no evaluation logged at step {at_step}")
        result, source, step = match[-1], "periodic, strided eval subset", at_step
    recent = [r for r in train if step - window < r["step"] <= step]
    ips = sorted(r["images_per_s"] for r in train if "images_per_s" in r)
    batch = cfg.get("global_batch_size", cfg["train"]["batch_size"])
    k, bits = code_budget(cfg["model"])
    return {
        "run": run.name,
        "config": describe(cfg["model"], cfg["train"]),
        "step": step,
        "eval": source,
        "eval_images": result["num_images"],
        "nmse": result["nmse"],
        "mse": result["mse"],
        "psnr": result["psnr"],
        "codes_used": result["codes_used"],
        "codes": k,
        "bits_per_position": bits,
        "eval_batch_perplexity": result.get("batch_perplexity"),
        "train_batch_perplexity": sum(r["perplexity"] for r in recent) / max(len(recent), 1),
        "train_nmse": sum(r["recon_nmse"] for r in recent) / max(len(recent), 1),
        "train_window_usage": recent[-1]["window_usage"] if recent else float("nan"),
        "ms_per_step": 1000 * batch / ips[len(ips) // 2] if ips else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories")
    ap.add_argument("--names", nargs="+")
    ap.add_argument(
        "--out", help="pictures go here (default docs/img; with --quick the results folder)"
    )
    ap.add_argument(
        "--results",
        default=str(common.RESULTS_DIR),
        help="table + JSON go into <results>/<prefix>/ (default benchmarks/results)",
    )
    ap.add_argument("--prefix", default="cifar10")
    ap.add_argument("--at-step", type=int, default=None)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: the stored runs cifar10-ema and cifar10-vq, table and "
        "pictures into benchmarks/results/report_cifar_quick/",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = args.runs or [
            str(common.RESULTS_DIR / r) for r in ("cifar10-ema", "cifar10-vq")
        ]
        args.prefix = "report_cifar_quick"
        args.out = args.out or str(Path(args.results) / args.prefix)
    if not args.runs:
        ap.error("give the run directories (or --quick)")
    names = args.names or [Path(r).name for r in args.runs]
    args.out = args.out or str(common.REPO_ROOT / "docs" / "img")
    out, results = Path(args.out), Path(args.results) / args.prefix
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    rows = []
    for run, name in zip(map(Path, args.runs), names, strict=True):
        train, evals, _, cfg = load(run)
        s = summarise(run, args.at_step, args.window)
        s["name"] = name
        rows.append(s)
        steps = [r["step"] for r in train]
        (line,) = axes[0].plot(steps, [r["recon_nmse"] for r in train], label=name)
        axes[1].plot(steps, [r["perplexity"] for r in train], color=line.get_color(), label=name)
        axes[2].plot(steps, [r["window_usage"] for r in train], color=line.get_color(), label=name)
        if (run / "recon.png").exists():
            shutil.copy(run / "recon.png", out / f"{args.prefix}_{run.name}_recon.png")
    axes[0].set_yscale("log")
    axes[0].set_title("reconstruction NMSE (train, per log window)")
    axes[1].set_yscale("log")
    axes[1].set_title("batch perplexity (train)")
    axes[2].set_title("fraction of codes used per log window (train)")
    axes[2].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"{args.prefix}_curves.png", dpi=110)

    header = (
        "| run | config | step | eval NMSE | PSNR dB | codes used (eval) | bits/position | "
        "train batch perplexity | train NMSE | codes used per 100 steps (train) | ms/step |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['name']} | {r['config']} | {r['step']} | {r['nmse']:.4f} | {r['psnr']:.2f} | "
        f"{r['codes_used']} / {r['codes']} | {r['bits_per_position']:.1f} | "
        f"{r['train_batch_perplexity']:.1f} | {r['train_nmse']:.4f} | "
        f"{100 * r['train_window_usage']:.0f} % | {r['ms_per_step']:.0f} |"
        for r in rows
    ]
    meta = common.run_meta(MODULE, argv=argv)
    mach = meta["machine"]
    evals = sorted({f"{r['eval']} ({r['eval_images']} images)" for r in rows})
    md = (
        f"Command: `{meta['command']}` (commit {meta['git_commit']}, {mach['cpu_model']}, "
        f"{mach['affinity_cpus']} cores).\n"
        f"Eval: {'; '.join(evals)}. Training figures: mean over the last {args.window} "
        "steps.\n\n" + header + "\n" + "\n".join(lines) + "\n"
    )
    common.write_results(results, args.prefix, {**meta, "rows": rows}, [md.rstrip("\n")])
    print(md)
    print(
        f"wrote {results / args.prefix}.{{md,json}} and {out}/{args.prefix}_*.png", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
