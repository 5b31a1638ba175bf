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

import math
import os

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import all_reduce_sum
from ..errors import UserError
from ..metrics import dead_codes, ema_debias
from .masking import kept_input

__all__ = ["BaseQuantizer", "check_indices", "fp32_region"]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def fp32_region(device: torch.device) -> torch.autocast:
    """A region excluded from autocast: code there runs in the dtypes it is given
    (the quantizers cast to float32 first), whatever autocast is active outside."""
    return torch.autocast(device_type=device.type, enabled=False)


def check_weights(**weights: float) -> None:
    """Each named loss weight (commitment_cost, entropy_weight, ...) must be a finite
    number >= 0: one check for every quantizer's constructor."""
    for name, v in weights.items():
        if not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")


def check_positive(**values: float) -> None:
    """Each named value (a temperature, ...) must be a finite number > 0."""
    for name, v in values.items():
        if not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ValueError(f"{name} must be a finite number > 0; got {v!r}")


def check_count(**values: int) -> None:
    """Each named size (num_bits, num_embeddings, embedding_dim, ...) must be an int >= 1;
    a bool is refused (``LFQ(True)`` is a mistake, not one bit)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")


def machine_memory() -> int | None:
    """This machine's physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_network_memory(what: str, weights: int, activation: int, advice: str) -> None:
    """Refuse up front (UserError, one line) a network whose ``weights`` bytes and
    ``activation`` bytes per image exceed this machine's memory: ``what`` names the
    options, ``advice`` the flags to lower."""
    have = machine_memory()
    if have is not None and weights + activation > have:
        raise UserError(
            f"{what} needs at least {weights / 2**30:.1f} GiB of weights and "
            f"{activation / 2**30:.1f} GiB per image, more than this machine's "
            f"{have / 2**30:.1f} GiB; {advice}"
        )


def check_code_memory(name: str, num_codes: int, bytes_per_code: int) -> None:
    """Refuse up front a codebook whose per-code buffers (``bytes_per_code`` each, a lower
    bound: the codes and their usage statistic) exceed this machine's memory, with the
    memory it would need, instead of an allocator error (or the OOM killer) later."""
    need, have = num_codes * bytes_per_code, machine_memory()
    if have is not None and need > have:
        raise ValueError(
            f"{name}: {num_codes} codes need at least {need / 2**30:.1f} GiB for their "
            f"per-code buffers, more than this machine's {have / 2**30:.1f} GiB; use fewer codes"
        )


