"""Codebook-usage metrics computed from per-code counts.

All functions take ``counts`` (K,), the number of vectors assigned to each
code (from ``torch.bincount``), so no N x K one-hot is needed.
"""

from __future__ import annotations

import torch

__all__ = [
    "code_counts",
    "codebook_health",
    "dead_codes",
    "ema_debias",
    "group_health",
    "perplexity",
    "usage_fraction",
]


def code_counts(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Per-code counts (K,) int64 of an index tensor of any shape.

    Under ``torch.compile`` a scatter-add into K zeros (bincount's output shape depends
    on the data, a graph break); the same counts."""
    flat = indices.reshape(-1)
    if torch.compiler.is_compiling():
        counts = torch.zeros(num_embeddings, dtype=torch.int64, device=flat.device)
        return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))
    return torch.bincount(flat, minlength=num_embeddings)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(-sum_k p_k log p_k)`` with ``p = counts / sum(counts)``.

    Ranges from 1 (one code used) to K (uniform usage). With no vectors at all
    (an empty batch) every ``p_k`` is 0 and the perplexity is 1 by the
    convention ``0 log 0 = 0``.
    """
    counts = counts.to(torch.float32)
    p = counts / counts.sum().clamp(min=1.0)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def usage_fraction(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of codes with at least one assigned vector (float32 scalar)."""
    return (counts > 0).to(torch.float32).mean()


def dead_codes(usage: torch.Tensor, threshold: float) -> torch.Tensor:
    """The one definition of a dead code: bool (K,), codes whose usage statistic
    (expected assignments per global training batch, see
    :meth:`~vqkit.quantizers.BaseQuantizer.code_usage`) is below ``threshold``."""
    return usage < threshold


def ema_debias(decay: float, updates: int) -> float:
    """``1 - decay^t`` after ``t`` EMA updates from zero (1 before any update): divide
    a zero-started EMA by it to read it as an average (Kingma & Ba's bias correction)."""
    return 1.0 - decay**updates if updates else 1.0


def codebook_health(
    counts: torch.Tensor,
    ema_counts: torch.Tensor | None = None,
    threshold: float = 1.0,
) -> dict[str, float]:
    """Codebook health over a window of steps, as plain numbers.

    Args:
        counts: (K,) assignments per code summed over the window (global, i.e. summed
            over ranks, when distributed).
        ema_counts: optional (K,) EMA of per-step counts (a quantizer's
            ``code_usage()``, in assignments per global batch).
        threshold: a code is dead when its EMA count is below ``threshold``; without
            ``ema_counts``, when it was never used in the window.

    Returns ``{"perplexity", "window_usage", "codes_used", "dead"}``: the perplexity of
    the window's pooled usage, the fraction and number of codes used at least once in the
    window, and the number of dead codes.
    """
    counts = counts.detach().cpu()
    used = int((counts > 0).sum())
    if ema_counts is not None:
        dead = int(dead_codes(ema_counts.detach().cpu(), threshold).sum())
    else:
        dead = counts.numel() - used
    return {
        "perplexity": float(perplexity(counts)),
        "window_usage": used / max(counts.numel(), 1),
        "codes_used": used,
        "dead": dead,
    }


def group_health(
    names: tuple[str, ...],
    counts: torch.Tensor,
    usage: torch.Tensor | None = None,
    threshold: float = 1.0,
    window: bool = False,
) -> dict[str, dict[str, float]]:
    """Each code group's health, ``{name: {"perplexity", "usage", "codes_used",
    "dead"}}`` from its row of ``counts`` (G, K) (and of ``usage`` (G, K), the EMA per
    group, which decides ``dead`` when given: below ``threshold``; else dead = unused in
    ``counts``); rows in the order of ``names``. ``window``: the first two named
    ``window_perplexity`` and ``window_usage`` (a train record's log window)."""
    if counts.shape[0] != len(names):
        raise ValueError(f"{len(names)} code groups but counts of shape {tuple(counts.shape)}")
    out = {}
    for g, name in enumerate(names):
        h = codebook_health(counts[g], None if usage is None else usage[g], threshold)
        pre = "window_" if window else ""
        out[name] = {
            f"{pre}perplexity": h["perplexity"],
            f"{pre}usage": h["window_usage"],
            "codes_used": h["codes_used"],
            "dead": h["dead"],
        }
    return out
