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

``torch.compile``: the eval-mode forward of every quantizer traces to one graph
(``fullgraph=True``; tested with ``torch._dynamo.explain``). Host syncs left in
eager mode: the finiteness check (one per forward, ``check_finite=False`` removes
it) and the range check in ``decode`` (both skipped while compiling). Left in
training mode: ResidualVQ's quantizer dropout (row selection per stage,
``nonzero``), and FSQ grids above ``max_bincount`` (``torch.unique``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..codebook import all_reduce_sum, kmeans, kmeans_init, sample_replacements
from ..metrics import perplexity, usage_fraction
from ..search import DEFAULT_SCRATCH_BYTES, nearest_code

__all__ = [
    "QuantizerOutput",
    "BaseQuantizer",
    "CodebookQuantizer",
    "check_indices",
    "fp32_region",
    "mse_terms",
    "rotation_trick",
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

    # -- usage tracking ---------------------------------------------------------
    def _init_usage(
        self,
        num_codes: int,
        decay: float,
        process_group: dist.ProcessGroup | None = None,
        sync_stats: bool = True,
    ) -> None:
        """Register the usage buffers: ``usage_ema`` (K,), an EMA of per-code counts per
        (global) training batch, and ``usage_updates``, the number of updates (for the
        zero-debiasing in :meth:`code_usage`); and the group the counts are summed over."""
        if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"usage_decay must lie in [0, 1); got {decay!r}")
        self.usage_decay = float(decay)
        self.process_group = process_group
        self.sync_stats = bool(sync_stats)
        self.register_buffer("usage_ema", torch.zeros(num_codes))
        self.register_buffer("usage_updates", torch.zeros((), dtype=torch.int64))

    def _global_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-code counts of a training batch summed over the ranks of ``process_group``
        (one all-reduce; identity in one process or with ``sync_stats=False``)."""
        if not self.sync_stats:
            return counts
        return all_reduce_sum([counts], self.process_group)[0]

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor) -> None:
        """One EMA step of ``usage_ema`` from a training batch's per-code ``counts``
        (already global under torch.distributed). A globally empty batch changes
        nothing; no host sync."""
        counts = counts.to(self.usage_ema.dtype)
        observed = counts.sum() > 0
        decay = torch.where(observed, self.usage_decay, 1.0)
        self.usage_ema.mul_(decay).add_(counts * (1.0 - decay))
        self.usage_updates += observed.to(self.usage_updates.dtype)

    def code_usage(self) -> torch.Tensor:
        """Float32 (K,): expected assignments of each code per (global) training batch,
        an EMA over recent training steps (horizon ~``1 / (1 - usage_decay)`` steps),
        zero-debiased so that it is meaningful from the first step (zeros before
        any training step). Eval-mode calls never change it."""
        usage = getattr(self, "usage_ema", None)
        if usage is None:
            raise RuntimeError(f"{type(self).__name__} does not track code usage (grid too large)")
        return usage / self._usage_debias()

    def _usage_debias(self) -> float:
        """``1 - usage_decay^t`` after t usage updates (1 before any): the factor that
        turns ``usage_ema`` into per-batch counts."""
        t = int(self.usage_updates)
        return 1.0 - self.usage_decay**t if t else 1.0

    @torch.no_grad()
    def _restart_usage(self, mask: torch.Tensor, threshold: float) -> None:
        """Give the (revived) codes in ``mask`` a usage of ``threshold`` per batch, in the
        units of ``usage_ema`` (times the debias factor), so they get one EMA horizon to
        be picked before they count as dead again."""
        scale = self._usage_debias()
        self.usage_ema.copy_(torch.where(mask, threshold * scale, self.usage_ema))

    def dead_codes(self, threshold: float = 1.0) -> torch.Tensor:
        """Bool (K,): codes used less than ``threshold`` times per (global) training batch
        on average over recent steps (:meth:`code_usage`). Identical on every rank."""
        return self.code_usage() < threshold

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
    """A quantizer with an explicit (K, d) codebook searched by nearest L2 code.

    Subclasses register ``codebook`` (a parameter or a buffer) of shape
    ``(num_embeddings, codebook_dim)`` and call ``_search_input`` / ``_assign`` /
    ``_search_codebook`` / ``_output`` from ``forward``.

    Options shared by the VQ layers (the defaults give the classic layer, whose
    forward runs exactly the ops it always did):

    * ``codebook_dim`` (default ``embedding_dim``): a smaller code space, with a
      linear in-projection ``embedding_dim -> codebook_dim`` before the search and
      an out-projection back after it (factorised codes, Yu et al. 2021,
      "Vector-quantized Image Modeling with Improved VQGAN"). The loss terms
      live in the code space; ``decode`` applies the out-projection.
    * ``use_cosine`` (alias ``l2_normalize``): inputs (after the in-projection)
      and codes are l2-normalised before the search and the lookup, so the
      nearest code is the one of largest cosine similarity, the quantized
      vectors are unit codes and the loss terms compare unit vectors.
    * ``gradient``: ``"ste"`` (straight-through: identity to the input) or
      ``"rotation"`` (the rotation trick, Fifty et al. 2024, see
      :func:`rotation_trick`). Either way the forward value is exactly the code.

    Usage tracking (every codebook quantizer): in training mode each forward folds the
    batch's per-code counts (summed over the ranks of ``process_group`` when
    ``torch.distributed`` is initialised and ``sync_stats``) into the buffer
    ``usage_ema`` with decay ``usage_decay``; :meth:`code_usage` and
    :meth:`dead_codes` read it. Under torch.distributed every rank must therefore call
    ``forward`` in training mode the same number of times (an empty local batch is
    fine), and the returned ``counts`` / ``perplexity`` / ``usage`` describe the
    global batch.
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
        codebook_dim: int | None = None,
        use_cosine: bool = False,
        l2_normalize: bool | None = None,
        gradient: str = "ste",
        usage_decay: float = 0.99,
        process_group: dist.ProcessGroup | None = None,
        sync_stats: bool = True,
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
        if codebook_dim is None:
            codebook_dim = embedding_dim
        if not isinstance(codebook_dim, int) or codebook_dim < 1:
            raise ValueError(f"codebook_dim must be a positive int; got {codebook_dim!r}")
        if gradient not in ("ste", "rotation"):
            raise ValueError(f"gradient must be 'ste' or 'rotation'; got {gradient!r}")
        if l2_normalize is not None:
            use_cosine = use_cosine or bool(l2_normalize)
        self.num_embeddings = num_embeddings
        self.codebook_size = num_embeddings
        self.max_scratch_bytes = max_scratch_bytes
        self.search_backend = search_backend
        self.codebook_dim = codebook_dim
        self.use_cosine = bool(use_cosine)
        self.gradient = gradient
        if codebook_dim != embedding_dim:
            self.project_in: nn.Linear | None = nn.Linear(embedding_dim, codebook_dim)
            self.project_out: nn.Linear | None = nn.Linear(codebook_dim, embedding_dim)
        else:
            self.project_in = self.project_out = None
        # the classic layer: no projection, no normalisation, straight-through
        self._plain = self.project_in is None and not self.use_cosine and gradient == "ste"
        self._init_usage(num_embeddings, usage_decay, process_group, sync_stats)

    def _kmeans_centers(
        self, x: torch.Tensor, iters: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """(K, codebook_dim) float32 k-means++ + ``iters`` Lloyd centres of ``x`` (an input
        of this layer or flat (N, embedding_dim) vectors, searched as ``forward`` does)
        of every rank of ``process_group`` (identical on all; local with
        ``sync_stats=False``)."""
        self._validate(x, self.codebook.device)  # shape, dtype, NaN/Inf, device
        flat = self._search_input(self.to_flat(x.detach()))
        if not self.sync_stats:
            return kmeans(flat, self.num_embeddings, iters, generator, self.max_scratch_bytes)
        return kmeans_init(
            flat,
            self.num_embeddings,
            iters,
            group=self.process_group,
            generator=generator,
            max_scratch_bytes=self.max_scratch_bytes,
        )

    def _replacements(
        self, x: torch.Tensor, dead: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (K,), vectors (K, codebook_dim)): rows of the current global batch ``x``
        (an input of this layer or flat (N, embedding_dim) vectors, searched as
        ``forward`` does) for the ``dead`` codes; the same bits on every rank."""
        self._validate(x, self.codebook.device)  # shape, dtype, NaN/Inf, device
        flat = self._search_input(self.to_flat(x.detach()))
        return sample_replacements(
            flat, dead, group=self.process_group, sync=self.sync_stats, generator=generator
        )

    def _search_input(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, embedding_dim) -> the vectors that are searched and compared with the
        codes (N, codebook_dim): in-projected and/or l2-normalised (float32) when
        those options are on; ``flat`` itself otherwise."""
        if self.project_in is not None:
            flat = self.project_in(flat)
        if self.use_cosine:
            flat = F.normalize(flat.to(torch.float32), dim=-1)
        return flat

    def _search_codebook(self) -> torch.Tensor:
        """The codes as searched and looked up: ``codebook``, l2-normalised rows when
        ``use_cosine`` (differentiable, K x d: no N x K)."""
        if self.use_cosine:
            return F.normalize(self.codebook, dim=-1)
        return self.codebook

    def _assign(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code per row of ``flat`` (N, D): (indices (N,), sq. distances (N,))."""
        return nearest_code(
            flat,
            self._search_codebook(),
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
        if self._plain:
            quantized = self.from_flat(quantized_flat.to(x.dtype), x.shape)
            # Straight-through: the gradient of the classic x + sg[q - x] (identity to
            # x, none to the codebook), but the forward value is exactly the code, so
            # decode(indices) == quantized bit for bit.
            quantized = straight_through(x, quantized)
        else:
            # flat: the searched vectors (projected / normalised), quantized_flat: codes
            if self.gradient == "rotation":
                st = rotation_trick(flat, quantized_flat)
            else:
                st = straight_through(flat, quantized_flat)
            if self.project_out is not None:
                st = self.project_out(st)
            quantized = self.from_flat(st.to(x.dtype), x.shape)
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

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> int64 index map (B, *spatial). Never updates a codebook."""
        self._validate(x, self.codebook.device)
        indices, _ = self._assign(self._search_input(self.to_flat(x)))
        return indices.reshape(self.index_shape(x.shape))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Map an index map (B, *spatial) back to codes in the input layout:
        (B, D, *spatial), or (B, *spatial, D) when ``channels_last`` (normalised
        codes when ``use_cosine``, out-projected when ``codebook_dim`` is set)."""
        check_indices(indices, self.codebook.device, self.num_embeddings)
        codes = F.embedding(indices.long(), self._search_codebook())  # (B, *spatial, d)
        if self.project_out is not None:
            codes = self.project_out(codes)
        return codes if self.channels_last else codes.movedim(-1, 1)

    lookup = decode

    def extra_repr(self) -> str:
        s = f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
        if self.project_in is not None:
            s += f", codebook_dim={self.codebook_dim}"
        if self.use_cosine:
            s += ", use_cosine=True"
        if self.gradient != "ste":
            s += f", gradient={self.gradient!r}"
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
