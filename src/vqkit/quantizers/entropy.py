"""Entropy terms of the binary quantizers (LFQ, BSQ) over the implicit codebook
``{-s, +s}^d`` (K = 2^d codes), without the N x K probability matrix.

The soft assignment of a row ``u`` (d,) is ``p(c|u) ∝ exp(-||u - c||^2 / tau)``. Since
``||u - c||^2 = sum_i (u_i - c_i)^2`` it factorises EXACTLY over the bits:

    p(c|u) = prod_i p_i(c_i|u_i),   p_i(+s|u_i) = sigmoid(a_i),   a_i = 4 s u_i / tau

(``(u + s)^2 - (u - s)^2 = 4 s u``). Everything below takes the per-bit logits
``a`` (N, d). Bit ``i`` of a code index is channel ``i`` (channel 0 least significant).

* :func:`per_sample_entropy`: ``mean_n H(p(.|u_n)) = mean_n sum_i H_b(sigmoid(a_ni))``,
  exact, O(N d), plain autograd.
* :func:`batch_entropy`: ``H(pbar)`` with ``pbar(c) = mean_n p(c|u_n)``, the entropy of
  the batch-averaged code distribution, EXACT (no approximation; only float rounding):
  the bits are split into a low half A (d_A = ceil(d/2) bits) and a high half B, so
  ``p(c|u) = P_A[n, c_A] P_B[n, c_B]`` and the marginal, read as a (2^d_A, 2^d_B)
  matrix, is ONE matrix product ``pbar = P_A^T P_B / N``. Each half's probabilities are
  a log-space matmul, ``log P_A = sum_i log p_i(-) + (log p_i(+) - log p_i(-)) @ bits_A^T``.
  Rows are processed in tiles, so the memory is the K-float marginal plus
  ``tile_n x (2^d_A + 2^d_B)`` scratch (bounded by ``max_scratch_bytes``), never N x K;
  the cost is one N x 2^d_A x 2^d_B GEMM instead of N x K exponentials. The custom
  autograd Function saves only the inputs and the K-float marginal and recomputes the
  tiles in the backward (also bounded). With ``group_size < d`` the bits are cut into
  groups and the sum of the groups' exact batch entropies is returned: BSQ's factorised
  APPROXIMATION of the joint batch entropy (an upper bound: joint entropy <= sum of the
  groups' entropies). ``group_size=1`` (one bit per group) takes a closed form,
  ``sum_i H_b(mean_n sigmoid(a_ni))``, O(N d) in a few vectorised ops.

Distributed: with ``sync`` the marginal is summed over the ranks of ``group`` (one
all-reduce of K floats + 1), so the batch entropy is that of the GLOBAL batch; its
backward is multiplied by the world size, so that DDP's gradient averaging yields the
exact gradient of the global entropy (each rank back-propagates through its own rows
only). Padded rows (``keep`` False) are left out of the marginal and of the means.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import all_reduce_sum, world_size
from ..search import DEFAULT_SCRATCH_BYTES

__all__ = ["MAX_EXACT_BITS", "batch_entropy", "binary_entropy_logits", "per_sample_entropy"]

MAX_EXACT_BITS = 24
"""Largest bit group whose exact batch entropy is computed: its marginal holds 2^24
floats (64 MiB) and costs N x 2^24 multiply-adds."""


def binary_entropy_logits(a: torch.Tensor) -> torch.Tensor:
    """``H_b(sigmoid(a))`` in nats, elementwise, stable for any finite ``a``:
    ``p softplus(-a) + (1 - p) softplus(a)`` (two non-negative terms, no cancellation)."""
    p = torch.sigmoid(a)
    return p * F.softplus(-a) + (1.0 - p) * F.softplus(a)


def per_sample_entropy(a: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_n H(p(.|u_n))`` (nats) from per-bit logits ``a`` (N, d), over the kept rows;
    exact by the factorisation over bits. 0 for an empty batch."""
    h = binary_entropy_logits(a).sum(dim=1)
    if keep is None:
        return h.sum() / max(h.shape[0], 1)
    return torch.where(keep, h, 0.0).sum() / keep.sum().to(h.dtype).clamp(min=1.0)


