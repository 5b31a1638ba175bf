"""Codebook statistics: per-code sums, EMA updates, and their distributed sync.

These are plain functions on tensors so that the quantizers stay small and the
math is testable on its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "assignment_stats",
    "all_reduce_sum",
    "ema_",
    "laplace_smooth",
    "world_size",
]


def assignment_stats(
    flat: torch.Tensor, indices: torch.Tensor, num_embeddings: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts n_k (K,) and sums s_k = sum_{i: idx_i = k} x_i (K, D),
    float32, by ``index_add`` (no one-hot)."""
    flat = flat.detach().to(torch.float32)
    counts = torch.zeros(num_embeddings, dtype=torch.float32, device=flat.device)
    counts.index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))
    sums = torch.zeros(num_embeddings, flat.shape[1], dtype=torch.float32, device=flat.device)
    sums.index_add_(0, indices, flat)
    return counts, sums


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of ``group`` if torch.distributed is initialised now, else 1.

    Asked at call time on purpose: a module built before
    ``init_process_group`` must still sync once training starts.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce_sum(
    tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Sum each tensor over all ranks with ONE collective (flattened and fused).

    Every rank must call this the same number of times with the same shapes;
    a no-op without an initialised process group.
    """
    if world_size(group) == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def ema_(average: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    """In place: ``average <- decay * average + (1 - decay) * value``."""
    average.mul_(decay).add_(value, alpha=1.0 - decay)


def laplace_smooth(cluster_size: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Additive smoothing that keeps the total: ``(N_k + eps) / (n + K eps) * n``
    with ``n = sum_k N_k``; keeps every code's size positive so that
    ``m_k / N_k`` never divides by zero."""
    n = cluster_size.sum()
    k = cluster_size.shape[0]
    return (cluster_size + epsilon) / (n + k * epsilon) * n
