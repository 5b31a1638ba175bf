"""What every quantizer shares: the output type, input checks and the layout.

Layout convention (one place, every quantizer): inputs are channels-first,
``(B, C, *spatial)`` with ``C == embedding_dim`` (for images ``(B, C, H, W)``),
unless the quantizer was built with ``channels_last=True``, in which case they are
``(B, *spatial, C)``. Internally every quantizer works on the flattened
``(N, C)`` matrix with ``N = B * prod(spatial)``; the output ``quantized`` has the
input's shape, layout and dtype. Indices come back shaped ``(B, *spatial)``
(one code per position: :class:`~vqkit.VectorQuantizer`, the EMA variant and
:class:`~vqkit.quantizers.FSQ`, whose index is the mixed-radix number of its
levels), or ``(B, *spatial, Q)`` for :class:`~vqkit.quantizers.ResidualVQ`
(one index per stage, last axis). ``decode(indices)`` maps any of them straight
back to the output space (after any out-projection), in the same layout.

Precision: the search / rounding always runs in float32, also under
``torch.autocast`` (the region is excluded from autocast); ``quantized`` is cast
to the input's dtype and the loss terms are float32 scalars.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import perplexity, usage_fraction
from ..search import DEFAULT_SCRATCH_BYTES, nearest_code

__all__ = [
    "QuantizerOutput",
    "BaseQuantizer",
    "CodebookQuantizer",
    "check_indices",
    "fp32_region",
    "mse_terms",
    "straight_through",
]


@dataclass
class QuantizerOutput:
    """Result of a quantizer's forward pass.

    Attributes:
        quantized: straight-through quantized tensor, same shape and dtype as
            the input (forward value = chosen codes, gradient = identity).
        loss: scalar, the weighted sum of ``losses``.
        perplexity: scalar, ``exp(entropy)`` of code usage in this batch.
        indices: int64 ``(B, *spatial)`` chosen code per position
            (``(B, *spatial, Q)`` for a Q-stage :class:`ResidualVQ`).
        losses: named unweighted loss terms (e.g. ``codebook``, ``commitment``);
            empty for quantizers without loss terms (FSQ, whose ``loss`` is 0).
        usage: scalar, fraction of the K codes used at least once in this batch.
        counts: int64 (K,) number of positions assigned to each code ((Q, K) per
            stage for ResidualVQ; None for an FSQ too large to bincount).
        distances: float32 ``(B, *spatial)`` squared distance to the chosen code
            (in the search space; None where there is no search).
        num_embeddings: K, needed to build ``encodings`` on demand.
        stages: for ResidualVQ, each stage's own output (on that stage's
            residual, flattened to (N, D)); None otherwise.

    Unpacks like the classic VQ-VAE module:
    ``loss, quantized, perplexity, encodings = vq(x)``. ``encodings`` is the
    dense (N, K) float one-hot; it is built only when accessed (N x K memory).
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    usage: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    distances: torch.Tensor | None = None
    num_embeddings: int = 0
    stages: list[QuantizerOutput] | None = None

    @property
    def encodings(self) -> torch.Tensor:
        """Dense one-hot (N, K) float32 of ``indices`` (allocates N x K)."""
        flat = self.indices.reshape(-1)
        return F.one_hot(flat, self.num_embeddings).to(torch.float32)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Classic 4-tuple: (loss, quantized, perplexity, encodings).
        yield self.loss
        yield self.quantized
        yield self.perplexity
        yield self.encodings


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def fp32_region(device: torch.device) -> torch.autocast:
    """A region excluded from autocast: code there runs in the dtypes it is given
    (the quantizers cast to float32 first), whatever autocast is active outside."""
    return torch.autocast(device_type=device.type, enabled=False)