def _bits(n_bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2^n_bits, n_bits) 0/1 matrix: row c holds the bits of c, least significant first."""
    codes = torch.arange(2**n_bits, device=device).unsqueeze(1)
    return ((codes >> torch.arange(n_bits, device=device)) & 1).to(dtype)


class _Group:
    """One group of bits, split into halves A (low) and B (high): column slices of ``a``
    and the bit matrices of the halves."""

    def __init__(self, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> None:
        size = stop - start
        self.a0, self.mid, self.b1 = start, start + (size + 1) // 2, stop
        self.bits_a = _bits(self.mid - self.a0, dtype, device)
        self.bits_b = _bits(self.b1 - self.mid, dtype, device)
        self.ka, self.kb = self.bits_a.shape[0], self.bits_b.shape[0]

    def half_probs(self, a: torch.Tensor, lo: int, hi: int, bits: torch.Tensor) -> torch.Tensor:
        """Probabilities of every code of one half, (rows, 2^half), from a log-space matmul."""
        if hi == lo:  # an empty half (a one-bit group): the single empty code, prob. 1
            return torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)
        # Centred at the row's likeliest code h (bit i = [a_i > 0]): log P[c] = sum_i
        # logsigmoid(|a_i|) - sum_{i: c_i != h_i} |a_i|, a product of same-sign terms,
        # computed for c XOR h and gathered back. The uncentred sum_i logsigmoid(-a_i) +
        # bits @ a cancels to ~0 for the likeliest code (e.g. -80 + 80): float32
        # gradients were 10x less accurate than a dense float32 computation at |a| ~ 20.
        cols = a[:, lo:hi]
        mag = cols.abs()
        logq = torch.addmm(F.logsigmoid(mag).sum(1, keepdim=True), mag, bits.t(), alpha=-1.0)
        place = torch.arange(bits.shape[1], device=a.device)
        h = ((cols > 0).long() << place).sum(1, keepdim=True)  # index of the likeliest code
        rel = torch.arange(bits.shape[0], device=a.device).unsqueeze(0) ^ h
        return logq.exp_().gather(1, rel)

    def probs(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.half_probs(a, self.a0, self.mid, self.bits_a),
            self.half_probs(a, self.mid, self.b1, self.bits_b),
        )

    def logit_grad(self, a: torch.Tensor, g_log: torch.Tensor, lo: int, hi: int, bits) -> Any:
        """d/da of sum_c g_log[n, c] log P[n, c] for the half's columns (d log P / d a_i =
        b_ci - sigmoid(a_i)), as ``sigmoid(-a) (g_log @ bits) - sigmoid(a) (g_log @ (1 -
        bits))``: ``b - sigmoid(a)`` is ``sigmoid(-a)`` or ``-sigmoid(a)``, and each product
        sums terms of one sign (``g_log >= 0`` up to the sign of the upstream gradient).
        The equal ``g_log @ bits - sigmoid(a) rowsum(g_log)`` cancels to nothing for a
        confident bit (``sigmoid(a)`` near 1): float32 gradients 3-11x less accurate than
        a dense float32 computation at large logits."""
        cols = a[:, lo:hi]
        ones = g_log @ bits
        zeros = g_log @ (1.0 - bits)
        return torch.sigmoid(-cols) * ones - torch.sigmoid(cols) * zeros


def _groups(d: int, size: int, dtype: torch.dtype, device: torch.device) -> list[_Group]:
    return [_Group(s, min(s + size, d), dtype, device) for s in range(0, d, size)]


def _tile_rows(n: int, groups: list[_Group], itemsize: int, scratch: int) -> int:
    # live per row: both halves' probabilities and their gradients (4 x (K_A + K_B))
    width = max(g.ka + g.kb for g in groups) * 4 * itemsize
    return max(1, min(max(n, 1), scratch // width))


class _BatchEntropy(torch.autograd.Function):
    """Sum over bit groups of ``H(pbar_g)``; see the module docstring. Inputs: logits
    ``a`` (N, d) and row weights ``w`` (N,) (1 kept, 0 padded)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, *rest: Any) -> torch.Tensor:  # type: ignore[override]
        """:meth:`_forward` (``rest``: w, group_size, sync, group, scratch) with autocast
        off in both passes: AOT autograd traces them under the caller's autocast."""
        with torch.autocast(device_type=a.device.type, enabled=False):
            return _BatchEntropy._forward(ctx, a, *rest)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(device_type=g_h.device.type, enabled=False):
            return _BatchEntropy._backward(ctx, g_h)

    @staticmethod
    def _forward(
        ctx: Any,
        a: torch.Tensor,
        w: torch.Tensor,
        group_size: int,
        sync: bool,
        group: dist.ProcessGroup | None,
        scratch: int,
    ) -> torch.Tensor:
        n, d = a.shape
        if group_size == 1:  # per bit: pbar_i(+) = mean_n sigmoid(a_ni), O(N d), few ops
            # a cascaded sum, not a GEMV: at m near 1/2 the gradient log((1 - m) / m)
            # is as accurate as m (the GEMV's running sum: 2-8x less accurate gradients)
            marg = [(torch.sigmoid(a) * w.unsqueeze(1)).sum(0, keepdim=True)]
            groups = []
        else:
            groups = _groups(d, group_size, a.dtype, a.device)
            marg = [torch.zeros(g.ka, g.kb, dtype=a.dtype, device=a.device) for g in groups]
        tile = _tile_rows(n, groups, a.element_size(), scratch) if groups else n
        for r0 in range(0, n if groups else 0, max(tile, 1)):  # n = 0: an empty batch
            ar, wr = a[r0 : r0 + tile], w[r0 : r0 + tile].unsqueeze(1)
            for g, m in zip(groups, marg, strict=True):
                pa, pb = g.probs(ar)
                m.addmm_(pa.mul_(wr).t(), pb)  # sum_n w_n P_A[n]^T P_B[n]
        total = w.sum().reshape(1)
        ws = 1
        if sync:
            ws = world_size(group)
            parts = all_reduce_sum([*marg, total], group)
            marg, total = parts[:-1], parts[-1]
        denom = total.clamp(min=1.0)
        marg = [m / denom for m in marg]
        if group_size == 1:
            m = marg[0]
            h = -(torch.special.xlogy(m, m) + torch.special.xlogy(1.0 - m, 1.0 - m)).sum()
        else:
            h = sum(-torch.special.xlogy(m, m).sum() for m in marg)
        ctx.save_for_backward(a, w, denom, *marg)
        ctx.conf = (group_size, scratch, ws)
        return h  # type: ignore[return-value]

    @staticmethod
    def _backward(ctx: Any, g_h: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, w, denom, *marg = ctx.saved_tensors
        group_size, scratch, ws = ctx.conf
        n, d = a.shape
        groups = _groups(d, group_size, a.dtype, a.device)
        grad = torch.zeros_like(a)
        if n == 0:
            return grad, None, None, None, None, None
        tiny = torch.finfo(a.dtype).tiny
        coef = g_h * ws / denom
        if group_size == 1:  # dH_b/dm = log((1 - m) / m), dm/da_ni = w_n s'(a_ni) / n
            m = marg[0]
            dm = (torch.log((1.0 - m).clamp(min=tiny)) - torch.log(m.clamp(min=tiny))) * coef
            # s'(a) = sigmoid(a) sigmoid(-a): 1 - sigmoid(a) lost the digits of a sure bit
            ds = torch.sigmoid(a) * torch.sigmoid(-a)
            return ds * w.unsqueeze(1) * dm, None, None, None, None, None
        # dH/dpbar = -(log pbar + 1); the +1 sums to zero through the normalised rows
        # (sum_c p(c|u) = 1), so it is left out. log(max(pbar, tiny)): an underflowed pbar
        # only meets underflowed p(c|u_n), whose products stay ~0.
        weights = [torch.log(m.clamp(min=tiny)).mul_(-coef) for m in marg]
        tile = _tile_rows(n, groups, a.element_size(), scratch)
        for r0 in range(0, n, tile):
            ar, wr = a[r0 : r0 + tile], w[r0 : r0 + tile].unsqueeze(1)
            gr = grad[r0 : r0 + tile]
            for g, wt in zip(groups, weights, strict=True):
                pa, pb = g.probs(ar)
                ga = (pb @ wt.t()).mul_(pa).mul_(wr)  # d/dlog P_A = P_A * w_n P_B W^T
                gb = (pa @ wt).mul_(pb).mul_(wr)
                if g.mid > g.a0:
                    gr[:, g.a0 : g.mid] += g.logit_grad(ar, ga, g.a0, g.mid, g.bits_a)
                if g.b1 > g.mid:
                    gr[:, g.mid : g.b1] += g.logit_grad(ar, gb, g.mid, g.b1, g.bits_b)
        return grad, None, None, None, None, None


def batch_entropy(
    a: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    sync: bool = False,
    group: dist.ProcessGroup | None = None,
    max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
) -> torch.Tensor:
    """Entropy (nats) of the batch-averaged code distribution, from per-bit logits ``a``
    (N, d) (float32 or float64), over the kept rows.

    ``group_size`` None or >= d: EXACT ``H(mean_n p(.|u_n))`` over all 2^d codes. Smaller:
    the sum of the exact entropies of consecutive groups of ``group_size`` bits (an
    approximation from above; 1 is BSQ's per-bit factorisation). Memory: the 2^d
    marginal (per group: 2^group_size) plus a bounded row tile; see the module docstring.
    """
    if a.dim() != 2:
        raise ValueError(f"a must have shape (N, d); got {tuple(a.shape)}")
    d = a.shape[1]
    size = d if group_size is None else max(1, min(int(group_size), d))
    if size > MAX_EXACT_BITS:
        raise ValueError(
            f"the exact batch entropy of {size} bits needs a 2^{size}-float marginal; at most "
            f"{MAX_EXACT_BITS} bits (use groups: BSQ's entropy_group_size)"
        )
    w = torch.ones(a.shape[0], dtype=a.dtype, device=a.device) if keep is None else keep.to(a.dtype)
    return _BatchEntropy.apply(a, w, size, bool(sync), group, int(max_scratch_bytes))