def check_indices(indices: torch.Tensor, device: torch.device, high: int, low: int = 0) -> None:
    """Type, device and (outside compilation: one host sync) range checks of an index
    tensor for ``decode``; valid values lie in ``[low, high)``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor; got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor (e.g. int64); got {indices.dtype}")
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
      then carry a last axis of size Q); ``code_shape(grid)``, the indices of one
      input of that spatial grid (``(*grid)``, ``(*grid, Q)``, MultiScaleVQ's ``(L,)``).
    * ``forward(x) -> QuantizerOutput``, ``encode(x) -> indices``, ``decode(indices)``.
    * ``supports_init`` / ``init_codebook_kmeans(x, iters, generator)``: set the
      codebook from data (k-means over the latents of every rank).
    * ``supports_revival`` / ``revive_dead_codes(x, threshold, generator) -> mask``:
      replace codes whose usage is below ``threshold`` per global batch; returns the
      bool (K,) mask of revived codes, or (Q, K) for a quantizer of Q codebooks (rvq's
      stages: row i indexes the i-th of ``code_row_parameters()`` when it lists any).
    * ``code_usage() -> (K,) | None``: the usage statistic (expected assignments per
      global training batch, recent EMA), None when not tracked; ``dead_codes``.
    * ``codebook_lr_parameters()``: the parameters that get the codebook learning rate
      (``--codebook-lr-scale``): the codes, an affine map of them, SimVQ's d x d map.
    * ``code_row_parameters()``: the parameters whose dim-0 rows are the K codes, the
      rows that ``revive_dead_codes``' mask indexes (their optimizer state restarts
      after a revival); a subset of ``codebook_lr_parameters()``.
    * ``counts_are_global``: training-mode ``counts`` are already summed over ranks.
    * ``code_groups``: names of the code groups whose health is reported one by one,
      the rows of ``counts`` (G, K) (MultiScaleVQ: its scales); None (the default): one
      group. ``group_code_usage() -> (G, K) | None``: their usage statistic.
    * ``code_prefix(codes, n)``: the codes of the first ``n`` groups, which ``decode``
      takes (progressive decoding); refused (UserError) without groups.

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
        check_count(embedding_dim=embedding_dim)
        self.embedding_dim = embedding_dim
        self.channels_last = bool(channels_last)
        self.check_finite = bool(check_finite)
        self.process_group: dist.ProcessGroup | None = None
        self.sync_stats = True

    # -- the contract: init and revival, written once; subclasses say how -----------
    @torch.no_grad()
    def init_codebook_kmeans(
        self,
        x: torch.Tensor,
        iters: int = 10,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Set the codes from data ``x`` (an input of this layer, or flat (N, C) vectors)
        by k-means++ and ``iters`` Lloyd iterations over the vectors of every rank of
        ``process_group``, identical on all; ``mask`` (True = padded) leaves positions
        out. Explicit (never inside ``forward``); every rank must call it. Call it
        before the optimizer steps, or reset the optimizer's state for the codebook
        afterwards (:func:`vqkit.codebook.reset_optimizer_rows`). See ``supports_init``."""
        if not self.supports_init:
            raise NotImplementedError(
                f"{type(self).__name__} has no codebook to initialise from data"
            )
        self._init_codes(kept_input(self, x, mask), iters, generator)

    @torch.no_grad()
    def revive_dead_codes(
        self,
        x: torch.Tensor,
        threshold: float = 1.0,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replace every code used less than ``threshold`` times per GLOBAL training batch
        (:meth:`dead_codes`) by a vector of the current global batch ``x`` (an input of
        this layer or flat (N, C) vectors; ``mask``, True = padded, leaves positions
        out); same codes and vectors on every rank, and every rank must call it at the
        same steps. Returns the bool (K,) mask of revived codes ((Q, K) for Q
        codebooks, one row each: residual VQ's stages): pass it to
        :func:`vqkit.codebook.reset_optimizer_rows` for the ``code_row_parameters()``
        (the trainer does), or momentum drags the revived rows back. See
        ``supports_revival``."""
        if not self.supports_revival:
            raise NotImplementedError(f"{type(self).__name__} has no codebook to revive")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0; got {threshold!r}")
        return self._revive_codes(kept_input(self, x, mask), threshold, generator)

    def _init_codes(self, x: torch.Tensor, iters: int, generator: torch.Generator | None) -> None:
        """:meth:`init_codebook_kmeans` on the kept ``x`` (layout as given)."""
        raise NotImplementedError

    def _revive_codes(
        self, x: torch.Tensor, threshold: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """:meth:`revive_dead_codes` on the kept ``x`` (layout as given)."""
        raise NotImplementedError

    def code_shape(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one input's indices for an input of spatial size ``grid``:
        ``grid``, plus the stage axis Q when ``codes_per_position > 1``. A quantizer whose
        codes are not one per grid position (MultiScaleVQ: ``(L,)``) says so here; index
        files and their sidecars record it."""
        q = self.codes_per_position
        return (*grid, q) if q > 1 else tuple(grid)

    def codebook_lr_parameters(self) -> list[nn.Parameter]:
        """The parameters trained at the codebook learning rate (empty: none are
        learned by gradient)."""
        return []

    def code_row_parameters(self) -> list[nn.Parameter]:
        """The parameters of shape (K, ...) whose row k is code k (empty: no code is a
        parameter row)."""
        return []

    @property
    def code_groups(self) -> tuple[str, ...] | None:
        """Names of the code groups reported one by one (each a row of ``counts``, which is
        then (G, K)), coarse to fine; None: the codes are one group (the default; a
        residual quantizer's stages are pooled)."""
        return None

    def group_code_usage(self) -> torch.Tensor | None:
        """Float32 (G, K): :meth:`code_usage` per code group (rows as ``code_groups``);
        None without groups or when usage is not tracked."""
        return None

    def code_group_shapes(self, grid: tuple[int, ...]) -> list[tuple[int, ...]] | None:
        """The shapes of the code groups of one input of spatial size ``grid``, coarse to
        fine, in the order :meth:`code_shape`'s ``(L,)`` sequence concatenates them
        (MultiScaleVQ: ``[(s, s) for s in scales]``); None: the codes are one group (the
        default), one map of :meth:`code_shape`. A next-scale prior reads its scales here."""
        return None

    def code_prefix(self, codes: torch.Tensor, n: int) -> torch.Tensor:
        """The codes of the first ``n`` code groups of ``codes`` (batch first), which
        :meth:`decode` reconstructs from (progressive decoding). UserError (one line) for
        a quantizer without groups, or ``n`` out of range."""
        raise UserError(
            f"{type(self).__name__} codes are one group: decoding the first {n} scales "
            "needs a multi-scale tokenizer (--quantizer multiscale)"
        )

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
                # a diverged encoder in training, bad data otherwise: one line either way
                raise UserError("input contains NaN or Inf (a diverged run: lower --lr)")

    def _project(self, layer: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` (a linear projection, or ``x`` when None) for an input of any float
        dtype: outside autocast the input is cast to the layer's dtype (fp16, bf16 and
        float64 inputs meet float32 weights; callers cast the result back to the input's
        dtype). With ``check_finite`` a NaN/Inf result from the finite input (checked in
        :meth:`_validate`) is refused: it means the projection's weights hold NaN/Inf,
        and a sign or a search over NaN would give finite but meaningless codes."""
        if layer is None:
            return x
        weight = layer.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)
        y = layer(x)
        if self.check_finite and not _compiling() and y.numel() > 0:
            lo, hi = torch.aminmax(y.detach())
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise ValueError(
                    f"{type(self).__name__}: the projection of a finite input holds NaN or "
                    "Inf: its weights are not finite (a diverged run); reload a good checkpoint"
                )
        return y

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
