"""How far apart the two SSIM conventions of ``vqkit eval`` are on the same images
(docs/evaluation.md): pytorch-msssim's Gaussian window (``ssim``) against the tokenizer
papers' scikit-image uniform window (``ssim_skimage``, data range 1 and 2).

    python -m benchmarks.ssim_conventions --out benchmarks/results/ssim_conventions

Pairs: the first 200 built-in test images (28 px, grayscale) against themselves with
Gaussian noise of standard deviation ``--noise`` (uint8, clamped, fixed seed).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from vqkit.data import load_builtin
from vqkit.evaluation.image_metrics import ssim, ssim_skimage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--noise", type=float, default=20.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    x = load_builtin("test").images[: args.images]
    g = torch.Generator().manual_seed(0)
    noisy = (x.float() + args.noise * torch.randn(x.shape, generator=g)).round().clamp(0, 255)
    y = noisy.to(torch.uint8)
    gauss = ssim(y, x)
    figures = {"ssim": float(gauss.mean())}
    for r in (1.0, 2.0):
        sk = ssim_skimage(y, x, data_range=r)
        figures[f"ssim_skimage_range{r:g}"] = float(sk.mean())
        figures[f"mean_abs_difference_range{r:g}"] = float((sk - gauss).abs().mean())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    record = {
        "command": " ".join(sys.argv),
        "commit": commit.stdout.strip(),
        "machine": platform.processor() or platform.machine(),
        "images": args.images,
        "noise_std": args.noise,
        **figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ssim_conventions.json").write_text(json.dumps(record, indent=1))
    rows = "\n".join(f"| `{k}` | {v:.4f} |" for k, v in figures.items())
    md = (
        f"# SSIM conventions on the same images\n\nFrom `ssim_conventions.json`: the first "
        f"{args.images} built-in test images against themselves with noise of std "
        f"{args.noise:g}.\n\n| figure | mean |\n|---|---:|\n{rows}\n"
    )
    (args.out / "ssim_conventions.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
