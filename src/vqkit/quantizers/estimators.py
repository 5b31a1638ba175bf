"""Gradient estimators and the VQ loss terms, as autograd Functions.

``straight_through`` (identity gradient), ``rotation_trick`` (Fifty et al. 2024) and
``mse_terms`` (codebook and commitment terms from one difference). Each saves only
what the backward needs and writes no N x K tensor.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["mse_terms", "rotation_trick", "straight_through"]


class _SquaredErrorTerms(torch.autograd.Function):
    """Both VQ loss terms from one difference: forward (codebook, commitment), equal in
    value ``mean((q - x)^2)``; the codebook term differentiates only w.r.t. ``q``, the
    commitment term only w.r.t. ``x``. Autograd of two ``mse_loss`` calls would form
    the difference four times."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = q.to(torch.float32) - x.to(torch.float32)
        flat = diff.reshape(-1)
        mse = torch.dot(flat, flat) / flat.numel()
        ctx.save_for_backward(diff)
        ctx.dtypes = (x.dtype, q.dtype)
        return mse, mse.clone()

    @staticmethod
    def backward(
        ctx: Any, g_codebook: torch.Tensor, g_commit: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (diff,) = ctx.saved_tensors
        scale = 2.0 / diff.numel()
        grad_x = grad_q = None
        if ctx.needs_input_grad[0]:
            grad_x = (diff * (-scale * g_commit)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_q = (diff * (scale * g_codebook)).to(ctx.dtypes[1])
        return grad_x, grad_q


def mse_terms(flat: torch.Tensor, quantized_flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two VQ-VAE loss terms, float32 scalars.

    codebook = mean ||sg[x] - e||^2 (moves codes), commitment = mean ||x - sg[e]||^2
    (moves the encoder); means over all N * D elements. An empty batch gives zeros
    that still connect to the graph.
    """
    if flat.shape[0] == 0:
        zero = flat.to(torch.float32).sum() * 0.0 + quantized_flat.to(torch.float32).sum() * 0.0
        return {"codebook": zero, "commitment": zero}
    codebook, commitment = _SquaredErrorTerms.apply(flat, quantized_flat)
    return {"codebook": codebook, "commitment": commitment}


class _StraightThrough(torch.autograd.Function):
    """Forward: the codes ``q`` laid out like ``x``; backward: identity to ``x``,
    nothing to ``q``. One copy, where ``x + sg[q - x]`` takes two passes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x).copy_(q)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value of ``q`` (exactly, cast to ``x.dtype``), gradient of ``x``."""
    return _StraightThrough.apply(x, q)


class _RotationTrick(torch.autograd.Function):
    """Forward: the codes ``q`` (exactly, in ``x``'s dtype); backward: the gradient of
    ``sg[lambda R] x`` (see :func:`rotation_trick`), nothing to ``q``. Saves only
    ``x`` and ``q`` (already alive); the rotation is applied in the backward without
    forming a d x d matrix."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, q)
        return torch.empty_like(x).copy_(q)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, q = ctx.saved_tensors
        x = x.to(torch.float32)
        q = q.to(torch.float32)
        g = grad.to(torch.float32)
        tiny = torch.finfo(torch.float32).tiny
        x_norm = x.norm(dim=-1, keepdim=True)
        q_norm = q.norm(dim=-1, keepdim=True)
        u = x / x_norm.clamp(min=tiny)  # x / ||x||
        v = q / q_norm.clamp(min=tiny)  # e / ||e||
        r = u + v
        r = r / r.norm(dim=-1, keepdim=True).clamp(min=tiny)
        # R^T g = g - 2 r (r.g) + 2 u (v.g)
        rot = g - 2.0 * r * (r * g).sum(-1, keepdim=True) + 2.0 * u * (v * g).sum(-1, keepdim=True)
        out = (q_norm / x_norm.clamp(min=tiny)) * rot
        # ||x|| = 0: no direction to rotate from; fall back to the identity
        out = torch.where(x_norm > 0, out, g)
        return out.to(grad.dtype), None


def rotation_trick(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation-trick estimator (Fifty et al. 2024, "Restructuring Vector
    Quantization with the Rotation Trick") for rows of ``x`` (N, d) and their codes
    ``q`` (N, d).

    Forward value: exactly ``q`` (cast to ``x.dtype``). Gradient: that of
    ``sg[lambda R] x`` with ``lambda = ||q|| / ||x||`` and ``R`` the rotation taking
    ``x / ||x||`` to ``q / ||q||``, built from two Householder reflections,
    ``R = (I - 2 v v^T)(I - 2 r r^T) = I - 2 r r^T + 2 v u^T`` with
    ``u = x/||x||``, ``v = q/||q||``, ``r = (u + v)/||u + v||``; so
    ``dL/dx = lambda R^T dL/dq_out`` and no gradient reaches ``q`` through this path
    (the codebook learns from its loss term, as with straight-through). Rows with
    ``x = 0`` get the identity; for ``u = -v`` (``r`` undefined) ``r`` is taken as 0,
    which still maps ``u`` onto ``v``.
    """
    return _RotationTrick.apply(x, q)
