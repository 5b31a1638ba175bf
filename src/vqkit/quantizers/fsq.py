"""Finite Scalar Quantization (Mentzer et al., 2023, "Finite Scalar Quantization:
VQ-VAE Made Simple").

Each of the ``d = len(levels)`` channels is squashed into a bounded interval and
rounded to one of ``L_i`` integer levels; the implicit codebook is the grid of all
``prod(L_i)`` level combinations. Nothing is learned and no codebook tensor exists:
codes and indices convert arithmetically (mixed radix), so a grid of 2**40 codes
costs no more than one of 1000.

Bound convention (how even ``L`` get exactly ``L`` integer levels):

    half_l  = (L - 1) (1 + eps) / 2            eps = 1e-3 by default
    offset  = 0.5 if L is even else 0
    shift   = atanh(offset / half_l)
    bound(z) = tanh(z + shift) * half_l - offset

so ``round(bound(z))`` takes the integer values ``-(L // 2), ..., L - 1 - L // 2``:
symmetric ``{-2, ..., 2}`` for L = 5, and for even L the paper's half-integer
offset gives the asymmetric ``{-4, ..., 3}`` for L = 8 (never a value between
levels). ``shift`` makes ``bound(0) = 0`` exactly; the paper's listing writes
``tan`` where the inverse of tanh is meant, which agrees only to first order. The
margin is ``1 + eps`` (the listing has ``1 - eps``): with ``1 - eps`` the shift of
L = 2 would need ``atanh`` of a number above 1. The open interval then reaches
``eps (L - 1) / 2`` past the outer levels, less than half a step, so rounding still
gives exactly L values.
The quantized output is the integer level divided by ``L // 2`` (values in
[-1, 1]); the digit of a channel is ``level + L // 2`` in ``[0, L)`` and the index
is ``sum_i digit_i * prod(L_0 .. L_{i-1})`` (channel 0 is the least significant).
Rounding passes gradients straight through (value exactly the rounded level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..metrics import perplexity, usage_fraction
from ..options import option
from .base import BaseQuantizer, check_indices, fp32_region
from .estimators import straight_through
from .masking import keep_rows, masked_counts
from .output import QuantizerOutput
from .registry import QuantizerOptions, register_quantizer

__all__ = ["FSQ", "FSQOptions", "parse_levels"]

DEFAULT_MAX_BINCOUNT = 2**20
"""Largest grid whose per-code counts FSQ builds with one bincount (8 MiB of int64)."""


class FSQ(BaseQuantizer):
    """Finite scalar quantizer on a grid of ``levels`` per channel; see the module
    docstring for the bound convention and the index order.

    Args:
        levels: number of levels per channel, each >= 2 (e.g. ``[8, 5, 5, 5]``:
            1000 codes; ``[8, 8, 8, 5, 5, 5]``: 64000).
        dim: input channels. Default ``len(levels)``; a larger ``dim`` adds a linear
            in-projection ``dim -> len(levels)`` before the bound and an
            out-projection back after rounding (both trained by gradient).
        eps: the bound's margin (the interval is stretched by ``1 + eps``), < 1 / (L - 1).
        max_bincount: per-code ``counts`` are built by ``bincount`` when the grid
            has at most this many codes; above it, perplexity and usage come from
            ``torch.unique`` of the batch's indices (exact, O(N log N), a host sync
            and a graph break under ``torch.compile``) and ``counts`` is None.
        channels_last, check_finite: as in :class:`~vqkit.VectorQuantizer`.
        usage_decay, process_group, sync_stats: usage tracking, as for the codebook
            quantizers (:class:`~vqkit.quantizers.CodebookQuantizer`): in training mode
            the (globally summed) per-code counts feed the ``usage_ema`` buffer, read by
            :meth:`code_usage` / :meth:`dead_codes`. Only for grids of at most
            ``max_bincount`` codes (``tracks_usage``).

    No loss terms: ``losses`` is empty and ``loss`` is a float32 zero.
    ``indices`` are int64 ``(B, *spatial)``; ``decode(indices)`` returns exactly
    ``quantized`` (float32, after the out-projection when there is one).
    """

    def __init__(
        self,
        levels: Sequence[int],
        dim: int | None = None,
        *,
        eps: float = 1e-3,
        max_bincount: int = DEFAULT_MAX_BINCOUNT,
        channels_last: bool = False,
        check_finite: bool = True,
        usage_decay: float = 0.99,
        process_group: torch.distributed.ProcessGroup | None = None,
        sync_stats: bool = True,
    ) -> None:
        levels = list(levels)
        if not levels or not all(isinstance(v, int) and v >= 2 for v in levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2; got {levels!r}")
        size = math.prod(levels)
        if size >= 2**62:
            raise ValueError(f"the grid has {size} codes; int64 indices need fewer than 2**62")
        d = len(levels)
        if dim is None:
            dim = d
        if not isinstance(dim, int) or dim < d:
            raise ValueError(f"dim must be an int >= len(levels) = {d}; got {dim!r}")
        if not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0 / (max(levels) - 1):
            raise ValueError(f"eps must lie in (0, 1 / (max(levels) - 1)); got {eps!r}")
        super().__init__(dim, channels_last=channels_last, check_finite=check_finite)
        self.levels = levels
        self.num_codes = size
        self.eps = float(eps)
        self.max_bincount = int(max_bincount)
        basis = [math.prod(levels[:i]) for i in range(d)]
        lv = torch.tensor(levels, dtype=torch.float64)
        half_l = (lv - 1) * (1 + self.eps) / 2
        offset = torch.where(lv.remainder(2) == 0, 0.5, 0.0).to(torch.float64)
        # derived from the constructor arguments: not saved in state_dict
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l).float(), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        if dim != d:
            self.project_in: nn.Linear | None = nn.Linear(dim, d)
            self.project_out: nn.Linear | None = nn.Linear(d, dim)
        else:
            self.project_in = self.project_out = None
        self._init_sync(process_group, sync_stats)
        # usage buffers only for grids whose counts are built (K floats of state)
        if size <= self.max_bincount:
            self._init_usage(size, usage_decay)

    def get_extra_state(self) -> dict[str, list[int]]:
        # the levels decide what an index means: a state of FSQ([5, 4]) must not load
        # into FSQ([4, 5])
        return {"levels": list(self.levels)}

    def set_extra_state(self, state: dict[str, list[int]]) -> None:
        if list(state.get("levels", [])) != self.levels:
            raise ValueError(
                f"FSQ state has levels {state.get('levels')} but this FSQ has {self.levels}"
            )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # states written before the levels were saved carry no check
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- the grid ---------------------------------------------------------------
    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """``tanh(z + shift) * half_l - offset`` per channel (last axis), float32."""
        z = z.to(torch.float32)
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codes (..., d) on the grid -> int64 indices (...)."""
        levels = torch.round(codes.to(torch.float32) * self._half_width).long()
        return ((levels + self._half_width.long()) * self._basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 indices (...) -> normalised codes (..., d), float32 (exact inverse of
        :meth:`codes_to_indices` on the grid)."""
        digits = torch.div(indices.long().unsqueeze(-1), self._basis, rounding_mode="floor")
        digits = digits.remainder(self._levels)
        return (digits.to(torch.float32) - self._half_width) / self._half_width

    # -- forward / decode -------------------------------------------------------
    def _quantize_flat(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim) -> (normalised codes with straight-through gradient (N, d) float32,
        indices (N,))."""
        z = self._project(self.project_in, flat)
        with fp32_region(z.device):
            bounded = self.bound(z)
            rounded = torch.round(bounded)
            hw = self._half_width
            indices = ((rounded.detach().long() + hw.long()) * self._basis).sum(-1)
            codes = straight_through(bounded, rounded) / hw
        return codes, indices

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, dim, *spatial); ``mask`` (B, *spatial), True = padded: those
        positions are left out of the counts and the usage statistic
        (:mod:`vqkit.quantizers.masking`)."""
        self._validate(x, self._levels.device)
        keep = keep_rows(mask, self.index_shape(x.shape), x.device)  # None without mask
        flat = self.to_flat(x)
        codes, indices = self._quantize_flat(flat)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        return grid_output(self, x, codes, indices, keep, loss, {})

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> int64 indices (B, *spatial)."""
        self._validate(x, self._levels.device)
        _, indices = self._quantize_flat(self.to_flat(x))
        return indices.reshape(self.index_shape(x.shape))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, *spatial) -> output (B, dim, *spatial) (or channels-last), float32."""
        check_indices(indices, self._levels.device, self.num_codes)
        codes = self.indices_to_codes(indices)
        if self.project_out is not None:
            codes = self.project_out(codes)
        return codes if self.channels_last else codes.movedim(-1, 1)

    def extra_repr(self) -> str:
        s = f"levels={self.levels}, num_codes={self.num_codes}"
        if self.project_in is not None:
            s += f", dim={self.embedding_dim}"
        extra = super().extra_repr()
        return f"{s}, {extra}" if extra else s


def grid_counts(
    q: Any, indices: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(counts, perplexity, usage)`` of a batch's indices (N,) into an implicit grid of
    ``q.num_codes`` codes (FSQ's levels, LFQ / BSQ's bit patterns), kept rows only. Up to
    ``q.max_bincount`` codes: per-code counts (K,), in training mode summed over the
    ranks and fed to the usage statistic. Above: exact from the batch's distinct codes
    (``torch.unique``, a host sync; local), counts None."""
    if q.num_codes <= q.max_bincount:
        counts = masked_counts(indices, q.num_codes, keep)
        if q.training:
            # global counts for the usage EMA, and so the metrics describe the global batch
            counts = q._global_counts(counts)
            q._track_usage(counts)
        return counts, perplexity(counts), usage_fraction(counts)
    kept = indices.reshape(-1) if keep is None else indices.reshape(-1)[keep]
    _, used = torch.unique(kept, return_counts=True)
    usage = torch.tensor(used.numel() / q.num_codes, device=indices.device)
    return None, perplexity(used), usage