def check_indices(indices: torch.Tensor, device: torch.device, high: int, low: int = 0) -> None:
    """Type, device and (outside compilation: one host sync) range checks of an index
    tensor for ``decode``; valid values lie in ``[low, high)``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor; got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"indices must be an integer tensor; got dtype {indices.dtype}")
    if indices.dim() < 1:
        raise ValueError("indices must have at least a batch dimension: (B, *spatial)")
    if indices.device != device:
        raise ValueError(
            f"indices are on {indices.device} but the codebook is on "
            f"{device}; put both on the same device"
        )
    if not _compiling() and indices.numel() > 0:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < low or hi >= high:
            raise ValueError(f"indices must lie in [{low}, {high}); got range [{lo}, {hi}]")


class BaseQuantizer(nn.Module):
    """Input validation and the channels-first <-> (N, C) layout.

    Subclasses set ``embedding_dim`` and implement ``forward``.
    """

    embedding_dim: int

    def __init__(
        self, embedding_dim: int, *, channels_last: bool = False, check_finite: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int; got {embedding_dim!r}")
        self.embedding_dim = embedding_dim
        self.channels_last = bool(channels_last)
        self.check_finite = bool(check_finite)

    # -- layout -----------------------------------------------------------------
    def _validate(self, x: torch.Tensor, device: torch.device) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor; got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"expected input of shape {self._layout_str()} with at least 2 dims; "
                f"got shape {tuple(x.shape)}"
            )
        c = x.shape[-1] if self.channels_last else x.shape[1]
        if c != self.embedding_dim:
            where = "last" if self.channels_last else "channel (dim 1)"
            raise ValueError(
                f"expected {self.embedding_dim} channels in the {where} dimension of "
                f"{self._layout_str()}; got {c} (input shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input; got dtype {x.dtype}")
        if x.device != device:
            raise ValueError(
                f"input is on {x.device} but the codebook is on {device}; "
                "put both on the same device"
            )
        # One fused min/max pass (NaN and Inf both surface there) and a host sync;
        # ~7x cheaper than isfinite(x).all(). Skipped while tracing (no data-dependent
        # branches in a compiled graph). Switch off with check_finite=False.
        if self.check_finite and not _compiling() and x.numel() > 0:
            lo, hi = torch.aminmax(x.detach())
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise ValueError("input contains NaN or Inf")

    def _layout_str(self) -> str:
        return "(B, *spatial, C)" if self.channels_last else "(B, C, *spatial)"

    def to_flat(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) or (B, *spatial, C) -> (N, C)."""
        if not self.channels_last:
            x = x.movedim(1, -1)
        return x.reshape(-1, x.shape[-1])

    def from_flat(self, flat: torch.Tensor, like_shape: torch.Size) -> torch.Tensor:
        """(N, C) -> the layout of an input with shape ``like_shape``."""
        if self.channels_last:
            return flat.reshape(like_shape)
        b, c, *spatial = like_shape
        return flat.reshape(b, *spatial, flat.shape[-1]).movedim(-1, 1)

    def index_shape(self, x_shape: torch.Size) -> tuple[int, ...]:
        """Shape of the index map for an input shape: (B, *spatial)."""
        return tuple(x_shape[:-1]) if self.channels_last else (x_shape[0], *x_shape[2:])

    def extra_repr(self) -> str:
        return f"channels_last={self.channels_last}" if self.channels_last else ""


class CodebookQuantizer(BaseQuantizer):
    """A quantizer with an explicit (K, D) codebook searched by nearest L2 code.

    Subclasses register ``codebook`` (a parameter or a buffer) and call
    ``_assign`` / ``_output`` from ``forward``.
    """

    codebook: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        channels_last: bool = False,
        check_finite: bool = True,
        max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
        search_backend: str = "torch",
    ) -> None:
        super().__init__(embedding_dim, channels_last=channels_last, check_finite=check_finite)
        if not isinstance(num_embeddings, int) or num_embeddings < 1:
            raise ValueError(f"num_embeddings must be a positive int; got {num_embeddings!r}")
        if not isinstance(max_scratch_bytes, int) or max_scratch_bytes < 4:
            raise ValueError(f"max_scratch_bytes must be an int >= 4; got {max_scratch_bytes!r}")
        if search_backend not in ("torch", "faiss", "auto"):
            raise ValueError(
                f"search_backend must be 'torch', 'faiss' or 'auto'; got {search_backend!r}"
            )
        self.num_embeddings = num_embeddings
        self.max_scratch_bytes = max_scratch_bytes
        self.search_backend = search_backend

    def _assign(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code per row of ``flat`` (N, D): (indices (N,), sq. distances (N,))."""
        return nearest_code(
            flat,
            self.codebook,
            max_scratch_bytes=self.max_scratch_bytes,
            backend=self.search_backend,
        )  # type: ignore[arg-type]

    def _output(
        self,
        x: torch.Tensor,
        flat: torch.Tensor,
        quantized_flat: torch.Tensor,
        indices: torch.Tensor,
        distances: torch.Tensor,
        counts: torch.Tensor,
        losses: dict[str, torch.Tensor],
        loss: torch.Tensor,
    ) -> QuantizerOutput:
        quantized = self.from_flat(quantized_flat.to(x.dtype), x.shape)
        # Straight-through: the gradient of the classic x + sg[q - x] (identity to x,
        # none to the codebook), but the forward value is exactly the code, so
        # decode(indices) == quantized bit for bit.
        quantized = straight_through(x, quantized)
        index_shape = self.index_shape(x.shape)
        return QuantizerOutput(
            quantized=quantized,
            loss=loss,
            perplexity=perplexity(counts),
            indices=indices.reshape(index_shape),
            losses=losses,
            usage=usage_fraction(counts),
            counts=counts,
            distances=distances.reshape(index_shape),
            num_embeddings=self.num_embeddings,
        )

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Map an index map (B, *spatial) back to codes in the input layout:
        (B, D, *spatial), or (B, *spatial, D) when ``channels_last``."""
        check_indices(indices, self.codebook.device, self.num_embeddings)
        codes = F.embedding(indices.long(), self.codebook)  # (B, *spatial, D)
        return codes if self.channels_last else codes.movedim(-1, 1)

    lookup = decode

    def extra_repr(self) -> str:
        s = f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
        extra = super().extra_repr()
        return f"{s}, {extra}" if extra else s


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
