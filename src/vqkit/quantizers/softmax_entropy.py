"""Entropy terms of a softmax over an explicit codebook, without the N x K matrix: IBQ's
entropy penalty (Shi et al. 2024; the MAGVIT-v2 form used by its reference code).

With logits ``a_nk = x_n.e_k / T`` and ``p_n = softmax(a_n)`` over the K codes:

* per-sample entropy ``H_n = lse_n - sum_k p_nk a_nk`` (mean over the kept rows),
* batch entropy ``H(P) = -sum_k P_k log P_k`` of the batch-averaged distribution
  ``P_k = mean_n p_nk`` (EXACT, no approximation; ``0 log 0 = 0``; the reference code
  adds 1e-5 inside the log).

The penalty is ``per_sample - gamma * batch``: confident assignments, many codes used.

Tiled over rows, each tile holding whole rows of K logits (so every softmax is one
fused op): the forward computes each tile's ``log_softmax``, the per-sample entropies and
its share of the marginal ``P``; the backward recomputes the tile's softmax, then
``c_n = sum_k p_nk log P_k`` and the gradient tile. With ``g_s``, ``g_b`` the
upstream gradients of the two terms::

    dL/da_nj = p_nj * ( -g_s (a_nj - abar_n) / N - g_b (log P_j - c_n) / N_global )

with ``abar_n = sum_k p_nk a_nk``; ``dL/dx_n = sum_j dL/da_nj e_j / T`` and
``dL/de_j = sum_n dL/da_nj x_n / T``. Memory: the K-float marginal, O(N) row figures
and two (tile_n x K) tiles within ``max_scratch_bytes``; never N x K.

Distributed: with ``sync`` the marginal and the row count are summed over the ranks of
``group`` (one all-reduce of K + 1 floats), so ``H(P)`` is the GLOBAL batch's; its
gradient is multiplied by the world size so that DDP's averaging gives the exact
gradient (each rank back-propagates through its own rows), as in
:mod:`vqkit.quantizers.entropy`. The per-sample term is the local mean (DDP's
averaging makes it the global mean for equal local batches).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..distributed import all_reduce_sum, world_size
from .base import fp32_region

__all__ = ["softmax_entropy_terms"]


def _row_tile(n: int, k: int, scratch: int) -> int:
    """Rows per tile: two float32 (rows x K) tiles live at once (a row of K floats is the
    least; whole rows keep every softmax one fused op instead of an online rescaling)."""
    return max(1, min(max(n, 1), scratch // (2 * 4 * max(k, 1))))


class _SoftmaxEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        e: torch.Tensor,
        temperature: float,
        sync: bool,
        group: dist.ProcessGroup | None,
        scratch: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with fp32_region(x.device):
            inv_t = 1.0 / temperature
            n, k = x.shape[0], e.shape[0]
            tile = _row_tile(n, k, scratch)
            et = e.t()
            marg = torch.zeros(k, dtype=x.dtype, device=x.device)
            abar = x.new_empty(n)  # sum_k p_nk a_nk
            h = x.new_empty(n)  # H(p_n)
            for r0 in range(0, n, tile):
                a = (x[r0 : r0 + tile] * inv_t) @ et
                p = torch.softmax(a, dim=1)
                ab = torch.linalg.vecdot(p, a)
                # H = lse - sum_k p a, with lse = a_j - log p_j in the row's largest
                # column j (p_j >= 1/K: well conditioned), cheaper than a logsumexp pass
                top, j = a.max(dim=1, keepdim=True)
                lse = top.squeeze(1) - p.gather(1, j).squeeze(1).log()
                abar[r0 : r0 + tile] = ab
                h[r0 : r0 + tile] = lse - ab
                marg += p.sum(0)
            total = torch.tensor(float(n), dtype=x.dtype, device=x.device)
            ws = 1
            if sync:
                ws = world_size(group)
                marg, total = all_reduce_sum([marg, total], group)
            big_p = marg / total.clamp(min=1.0)
            log_p = torch.log(big_p.clamp(min=torch.finfo(big_p.dtype).tiny))
            batch = -(big_p * log_p).sum()
            sample = h.sum() / max(n, 1)
            ctx.save_for_backward(x, e, abar, log_p, total.clamp(min=1.0))
            ctx.cfg = (inv_t, tile, ws)
            return sample, batch

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_s: torch.Tensor, g_b: torch.Tensor) -> tuple[Any, ...]:
        with fp32_region(g_s.device):
            x, e, abar, log_p, n_global = ctx.saved_tensors
            inv_t, tile, ws = ctx.cfg
            n = x.shape[0]
            # per-sample term: a local mean (1/n); batch term: P averages the GLOBAL
            # batch (1/n_global), times the world size since DDP averages over the ranks
            g_s = g_s / max(n, 1)
            g_b = g_b * (ws / n_global)
            col = (-g_b * inv_t) * log_p  # the column part of the bracket, times 1/T
            et = e.t()
            dx = torch.zeros_like(x)
            de = torch.zeros_like(e)
            for r0 in range(0, n, tile):
                xb = x[r0 : r0 + tile]
                a = (xb * inv_t) @ et
                p = torch.softmax(a, dim=1)
                c = p @ log_p  # c_n = sum_k p_nk log P_k
                row = (g_s * abar[r0 : r0 + tile] + g_b * c) * inv_t
                # dL/ds = p * (-g_s (a - abar) - g_b (log P - c)) / T, as col + row - g_s a / T
                gt = torch.add(col, a, alpha=-g_s * inv_t).add_(row.unsqueeze(1)).mul_(p)
                dx[r0 : r0 + tile] = gt @ e
                de.addmm_(gt.t(), xb)
            return dx, de, None, None, None, None


def softmax_entropy_terms(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float,
    keep: torch.Tensor | None = None,
    *,
    sync: bool = False,
    group: dist.ProcessGroup | None = None,
    max_scratch_bytes: int = 16 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean per-sample entropy, batch entropy)`` in nats of ``softmax(x E^T / T)`` for
    rows ``x`` (N, d) over the codes ``codebook`` (K, d), float32, differentiable in
    both; ``keep`` (N,) bool leaves rows out (padding). Memory bounded by
    ``max_scratch_bytes`` (see the module docstring); an empty batch gives zeros (and,
    with ``sync``, still joins the all-reduce)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    x = x.to(torch.float32)
    if keep is not None:
        x = x[keep]
    return _SoftmaxEntropy.apply(
        x,
        codebook.to(torch.float32),
        float(temperature),
        bool(sync),
        group,
        int(max_scratch_bytes),
    )
