"""Multi-scale against single-scale tokenizers (issue 33's evidence): a table and curves
made from finished ``vqkit train`` run directories.

    python -m benchmarks.report_multiscale runs/cifar10-mse-k512 runs/ms-deficit \\
        --names "single-scale EMA" "multi-scale" --eval-dir eval-features \\
        --curves runs/cifar10-multiscale-k512-pooled-revival runs/ms-deficit \\
        --curve-names "pooled revival" "per-scale revival" \\
        --out benchmarks/results/multiscale_cifar10

Per run, the final evaluation over the whole test split (``RUN/eval.json``, or with
``--eval-dir D`` the ``RUN/D/eval.json`` that ``vqkit eval RUN --out RUN/D --features
...`` wrote): PSNR, SSIM (pytorch-msssim's Gaussian window and scikit-image's uniform
one), FD / KID in the feature space named there (vqkit's own CIFAR-10 network is **not
comparable with papers' rFID**), bits per pixel, codes used pooled and, for a
multi-scale tokenizer, per scale (``code_groups``) against the issue's target (at least
90% of K at every scale). The run's raw ``config.json``, ``eval.json`` and
``metrics.jsonl`` are copied beside the table (``runs/NAME/``), so the table is made from
committed files. ``--curves RUN ...``: codes used per 100-step training window at each
scale against the step (multi-scale runs), one panel per run, into ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks import common
from benchmarks.report_cifar import load

MODULE = "benchmarks.report_multiscale"
TARGET = 0.9  # the share of K used at every scale


def row(run: Path, name: str, eval_dir: str | None) -> dict:
    """One run's figures (see the module docstring)."""
    train, _, final, cfg = load(run)
    if eval_dir:
        path = run / eval_dir / "eval.json"
        if not path.exists():
            raise SystemExit(f"{path}: not found (vqkit eval {run} --out {path.parent})")
        final = json.loads(path.read_text())
    if not final:
        raise SystemExit(f"{run}: no eval.json (unfinished run?)")
    model = cfg["model"]
    k = int(model["num_embeddings"])
    groups = final.get("code_groups") or {}
    fd_key = next((k for k in final if k.startswith("fd_") and k.count("_kid") == 0), None)
    return {
        "name": name,
        "run": str(run),
        "quantizer": model["quantizer"],
        "scales": model.get("scales") if model["quantizer"] == "multiscale" else None,
        "K": k,
        "steps": train[-1]["step"] if train else None,
        "num_images": final.get("num_images"),
        "psnr": final.get("psnr"),
        "ssim": final.get("ssim"),
        "ssim_skimage": final.get("ssim_skimage"),
        "fd_key": fd_key,
        "fd": final.get(fd_key) if fd_key else None,
        "kid": final.get(f"{fd_key}_kid") if fd_key else None,
        "bits_per_pixel": final.get("bits_per_pixel"),
        "codes_used": final.get("codes_used"),
        "per_scale_codes_used": {g: v["codes_used"] for g, v in groups.items()},
        "per_scale_perplexity": {g: v["perplexity"] for g, v in groups.items()},
        "per_scale_target_met": {g: v["codes_used"] >= TARGET * k for g, v in groups.items()}
        if groups
        else None,
        "images_per_s_median": _median([r.get("images_per_s") for r in train]),
    }


def _median(values: list) -> float | None:
    vals = sorted(v for v in values if v)
    return vals[len(vals) // 2] if vals else None


def copy_raw(run: Path, eval_dir: str | None, dest: Path) -> None:
    """The files the table is made from, beside it."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "eval.json", "metrics.jsonl", "progressive.png", "recon.png"):
        if (run / name).exists():
            shutil.copy2(run / name, dest / name)
    if eval_dir and (run / eval_dir / "eval.json").exists():
        shutil.copy2(run / eval_dir / "eval.json", dest / f"{eval_dir}.json")
        if (run / eval_dir / "progressive.png").exists():
            shutil.copy2(run / eval_dir / "progressive.png", dest / "progressive.png")


def curves(runs: list[Path], names: list[str], out: Path) -> None:
    """Codes used per training window at each scale, one panel per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run, name in zip(axes[0], runs, names, strict=True):
        train, _, _, cfg = load(run)
        k = int(cfg["model"]["num_embeddings"])
        groups = list(train[-1].get("code_groups", {})) if train else []
        for g in groups:
            pts = [(r["step"], r["code_groups"][g]["codes_used"]) for r in train]
            ax.plot(*zip(*pts, strict=True), label=g)
        ax.axhline(TARGET * k, color="k", ls="--", lw=0.8, label=f"{TARGET:.0%} of K")
        ax.set(title=name, xlabel="step", ylabel="codes used per 100-step window", ylim=(0, k))
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--names", nargs="+")
    ap.add_argument("--eval-dir", help="RUN/EVAL_DIR/eval.json instead of RUN/eval.json")
    ap.add_argument("--curves", nargs="*", type=Path, default=[])
    ap.add_argument("--curve-names", nargs="*")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note")
    args = ap.parse_args()
    names = args.names or [r.name for r in args.runs]
    meta = common.run_meta(MODULE, args.note)
    rows = [row(r, n, args.eval_dir) for r, n in zip(args.runs, names, strict=True)]
    for r in {*args.runs, *args.curves}:
        copy_raw(r, args.eval_dir if r in args.runs else None, args.out / "runs" / r.name)
    if args.curves:
        curves(
            args.curves, args.curve_names or [r.name for r in args.curves], args.out / "curves.png"
        )
    common.finish_meta(meta)
    scale_names = sorted({g for r in rows for g in r["per_scale_codes_used"]}, key=_side)
    md = [
        "# Multi-scale against single-scale tokenizers: the whole test split",
        "",
        *common.meta_lines(meta),
        "- FD / KID in vqkit's own CIFAR-10 feature space (`vqkit features`): **not "
        "comparable with papers' rFID**; SSIM: pytorch-msssim's Gaussian window (skimage's "
        "uniform window in the JSON)",
        "",
        *common.md_table(
            [
                "run",
                "quantizer",
                "K",
                "steps",
                "PSNR dB",
                "SSIM",
                "FD",
                "KID",
                "bits/pixel",
                "codes used",
            ],  # fmt: skip
            [
                (
                    r["name"],
                    r["quantizer"] + (f" {r['scales']}" if r["scales"] else ""),
                    r["K"],
                    r["steps"],
                    common.fmt(r["psnr"], ".2f"),
                    common.fmt(r["ssim"], ".4f"),
                    common.fmt(r["fd"], ".2f"),
                    common.fmt(r["kid"], ".3f"),
                    common.fmt(r["bits_per_pixel"], ".3f"),
                    r["codes_used"],
                )  # fmt: skip
                for r in rows
            ],
        ),
    ]
    if scale_names:
        md += [
            "",
            f"Codes used per scale on the test split (target: at least {TARGET:.0%} of K):",
            "",
            *common.md_table(
                ["run", *scale_names],
                [
                    (r["name"], *[_cell(r, g) for g in scale_names])
                    for r in rows
                    if r["per_scale_codes_used"]
                ],
            ),
        ]
    data = {"meta": meta, "rows": rows}
    print(common.write_results(args.out, "multiscale", data, md))


def _side(name: str) -> int:
    return int(name.split("x")[0])


def _cell(r: dict, g: str) -> str:
    used = r["per_scale_codes_used"].get(g)
    if used is None:
        return "–"
    return f"{used} ({100 * used / r['K']:.0f}%)"


if __name__ == "__main__":
    main()
