"""What every quantizer shares: the contract, input checks, the layout, usage tracking.

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..codebook import kmeans, kmeans_init, sample_replacements
from ..distributed import all_reduce_sum
from ..metrics import dead_codes, ema_debias, perplexity, usage_fraction
from ..options import nonneg, nonneg_int, option, positive_int
from ..search import DEFAULT_SCRATCH_BYTES, nearest_code
from .estimators import rotation_trick, straight_through
from .output import QuantizerOutput
from .registry import QuantizerOptions

__all__ = [
    "BaseQuantizer",
    "CodebookOptions",
    "CodebookQuantizer",
    "check_indices",
    "fp32_region",
]


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
    """Input validation, the channels-first <-> (N, C) layout, and the contract.

    **The contract** (what the model and the trainer may use, nothing else):

    * ``num_codes``: how many values one index takes (K; the FSQ grid size; per stage
      for a residual quantizer), and ``codes_per_position`` (1, or Q stages: indices
      then carry a last axis of size Q).
    * ``forward(x) -> QuantizerOutput``, ``encode(x) -> indices``, ``decode(indices)``.
    * ``supports_init`` / ``init_codebook_kmeans(x, iters, generator)``: set the
      codebook from data (k-means over the latents of every rank).
    * ``supports_revival`` / ``revive_dead_codes(x, threshold, generator) -> mask``:
      replace codes whose usage is below ``threshold`` per global batch; returns the
      bool (K,) mask of revived codes.
    * ``code_usage() -> (K,) | None``: the usage statistic (expected assignments per
      global training batch, recent EMA), None when not tracked; ``dead_codes``.
    * ``codebook_parameters()``: the parameters that are the codes (a learning-rate
      group of their own; optimizer-row reset after revival); empty if none.
    * ``counts_are_global``: training-mode ``counts`` are already summed over ranks.

    A quantizer without a codebook (FSQ) keeps the defaults: no init, no revival.
    Subclasses set ``embedding_dim`` and ``num_codes`` and implement ``forward``.
    """

    embedding_dim: int
    num_codes: int
    codes_per_position: int = 1
    supports_init: bool = False
    supports_revival: bool = False

    def __init__(
        self, embedding_dim: int, *, channels_last: bool = False, check_finite: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int; got {embedding_dim!r}")
        self.embedding_dim = embedding_dim
        self.channels_last = bool(channels_last)
        self.check_finite = bool(check_finite)
        self.process_group: dist.ProcessGroup | None = None
        self.sync_stats = True

    # -- the contract: defaults for a quantizer without a codebook ----------------
    def init_codebook_kmeans(
        self, x: torch.Tensor, iters: int = 10, generator: torch.Generator | None = None
    ) -> None:
        """Set the codes from data ``x`` (k-means); see ``supports_init``."""
        raise NotImplementedError(f"{type(self).__name__} has no codebook to initialise from data")

    def revive_dead_codes(
        self, x: torch.Tensor, threshold: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Replace dead codes by vectors of ``x``; returns the bool (K,) revived mask."""
        raise NotImplementedError(f"{type(self).__name__} has no codebook to revive")

    def codebook_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold the codes (empty: none are learned by gradient)."""
        return []

    @property
    def counts_are_global(self) -> bool:
        """Whether training-mode ``counts`` are already summed over the ranks."""
        return self.tracks_usage and self.sync_stats

    @property
    def tracks_usage(self) -> bool:
        return isinstance(getattr(self, "usage_ema", None), torch.Tensor)

    def code_usage(self) -> torch.Tensor | None:
        """Float32 (K,): expected assignments of each code per (global) training batch,
        an EMA over recent training steps (horizon ~``1 / (1 - usage_decay)`` steps),
        zero-debiased so that it is meaningful from the first step (zeros before
        any training step); None when this quantizer tracks no usage. Eval-mode calls
        never change it."""
        if not self.tracks_usage:
            return None
        return self.usage_ema / self._usage_debias()

    def dead_codes(self, threshold: float = 1.0) -> torch.Tensor:
        """Bool (K,): codes used less than ``threshold`` times per (global) training batch
        on average over recent steps (:meth:`code_usage`). Identical on every rank."""
        usage = self.code_usage()
        if usage is None:
            raise RuntimeError(f"{type(self).__name__} does not track code usage")
        return dead_codes(usage, threshold)

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
    def _init_sync(self, process_group: dist.ProcessGroup | None, sync_stats: bool) -> None:
        """The group training statistics are summed over (default: the world)."""
        self.process_group = process_group
        self.sync_stats = bool(sync_stats)

    def _init_usage(self, num_codes: int, decay: float) -> None:
        """Register the usage buffers: ``usage_ema`` (K,), an EMA of per-code counts per
        (global) training batch, and ``usage_updates``, the number of updates (for the
        zero-debiasing in :meth:`code_usage`)."""
        if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"usage_decay must lie in [0, 1); got {decay!r}")
        self.usage_decay = float(decay)
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

    def _usage_debias(self) -> float:
        """The factor that turns ``usage_ema`` into per-batch counts."""
        return ema_debias(self.usage_decay, int(self.usage_updates))

    @torch.no_grad()
    def _restart_usage(self, mask: torch.Tensor, threshold: float) -> None:
        """Give the (revived) codes in ``mask`` a usage of ``threshold`` per batch, in the
        units of ``usage_ema`` (times the debias factor), so they get one EMA horizon to
        be picked before they count as dead again."""
        scale = self._usage_debias()
        self.usage_ema.copy_(torch.where(mask, threshold * scale, self.usage_ema))

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


GRADIENTS = ("ste", "rotation")


@dataclass
class CodebookOptions(QuantizerOptions):
    """Options shared by the quantizers with an explicit codebook (vq, ema, rvq)."""

    num_embeddings: int = option(
        512, "K, the number of codes (per stage for rvq)", check=positive_int
    )
    commitment_cost: float = option(
        0.25, "beta, weight of the commitment loss ||z_e - sg[e]||^2", check=nonneg
    )
    codebook_dim: int = option(
        0,
        "search in a smaller code space with linear in/out projections (factorised codes, "
        "Yu et al. 2021); 0: embedding_dim",
        check=nonneg_int,
    )
    use_cosine: bool = option(False, "l2-normalised inputs and codes (cosine similarity)")
    gradient: str = option(
        "ste",
        "gradient estimator: ste (straight-through) or rotation (rotation trick, "
        "Fifty et al. 2024)",
        choices=GRADIENTS,
    )

    def codebook_kwargs(self) -> dict[str, Any]:
        """The constructor keywords of these options (0 codebook_dim: none)."""
        return {
            "commitment_cost": self.commitment_cost,
            "codebook_dim": self.codebook_dim or None,
            "use_cosine": self.use_cosine,
            "gradient": self.gradient,
        }


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
    supports_init = True
    supports_revival = True

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
        usage_decay: float | None = 0.99,
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
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {list(GRADIENTS)}; got {gradient!r}")
        if l2_normalize is not None:
            use_cosine = use_cosine or bool(l2_normalize)
        self.num_embeddings = num_embeddings
        self.num_codes = num_embeddings
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
        self._init_sync(process_group, sync_stats)
        if usage_decay is not None:  # None: the subclass keeps its own usage statistic
            self._init_usage(num_embeddings, usage_decay)

    def codebook_parameters(self) -> list[nn.Parameter]:
        return [self.codebook] if isinstance(self.codebook, nn.Parameter) else []

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
