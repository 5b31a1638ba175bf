"""Pictures of a prior run: sample grids (Pillow) and NLL curves (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..evaluation.plots import image_grid
from ..storage.fileio import atomic_write, loads_json

__all__ = ["plot_prior_curves", "save_grid"]


def save_grid(
    images: torch.Tensor, path: str | os.PathLike[str], per_row: int = 8, scale: int = 2
) -> None:
    """One PNG of images (B, C, H, W) in [-0.5, 0.5], ``per_row`` to a row, each pixel
    ``scale`` x ``scale`` (32 px images are small on a screen)."""
    from PIL import Image

    rows = [images[i : i + per_row] for i in range(0, images.shape[0], per_row)]
    grid = image_grid(rows)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def plot_prior_curves(metrics_path: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Bits per code (train window, eval on train and test; a masked prior's masked
    cross-entropy at fixed ratios) and learning rate against step, from a prior run's
    ``metrics.jsonl``; ValueError when it holds no records."""
    records = [
        loads_json(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()
    ]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise UserError(f"{metrics_path} holds no records")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    series: list[tuple[list[dict[str, Any]], str, str, str]] = [
        (train, "bits", "-", "train (window, dropout on)"),
        (evals, "train_bits", "o-", "train (eval)"),
        (evals, "test_bits", "o-", "test (eval)"),
        # a masked prior: cross-entropy of hidden codes at fixed mask ratios (not an NLL)
        *((evals, f"test_masked_bits_{p}", "o-", f"test, {p}% hidden") for p in (25, 50, 90)),
        (evals, "train_masked_bits_50", "o--", "train, 50% hidden"),
    ]
    for recs, key, style, label in series:
        recs = [r for r in recs if key in r]
        if recs:
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], style, label=label)
    masked = any("test_masked_bits" in r for r in evals)
    ax.set_title("masked cross-entropy (bits per hidden code)" if masked else "NLL (bits per code)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
