"""Grouped vector quantization: the channels split into G groups, each group quantized
by its own codebook (or one codebook shared by all groups), one index per group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..options import option, positive_int
from .base import check_indices
from .codebook_base import CodebookQuantizer
from .ema import VectorQuantizerEMA
from .masking import keep_rows
from .output import QuantizerOutput
from .registry import register_quantizer
from .residual import LayeredQuantizer, LayerKindOptions
from .vq import VectorQuantizer

__all__ = ["GroupedVQ", "GroupedVQOptions"]

GROUP_KINDS = {"vq": VectorQuantizer, "ema": VectorQuantizerEMA}


class GroupedVQ(LayeredQuantizer):
    """G codebook quantizers side by side on disjoint channel groups.

    A D-vector ``x`` is cut into ``x = [x_1, ..., x_G]`` (consecutive channels, D / G
    each); group g is quantized by its codebook (K codes of D / G dims), so a position
    carries G indices and the implicit codebook is the product of the groups' (K^G
    combinations). Exact nearest code per group; the concatenated output is the
    nearest of the K^G combinations under L2, because the distance is a sum over groups.

    Args:
        groups: G (must divide ``embedding_dim``).
        num_embeddings: K, codes per group.
        embedding_dim: D, input channels.
        group_kind: ``"vq"`` (:class:`~vqkit.VectorQuantizer`) or ``"ema"``
            (:class:`~vqkit.VectorQuantizerEMA`) per group.
        shared_groups: one codebook for all groups (its layer sees the N * G group vectors as
            one batch: one EMA update per step, one usage statistic).
        channels_last, check_finite: as in :class:`~vqkit.VectorQuantizer`.
        **group_options: passed to every group's quantizer (``commitment_cost``,
            ``decay``, ``use_cosine``, ``codebook_dim``, ``usage_decay``, ...).

    Output: ``quantized`` the concatenation (input layout and dtype); ``indices`` int64
    ``(B, *spatial, G)`` (``codes_per_position = G``); ``loss`` and each of ``losses``
    the mean over groups (so the terms are means over all N * D elements, as for one
    VQ layer); ``distances`` the total squared distance over the groups; ``counts``
    (G, K) per group, or (K,) pooled when ``shared``; ``perplexity`` / ``usage`` the
    means over groups (pooled when shared); ``stages`` each group's own output.
    ``decode`` concatenates the groups' codes (the exact inverse of ``encode``).

    Codebook health: ``supports_init`` (k-means per group; pooled over groups when
    shared); revival and the usage statistic (:meth:`code_usage`) only when ``shared``
    (one (K,) codebook: the contract's (K,) mask and statistic). Per-group statistics
    of unshared groups: ``layers[g].code_usage()`` / ``layers[g].revive_dead_codes``.
    """

    supports_init = True

    def __init__(
        self,
        groups: int,
        num_embeddings: int,
        embedding_dim: int,
        *,
        group_kind: str = "vq",
        shared_groups: bool = False,
        channels_last: bool = False,
        check_finite: bool = True,
        **group_options: Any,
    ) -> None:
        super().__init__(embedding_dim, channels_last=channels_last, check_finite=check_finite)
        if not isinstance(groups, int) or groups < 1 or embedding_dim % groups:
            raise ValueError(
                f"groups must be a positive int dividing embedding_dim={embedding_dim}; "
                f"got {groups!r}"
            )
        if group_kind not in GROUP_KINDS:
            raise ValueError(f"group_kind must be one of {sorted(GROUP_KINDS)}; got {group_kind!r}")
        if "channels_last" in group_options:
            raise ValueError("channels_last applies to the whole GroupedVQ")
        self.groups = groups
        self.num_embeddings = num_embeddings
        self.num_codes = num_embeddings
        self.codes_per_position = groups
        self.group_dim = embedding_dim // groups
        self.kind = group_kind
        self.shared = bool(shared_groups)
        self.supports_revival = self.shared
        cls = GROUP_KINDS[group_kind]
        self.layers = nn.ModuleList(
            cls(num_embeddings, self.group_dim, check_finite=False, **group_options)
            for _ in range(1 if self.shared else groups)
        )

    # -- the contract (parameters and count flags: LayeredQuantizer's) ----------------
    @property
    def tracks_usage(self) -> bool:
        return self.shared and self.layers[0].tracks_usage

    def code_usage(self) -> torch.Tensor | None:
        return self.layers[0].code_usage() if self.shared else None

    def group(self, g: int) -> CodebookQuantizer:
        """The quantizer of group ``g`` (the same module for every g when shared)."""
        return self.layers[0 if self.shared else g]  # type: ignore[return-value]

    def _parts(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, G, D / G)."""
        return flat.reshape(flat.shape[0], self.groups, self.group_dim)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """An input or flat (N, D) vectors, checked -> (N, D)."""
        self._validate(x, x.device)
        return self.to_flat(x)

    # -- forward / encode / decode ---------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, D, *spatial); ``mask`` (B, *spatial), True = padded
        (:mod:`vqkit.quantizers.masking`)."""
        self._validate(x, self.layers[0].codebook.device)
        index_shape = self.index_shape(x.shape)
        keep_rows(mask, index_shape, x.device)  # checks
        flat = self.to_flat(x)
        n, g = flat.shape[0], self.groups
        parts = self._parts(flat)
        pad = None if mask is None else mask.reshape(-1)
        if self.shared:
            o = self.layers[0](
                parts.reshape(n * g, self.group_dim),
                mask=None if pad is None else pad.repeat_interleave(g),
            )
            quantized, indices = o.quantized.reshape(n, self.embedding_dim), o.indices.reshape(n, g)
            distances = o.distances.reshape(n, g).sum(1)  # type: ignore[union-attr]
            loss, losses, counts = o.loss, o.losses, o.counts
            ppl, usage, outs = o.perplexity, o.usage, [o]
        else:
            outs = [self.layers[i](parts[:, i], mask=pad) for i in range(g)]
            quantized = torch.cat([o.quantized for o in outs], dim=1)
            indices = torch.stack([o.indices for o in outs], dim=-1)
            distances = torch.stack([o.distances for o in outs]).sum(0)  # type: ignore[misc]
            loss = torch.stack([o.loss for o in outs]).mean()
            losses = {k: torch.stack([o.losses[k] for o in outs]).mean() for k in outs[0].losses}
            counts = torch.stack([o.counts for o in outs])  # type: ignore[misc]
            ppl = torch.stack([o.perplexity for o in outs]).mean()
            usage = torch.stack([o.usage for o in outs]).mean()  # type: ignore[misc]
        return QuantizerOutput(
            quantized=self.from_flat(quantized, x.shape),
            loss=loss,
            perplexity=ppl,
            indices=indices.reshape(*index_shape, g),
            losses=losses,
            usage=usage,
            counts=counts,
            distances=distances.reshape(index_shape),
            num_embeddings=self.num_embeddings,
            stages=outs,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> int64 indices (B, *spatial, G); never updates a codebook."""
        self._validate(x, self.layers[0].codebook.device)
        parts = self._parts(self.to_flat(x))
        cols = [self.group(i).encode(parts[:, i]) for i in range(self.groups)]
        return torch.stack(cols, dim=-1).reshape(*self.index_shape(x.shape), self.groups)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, *spatial, G) -> the concatenated codes (B, D, *spatial) (or
        channels-last), float32."""
        device = self.layers[0].codebook.device
        check_indices(indices, device, self.num_embeddings)
        if indices.dim() < 2 or indices.shape[-1] != self.groups:
            raise ValueError(
                f"indices must have shape (B, *spatial, {self.groups}); got {tuple(indices.shape)}"
            )
        flat = indices.reshape(-1, self.groups)
        codes = torch.cat([self.group(i).decode(flat[:, i]) for i in range(self.groups)], dim=1)
        out = codes.reshape(*indices.shape[:-1], codes.shape[-1])
        return out if self.channels_last else out.movedim(-1, 1)

    # -- codebook health -------------------------------------------------------------
    def _init_codes(self, x: torch.Tensor, iters: int, generator: torch.Generator | None) -> None:
        """k-means of each group's codebook on that group's channels of the kept ``x``;
        pooled over the groups when shared."""
        parts = self._parts(self._flat(x))
        if self.shared:
            self.layers[0].init_codebook_kmeans(
                parts.reshape(-1, self.group_dim), iters=iters, generator=generator
            )
            return
        for i, layer in enumerate(self.layers):
            layer.init_codebook_kmeans(parts[:, i].contiguous(), iters=iters, generator=generator)

    def _revive_codes(
        self, x: torch.Tensor, threshold: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Shared codebook only (``supports_revival``): its dead codes take group
        vectors of the kept ``x``; unshared groups revive per group
        (``layers[g].revive_dead_codes``)."""
        parts = self._parts(self._flat(x))
        return self.layers[0].revive_dead_codes(
            parts.reshape(-1, self.group_dim), threshold=threshold, generator=generator
        )

    def extra_repr(self) -> str:
        s = (
            f"groups={self.groups}, num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, kind={self.kind!r}"
        )
        if self.shared:
            s += ", shared=True"
        extra = super().extra_repr()
        return f"{s}, {extra}" if extra else s


@dataclass
class GroupedVQOptions(LayerKindOptions):
    """Options of ``--quantizer gvq``: its own, and those of its group kind."""

    groups: int = option(
        2,
        "G, channel groups (must divide --embedding-dim), each with its own codebook",
        check=positive_int,
        applies_to="gvq",
    )
    group_kind: str = option(
        "vq", "quantizer of each group", choices=tuple(GROUP_KINDS), applies_to="gvq"
    )
    shared_groups: bool = option(False, "one codebook for all groups", applies_to="gvq")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_layer_kind(self.group_kind, "group_kind", "groups")

    def build(self, dim: int) -> GroupedVQ:
        return GroupedVQ(
            self.groups,
            self.num_embeddings,
            dim,
            group_kind=self.group_kind,
            shared_groups=self.shared_groups,
            **self.layer_kwargs(self.group_kind),
        )


register_quantizer("gvq", GroupedVQOptions, "grouped VQ: --groups channel groups, one index each")