def grid_output(
    q: Any,
    x: torch.Tensor,
    codes: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor | None,
    loss: torch.Tensor,
    losses: dict[str, torch.Tensor],
) -> QuantizerOutput:
    """The output of a grid quantizer (FSQ, LFQ / BSQ; ``q`` has ``project_out`` and
    ``max_bincount``) for input ``x``: ``codes`` (N, d) out-projected into ``x``'s
    layout and dtype, ``indices`` (N,) shaped as the index map, the counts of
    :func:`grid_counts` (kept rows), no distances."""
    out = q.project_out(codes) if q.project_out is not None else codes
    counts, ppl, usage = grid_counts(q, indices, keep)
    return QuantizerOutput(
        quantized=q.from_flat(out.to(x.dtype), x.shape),
        loss=loss,
        perplexity=ppl,
        indices=indices.reshape(q.index_shape(x.shape)),
        losses=losses,
        usage=usage,
        counts=counts,
        distances=None,
        num_embeddings=q.num_codes,
    )


def parse_levels(levels: str | Sequence[int]) -> list[int]:
    """``"8,5,5,5"`` or ``[8, 5, 5, 5]`` -> ``[8, 5, 5, 5]``."""
    if isinstance(levels, str):
        try:
            return [int(v) for v in levels.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"levels must be comma-separated ints; got {levels!r}") from None
    return [int(v) for v in levels]


def _levels_check(levels: str) -> str | None:
    parsed = parse_levels(levels)
    return None if parsed and min(parsed) >= 2 else "comma-separated ints >= 2"


@dataclass
class FSQOptions(QuantizerOptions):
    """Options of ``--quantizer fsq``."""

    levels: str = option(
        "8,5,5,5",
        "levels per channel, comma-separated (8,5,5,5: 1000 codes)",
        check=_levels_check,
        applies_to="fsq",
    )

    def __post_init__(self) -> None:
        # canonical string, so configs compare equal after a JSON trip
        self.levels = ",".join(str(v) for v in parse_levels(self.levels))
        super().__post_init__()

    def build(self, dim: int) -> FSQ:
        return FSQ(parse_levels(self.levels), dim)


register_quantizer("fsq", FSQOptions, "finite scalar quantization (Mentzer et al. 2023)")
