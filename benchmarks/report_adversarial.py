"""The table of an MSE-only vs MSE + adversarial comparison (issue 20's evidence), made
from finished run directories of ``vqkit train``:

    python -m benchmarks.report_adversarial runs/cifar10-mse-k512 \\
        runs/cifar10-adversarial-k512 --names "MSE" "MSE + PatchGAN" --prefix cifar10_adversarial

(configs: ``benchmarks/configs/cifar10_mse_k512.json`` and
``cifar10_adversarial_k512.json``; both need ``vqkit features --data
../shared/data/cifar10-jpeg.tar.gz --out runs/cifar10-features`` first, for FD.)

Per run: the final evaluation (``eval.json``; ``--eval-dir D``: ``RUN/D/eval.json`` of
``vqkit eval --out RUN/D``; or ``--at-step N``'s periodic one) with
PSNR, SSIM, MS-SSIM and FD in the named feature space (as labelled in ``eval.json``;
vqkit's own feature space is not comparable with papers' rFID), codes used on the eval
split; from the training log: codes used per log window just before the discriminator
switches on, the fewest after it and at the end; ms/step (median over the log records)
before and after the switch, within the same run (a ratio that the machine's load
touches less than a comparison across runs); the discriminator's and the generator's
adversarial losses over the last log window. Writes
``benchmarks/results/<prefix>/<prefix>.{md,json}``, ``<prefix>_curves.png`` (codes used,
NMSE, d_loss / g_loss against step, the switch marked), each run's ``recon.png`` (the
same strided test images above their reconstructions) beside them, and
``<prefix>_side_by_side.png``: those pictures next to each other.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.report_cifar import code_budget, load

MODULE = "benchmarks.report_adversarial"


def _ms_per_step(records: list[dict], batch: int) -> float | None:
    ips = [r["images_per_s"] for r in records if r.get("images_per_s")]
    return 1000 * batch / statistics.median(ips) if ips else None


def summarise(run: Path, at_step: int | None = None, eval_dir: str | None = None) -> dict:
    """The row of one run (see the module doc)."""
    train, evals, final, cfg = load(run)
    if eval_dir is not None:  # ``vqkit eval CKPT --features ...``'s output, not the trainer's
        path = run / eval_dir / "eval.json"
        if not path.exists():
            raise SystemExit(f"{path}: not found (run vqkit eval with --out {path.parent})")
        final = json.loads(path.read_text())
        final.setdefault("step", train[-1]["step"] if train else None)
        result, source = final, f"vqkit eval ({eval_dir}), whole eval split"
    elif at_step is None:
        if not final:
            raise SystemExit(f"{run}: no eval.json (unfinished run?); use --at-step")
        result, source = final, "final, whole eval split"
    else:
        match = [r for r in evals if r["step"] == at_step]
        if not match:
            raise SystemExit(f"{run}: no evaluation logged at step {at_step}")
        result, source = match[-1], "periodic, strided eval subset"
    tc = cfg["train"]
    batch = cfg.get("global_batch_size", tc["batch_size"])
    on = tc.get("disc_weight", 0) > 0 and tc.get("disc_start", 0) < tc["steps"]
    start = tc.get("disc_start", 0) if on else None
    # a log record at step s covers the updates s - log_every + 1 .. s (1-based); the
    # discriminator's first update is update disc_start + 1
    before = [r for r in train if start is None or r["step"] <= start]
    after = [r for r in train if start is not None and r["step"] - tc["log_every"] >= start]
    labels = (final or {}).get("labels", {})
    fd_key = next((k for k in ("rfid", "fd_vqkit_features") if k in result), None)
    objective = tc.get("rec_loss", "l2").upper().replace("L2", "MSE")
    if tc.get("perceptual_weight", 0) > 0:
        objective += f" + {tc['perceptual_weight']:g} LPIPS"
    if on:
        objective += (
            f" + {tc['disc_weight']:g} x {tc['disc_loss']} PatchGAN "
            f"({tc['disc_layers']} layers, from step {start})"
        )
    last = train[-1] if train else {}
    return {
        "run": run.name,
        "objective": objective,
        "step": result.get("step", last.get("step")),
        "eval": f"{source} ({result['num_images']} images)",
        "psnr": result.get("psnr"),
        "ssim": result.get("ssim"),
        "ms_ssim": result.get("ms_ssim"),
        "fd": result.get(fd_key) if fd_key else None,
        "fd_label": (labels.get(fd_key) or {}).get("figure") if fd_key else None,
        "codes_used": result["codes_used"],
        "codes": code_budget(cfg["model"])[0],
        "train_codes_before": before[-1]["codes_used"] if before and start is not None else None,
        "train_codes_min_after": min((r["codes_used"] for r in after), default=None),
        "train_codes_end": last.get("codes_used"),
        "ms_per_step_before": _ms_per_step(before, batch),
        "ms_per_step_after": _ms_per_step(after, batch),
        "d_loss_last": last.get("d_loss"),
        "g_loss_last": last.get("g_loss"),
        "disc_start": start,
    }


def _curves(runs: list[tuple[str, Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, run in runs:
        train, _, _, cfg = load(run)
        steps = [r["step"] for r in train]
        (line,) = axes[0].plot(steps, [r["codes_used"] for r in train], label=name)
        axes[1].plot(steps, [r["recon_nmse"] for r in train], color=line.get_color(), label=name)
        for key, style in (("d_loss", "-"), ("g_loss", "--")):
            xs = [r["step"] for r in train if key in r]
            if xs:
                ys = [r[key] for r in train if key in r]
                axes[2].plot(xs, ys, style, color=line.get_color(), label=f"{name} {key}")
        tc = cfg["train"]
        if tc.get("disc_weight", 0) > 0:
            for ax in axes:
                ax.axvline(tc["disc_start"], color=line.get_color(), alpha=0.4, linestyle=":")
    axes[0].set_title("codes used per log window (train)")
    axes[1].set_title("reconstruction NMSE (train)")
    axes[1].set_yscale("log")
    axes[2].set_title("discriminator loss (-) and generator's adversarial loss (--)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _side_by_side(runs: list[tuple[str, Path]], path: Path) -> None:
    """The runs' ``recon.png`` (the same strided test images above their reconstructions
    in every run) next to each other under the runs' names: one picture to compare."""
    from PIL import Image, ImageDraw

    pics = [(name, Image.open(run / "recon.png").convert("RGB")) for name, run in runs
            if (run / "recon.png").exists()]  # fmt: skip
    if len(pics) < 2:
        return
    gap, title_h = 16, 18
    width = sum(p.width for _, p in pics) + gap * (len(pics) - 1)
    canvas = Image.new("RGB", (width, title_h + max(p.height for _, p in pics)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, pic in pics:
        canvas.paste(pic, (x, title_h))
        draw.text((x + 2, 3), name, fill="black")
        x += pic.width + gap
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--names", nargs="+")
    ap.add_argument("--prefix", default="cifar10_adversarial")
    ap.add_argument("--at-step", type=int, default=None)
    ap.add_argument(
        "--eval-dir",
        default=None,
        help="take each run's figures from RUN/EVAL_DIR/eval.json (vqkit eval --out), e.g. "
        "when the feature network was trained after the runs",
    )
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    names = args.names or [Path(r).name for r in args.runs]
    if len(names) != len(args.runs):
        ap.error("give one --names entry per run")
    out = Path(args.results) / args.prefix
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run, name in zip(map(Path, args.runs), names, strict=True):
        rows.append({"name": name, **summarise(run, args.at_step, args.eval_dir)})
        if (run / "recon.png").exists():  # the same strided test images in every run
            shutil.copy(run / "recon.png", out / f"{args.prefix}_{run.name}_recon.png")
    pairs = [(n, Path(r)) for n, r in zip(names, args.runs, strict=True)]
    _curves(pairs, out / f"{args.prefix}_curves.png")
    _side_by_side(pairs, out / f"{args.prefix}_side_by_side.png")

    f = common.fmt
    header = (
        "| run | objective | step | PSNR dB | SSIM | MS-SSIM | FD | codes used (eval) | "
        "codes/window before switch -> fewest after -> end | ms/step before -> after switch | "
        "d_loss / g_loss (last window) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = []
    for r in rows:
        codes = f"{r['codes_used']}" + (f" / {r['codes']}" if r["codes"] else "")
        trail = " -> ".join(
            "-" if r[k] is None else str(r[k])
            for k in ("train_codes_before", "train_codes_min_after", "train_codes_end")
        )
        ms = f"{f(r['ms_per_step_before'], '.0f')} -> {f(r['ms_per_step_after'], '.0f')}"
        gan = f"{f(r['d_loss_last'], '.3f')} / {f(r['g_loss_last'], '.3f')}"
        lines.append(
            f"| {r['name']} | {r['objective']} | {r['step']} | {f(r['psnr'], '.2f')} | "
            f"{f(r['ssim'], '.4f')} | {f(r['ms_ssim'], '.4f')} | {f(r['fd'], '.2f')} | "
            f"{codes} | {trail} | {ms} | {gan} |"
        )
    meta = common.run_meta(MODULE, argv=argv)
    mach = meta["machine"]
    fd_labels = sorted({r["fd_label"] for r in rows if r["fd_label"]})
    md = (
        f"Command: `{meta['command']}` (commit {meta['git_commit']}, {mach['cpu_model']}, "
        f"{mach['affinity_cpus']} cores).\n"
        f"Eval: {'; '.join(sorted({r['eval'] for r in rows}))}. FD: "
        f"{'; '.join(fd_labels) or 'none'} (vqkit's own feature space is not comparable "
        "with papers' rFID). ms/step: median over the log records before / after the "
        "discriminator switches on, within each run.\n\n" + header + "\n" + "\n".join(lines) + "\n"
    )
    common.write_results(out, args.prefix, {**meta, "rows": rows}, [md.rstrip("\n")])
    print(md)
    print(f"wrote {out / args.prefix}.{{md,json}} and {args.prefix}_curves.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
