"""Pictures a person opens: reconstruction grids (Pillow), training curves,
codebook-usage histograms and the speech codec's spectrograms (matplotlib, headless Agg
backend)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..storage.fileio import atomic_write, loads_json

__all__ = [
    "image_grid",
    "recon_pairs",
    "save_images",
    "save_recon_grid",
    "save_progressive_grid",
    "plot_curves",
    "plot_spectrograms",
    "plot_usage",
]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-0.5, 0.5] -> uint8 (B, H, W, C)."""
    x = ((x.detach().float().cpu() + 0.5).clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(rows: Sequence[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Tile rows of images (each (B, C, H, W), [-0.5, 0.5]) into one uint8 picture."""
    imgs = [_to_uint8(r) for r in rows]
    b = max(r.shape[0] for r in imgs)
    h, w, c = imgs[0].shape[1:]
    grid = np.full((len(imgs) * (h + pad) + pad, b * (w + pad) + pad, c), 255, np.uint8)
    for i, row in enumerate(imgs):
        for j, im in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = im
    return grid


def _save_png(array: np.ndarray, path: str | os.PathLike[str], scale: int = 1) -> None:
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def recon_pairs(originals: torch.Tensor, recons: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """(2N, C, H, W): rows of ``per_row`` originals, each followed by the row of their
    reconstructions; a grid tiled ``per_row`` wide (TensorBoard's 8) shows each image
    above its reconstruction."""
    rows = []
    for i in range(0, originals.shape[0], per_row):
        rows += [originals[i : i + per_row], recons[i : i + per_row]]
    return torch.cat(rows)


def save_recon_grid(
    originals: torch.Tensor,
    recons: torch.Tensor,
    path: str | os.PathLike[str],
    per_row: int = 16,
    scale: int = 2,
) -> None:
    """PNG with originals above their reconstructions, ``per_row`` images per row."""
    rows = []
    for i in range(0, originals.shape[0], per_row):
        rows += [originals[i : i + per_row], recons[i : i + per_row]]
    _save_png(image_grid(rows), path, scale)


def save_progressive_grid(
    originals: torch.Tensor,
    recons: Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    scale: int = 2,
) -> None:
    """PNG with one row per image: the original, then its reconstructions ``recons[n]``
    (each (B, C, H, W)) from 1 scale up to all of them, one column each."""
    rows = [torch.stack([originals[i], *(r[i] for r in recons)]) for i in range(len(originals))]
    _save_png(image_grid(rows), path, scale)


def save_images(images: torch.Tensor, paths: Sequence[str | os.PathLike[str]]) -> None:
    """One PNG per image (B, C, H, W) in [-0.5, 0.5]."""
    for im, p in zip(_to_uint8(images), paths, strict=True):
        _save_png(im, p)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig: Any, path: str | os.PathLike[str]) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _values(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    """``record[key]`` of the records that have the key; null (how strict JSON writes a
    non-finite value) becomes NaN, a gap in the line."""
    return [float("nan") if r[key] is None else r[key] for r in records if key in r]


def plot_curves(metrics_path: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Training curves from a metrics JSONL file: loss, reconstruction NMSE,
    perplexity and codebook usage against step (train and eval records)."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    bad = 0
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            try:
                rec = loads_json(line)
            except ValueError:  # e.g. a line cut short by a kill; plot the rest
                bad += 1
                continue
            if isinstance(rec, dict):
                if rec.get("kind") in ("eval", "train"):
                    (evals if rec["kind"] == "eval" else train).append(rec)
    if bad:
        warnings.warn(f"{metrics_path}: skipped {bad} unreadable line(s)", stacklevel=2)
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("loss", "total loss", True),
        ("recon_nmse", "reconstruction NMSE", True),
        ("perplexity", "batch perplexity", False),
        ("window_usage", "codes used (window)", False),
    ]
    for ax, (key, title, log) in zip(axes.flat, panels, strict=True):
        xs = [r["step"] for r in train if key in r]
        ax.plot(xs, _values(train, key), label="train")
        ekey = {
            "recon_nmse": "nmse",
            "perplexity": "batch_perplexity",
            "window_usage": "usage",
        }.get(key)
        if ekey and evals:
            ex = [r["step"] for r in evals if ekey in r]
            ax.plot(ex, _values(evals, ekey), "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        if log and xs:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_usage(counts: Any, path: str | os.PathLike[str], title: str = "") -> None:
    """Codebook-usage histogram: per-code counts (K,) sorted by frequency (log scale).

    Only used codes are bars (a count of 0 has no place on a log axis); the unused ones
    keep their ranks on the x axis, shaded, and their number is in the title and legend.
    """
    from .reconstruction import SparseCounts

    if isinstance(counts, SparseCounts):  # a huge implicit codebook: the used codes only
        c = np.sort(counts.used.numpy().astype(np.float64))[::-1]
        k = counts.num_codes
    else:
        c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
        k = len(c)
    used = int((c > 0).sum())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    if used:
        ax.bar(np.arange(used), c[:used], width=1.0, color="tab:blue", label=f"{used} used")
    if used < k:
        ax.axvspan(used - 0.5, k - 0.5, color="0.9", label=f"{k - used} unused (count 0)")
    ax.set_xlim(-0.5, max(k, 1) - 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("assignments")
    p = c / max(c.sum(), 1)
    nz = p[p > 0]
    ppl = float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 1.0
    ax.set_title(f"{title} codes used {used}/{k} ({k - used} unused), perplexity {ppl:.1f}".strip())
    if k:
        ax.legend(loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_spectrograms(
    clips: Sequence[dict[str, torch.Tensor]], rate: int, path: str | os.PathLike[str]
) -> None:
    """Log-mel spectrograms (:func:`~vqkit.evaluation.audio_metrics.log_mel`: 80 mels,
    n_fft 512, hop 128), one row per clip, one column per labelled signal of that clip
    (e.g. the original, then its decodings at a low and the full stage count); every
    panel on one colour scale, -5 (the floor) to the largest value. A signal of 256
    samples or fewer is zero-padded to 257 for the picture."""
    from .audio_metrics import log_mel

    def spec(x: torch.Tensor) -> np.ndarray:
        x = x.detach().reshape(-1).double().cpu()
        if x.numel() < 257:
            x = torch.nn.functional.pad(x, (0, 257 - x.numel()))
        return log_mel(x, rate).numpy()

    grid = [[(label, spec(x)) for label, x in clip.items()] for clip in clips]
    cols = max(len(row) for row in grid)
    top = max(float(s.max()) for row in grid for _, s in row)
    plt = _pyplot()
    fig, axes = plt.subplots(len(grid), cols, figsize=(3.2 * cols, 2.4 * len(grid)), squeeze=False)
    for r, row in enumerate(grid):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            label, s = row[c]
            seconds = (s.shape[1] - 1) * 128 / rate
            ax.imshow(
                s, origin="lower", aspect="auto", vmin=-5.0, vmax=top, cmap="magma",
                extent=(0.0, seconds, 0, s.shape[0]),
            )  # fmt: skip
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("s", fontsize=8)
            if c == 0:
                ax.set_ylabel("mel band", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
