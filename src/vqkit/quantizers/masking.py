"""Padding masks: sequences of different lengths in one batch.

Every quantizer's ``forward(x, mask=None)`` takes an optional boolean ``mask`` shaped
like its index map, ``(B, *spatial)`` (for a sequence ``(B, D, T)``: ``(B, T)``).

**Convention: ``True`` marks a padded position** (PyTorch's ``key_padding_mask``
convention; vector-quantize-pytorch's ``mask`` means the opposite, True = keep).
Padded positions are still quantized (``quantized``, ``indices`` and ``distances``
hold values there, so shapes stay static), but they are excluded from

* the loss terms: every mean runs over the kept positions only (a padded position
  gets no gradient from the quantizer's own loss);
* the per-code ``counts``, ``perplexity`` and ``usage`` of the output, the usage EMA
  (:meth:`~vqkit.quantizers.BaseQuantizer.code_usage`) and the EMA codebook update;
* the batch statistics of the entropy terms (LFQ / BSQ);
* k-means init and dead-code revival, where those take a ``mask`` too.

``mask=None`` runs exactly the unmasked code path. A batch whose positions are all
padded behaves like an empty batch (losses 0, no statistics update).

Everything here is shape-static (weights, not boolean row selection), so a masked
forward still compiles to one graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..metrics import code_counts
from .estimators import mse_terms

if TYPE_CHECKING:
    from .base import BaseQuantizer

__all__ = [
    "kept_input",
    "keep_rows",
    "masked_counts",
    "masked_mean",
    "masked_mse_terms",
    "select_kept",
]


def keep_rows(
    mask: torch.Tensor | None, index_shape: tuple[int, ...], device: torch.device
) -> torch.Tensor | None:
    """The flat (N,) bool of KEPT rows (``~mask``) for a padding ``mask`` shaped
    ``index_shape`` = ``(B, *spatial)``; None for no mask. Type, shape and device are
    checked (no host sync)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = padded); got {got}")
    if tuple(mask.shape) != tuple(index_shape):
        raise ValueError(
            f"mask must have the shape of the index map {tuple(index_shape)} "
            f"(B, *spatial; True = padded); got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the input is on {device}")
    return ~mask.reshape(-1)


def masked_counts(indices: torch.Tensor, num_codes: int, keep: torch.Tensor | None) -> torch.Tensor:
    """Per-code int64 counts (K,) of ``indices`` (N,) over the kept rows (all rows
    without ``keep``: exactly :func:`vqkit.metrics.code_counts`)."""
    if keep is None:
        return code_counts(indices, num_codes)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=indices.device)
    return counts.scatter_add_(0, indices.reshape(-1), keep.to(torch.int64))


def kept_count(keep: torch.Tensor) -> torch.Tensor:
    """Number of kept rows as a float32 scalar, at least 1 (a divisor)."""
    return keep.sum().to(torch.float32).clamp(min=1.0)


def masked_mean(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-row ``values`` (N,) over the kept rows (0 when none is kept; the
    plain mean without ``keep``; 0 for N = 0), float32."""
    values = values.to(torch.float32)
    if keep is None:
        return values.sum() / max(values.shape[0], 1)
    return torch.where(keep, values, 0.0).sum() / kept_count(keep)


def masked_mse_terms(
    flat: torch.Tensor, quantized_flat: torch.Tensor, keep: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """:func:`~vqkit.quantizers.estimators.mse_terms` over the kept rows: padded rows are
    zeroed in both operands (no gradient reaches them) and the means are rescaled from
    N rows to the kept rows. Without ``keep``: exactly ``mse_terms``."""
    if keep is None:
        return mse_terms(flat, quantized_flat)
    w = keep.unsqueeze(1)
    terms = mse_terms(torch.where(w, flat, 0.0), torch.where(w, quantized_flat, 0.0))
    scale = max(flat.shape[0], 1) / kept_count(keep)
    return {name: v * scale for name, v in terms.items()}


def select_kept(flat: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The kept rows of ``flat`` (N, D) (boolean selection: data-dependent shape, used
    by k-means init and revival only, never inside ``forward``)."""
    return flat if keep is None else flat[keep]


def kept_input(q: BaseQuantizer, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """For k-means init and revival: ``x`` itself without a mask, else the kept rows of
    ``x`` (an input of ``q``) as flat (N', C) vectors."""
    if mask is None:
        return x
    q._validate(x, x.device)
    keep = keep_rows(mask, q.index_shape(x.shape), x.device)
    return select_kept(q.to_flat(x), keep)
