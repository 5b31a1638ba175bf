"""Reconstruction quality and codebook usage of a VQ-VAE on a dataset split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import ImageData, normalize
from ..errors import UserError
from ..metrics import group_health, perplexity
from ..models import VQVAE
from .image_metrics import bits_per_pixel
from .suite import QualitySuite, base_labels

__all__ = ["DENSE_COUNTS_MAX", "SparseCounts", "evaluate", "progressive_reconstructions"]

DENSE_COUNTS_MAX = 1 << 24
"""Above this many codes (an implicit codebook: LFQ / BSQ with many bits, a large FSQ
grid) usage is counted per used code (:class:`SparseCounts`), never as a dense (K,)
tensor: ``--num-bits 30`` would need 8 GiB for it and 36 GiB more as a list."""


@dataclass
class SparseCounts:
    """Per-code counts of a codebook too large for a dense (K,) tensor: ``codes`` (the
    used codes, sorted) and ``used`` (their counts); every other code has count 0."""

    num_codes: int
    codes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    used: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def add(self, indices: torch.Tensor) -> None:
        """Count the int64 ``indices`` (any shape) in."""
        codes, counts = torch.unique(indices.reshape(-1), return_counts=True)
        every = torch.cat((self.codes, codes))
        self.codes, inverse = torch.unique(every, return_inverse=True)
        merged = torch.zeros(len(self.codes), dtype=torch.int64)
        self.used = merged.index_add_(0, inverse, torch.cat((self.used, counts)))


@torch.no_grad()
def evaluate(
    model: VQVAE,
    data: ImageData,
    *,
    data_variance: float,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    batch_perplexity_size: int = 32,
    limit: int | None = None,  # an evenly strided subset of this many images
    progress: bool = False,
    suite: QualitySuite | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (in eval mode; the codebook is not touched) on ``data``.

    Returns a dict:
      * ``mse``: mean squared error per pixel on the model's scale ([-0.5, 0.5]),
        reconstructions unclamped (the quantity the model is trained on);
      * ``nmse``: ``mse / data_variance`` (the training set's variance);
      * ``psnr``: dB, from the MSE of reconstructions clamped to the valid range
        (peak 1.0, the image a person sees);
      * ``perplexity``: of the code usage pooled over the whole split;
      * ``batch_perplexity``: mean perplexity over consecutive groups of
        ``batch_perplexity_size`` images (the training-time figure);
      * ``codes_used``, ``usage``: codes used at least once, and that over K;
      * ``counts``: per-code counts (list; rvq: pooled over stages), or above
        :data:`DENSE_COUNTS_MAX` codes a :class:`SparseCounts`; ``num_images``;
      * ``bits_per_pixel``: of the codes (one image's codes x log2 K / pixels: positions x
        codes per position, or a multi-scale map's L);
      * ``code_groups``, only for a quantizer with code groups (a multi-scale
        tokenizer's scales, its ``code_groups``): per group name, ``perplexity``,
        ``usage``, ``codes_used`` of that group's codes over the split, and ``dead``,
        its codes no image of the split used;
      * with a ``suite``: its figures (SSIM, MS-SSIM, LPIPS, FD/KID per feature space) and
        ``labels``, what produced each figure.
    """
    if not data_variance > 0:
        raise UserError(f"data_variance must be > 0; got {data_variance}")
    was_training = model.training
    model.eval()
    k = model.num_codes  # K, or the FSQ grid; rvq: pooled over stages
    if limit is not None and limit < len(data):
        # evenly strided, so a class-sorted split (image folders) is still covered
        data = data.subset(torch.linspace(0, len(data) - 1, limit).round().long())
    n = len(data)
    if n == 0:
        raise UserError(f"nothing to evaluate: the split '{data.split}' of {data.source} is empty")
    dense = k <= DENSE_COUNTS_MAX
    counts = torch.zeros(k if dense else 0, dtype=torch.int64)
    sparse = SparseCounts(k)
    groups = model.quantizer.code_groups
    per_group = torch.zeros(len(groups) if groups else 0, k, dtype=torch.int64)
    sq_err = 0.0
    sq_err_clamped = 0.0
    n_pix = 0
    batch_ppl: list[float] = []
    step = max(batch_size, batch_perplexity_size)
    step -= step % batch_perplexity_size
    iterator = range(0, n, step)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="eval", unit="batch", leave=False)
    try:
        for i in iterator:
            x = normalize(data.images[i : min(n, i + step)].to(device))
            out = model(x)
            diff = out.recon - x
            sq_err += float(diff.double().pow(2).sum())
            sq_err_clamped += float((out.recon.clamp(-0.5, 0.5) - x).double().pow(2).sum())
            n_pix += x.numel()
            if suite is not None:
                suite.update(x, out.recon)
            idx = out.vq.indices.reshape(x.shape[0], -1).cpu()
            if dense:
                counts += torch.bincount(idx.reshape(-1), minlength=k)
            else:
                sparse.add(idx.reshape(-1))
            if groups is not None:  # (G, K): each scale's assignments in this batch
                per_group += out.vq.counts.reshape(len(groups), k).cpu()
            # full groups only, so every figure is over the same number of images
            for j in range(0, x.shape[0] - batch_perplexity_size + 1, batch_perplexity_size):
                group = idx[j : j + batch_perplexity_size].reshape(-1)
                # zero counts add nothing to the entropy: above DENSE_COUNTS_MAX the used
                # codes' counts suffice (below it, the dense counts keep the figure's bits)
                if dense:
                    group_counts = torch.bincount(group, minlength=k)
                else:
                    group_counts = torch.unique(group, return_counts=True)[1]
                batch_ppl.append(float(perplexity(group_counts)))
    finally:
        model.train(was_training)
    mse = sq_err / n_pix
    mse_c = sq_err_clamped / n_pix
    if not math.isfinite(mse):
        raise FloatingPointError(
            f"the model's reconstructions of {data.source} ({data.split}) are NaN or Inf: "
            "its weights or the data hold non-finite values"
        )
    if not dense:
        counts = sparse.used
    used = int((counts > 0).sum())
    h, w = data.images.shape[-2:]
    f = model.config.downsample
    # every code of one image (h/f x w/f positions x Q; a multi-scale map's L codes)
    codes = math.prod(model.quantizer.code_shape((h // f, w // f)))
    bpp = bits_per_pixel(codes, 1, k, h * w)
    result = {
        "num_images": n,
        "mse": mse,
        "nmse": mse / data_variance,
        # undefined figures are None (JSON null), never Infinity or NaN
        "psnr": 10.0 * math.log10(1.0 / mse_c) if mse_c > 0 else None,
        "perplexity": float(perplexity(counts)),
        "batch_perplexity": sum(batch_ppl) / len(batch_ppl) if batch_ppl else None,
        "codes_used": used,
        "usage": used / k,
        "data_variance": data_variance,
        "counts": counts.tolist() if dense else sparse,
        "bits_per_pixel": bpp,
    }
    if groups is not None:
        result["code_groups"] = group_health(groups, per_group)
    if suite is not None:
        figures, labels = suite.compute()
        result.update(figures)
        result["labels"] = {**base_labels(), **labels}
    return result


@torch.no_grad()
def progressive_reconstructions(model: VQVAE, x: torch.Tensor) -> list[torch.Tensor]:
    """A multi-scale tokenizer's reconstructions of images ``x`` (B, C, H, W) from its
    first 1, 2, ..., S scales (``VQVAE.decode(codes, num_scales=n)``): S tensors
    (B, C, H, W), the last the full reconstruction. UserError for a tokenizer without
    code groups (one scale)."""
    groups = model.quantizer.code_groups
    if groups is None:
        raise UserError(
            "progressive decoding needs a multi-scale tokenizer (--quantizer multiscale)"
        )
    was_training = model.training
    model.eval()
    try:
        codes = model.encode(x)
        return [model.decode(codes, num_scales=n) for n in range(1, len(groups) + 1)]
    finally:
        model.train(was_training)
