"""Multi-scale residual quantization (VAR: Tian et al. 2024, "Visual Autoregressive
Modeling", ``VectorQuantizer2`` in FoundationVision/VAR ``models/quant.py``).

One shared codebook quantizes a feature map ``f`` (B, C, H, W), ``H = W = s_{S-1}``, at
S increasing scales ``s_0 < ... < s_{S-1}``, each scale the residual the coarser ones
left:

    rest = f;  f_hat = 0
    for i in 0 .. S-1:
        r_i   = area_downsample(rest, s_i)        (the last scale: rest itself)
        k_i   = argmin_k ||r_i - e_k||^2           per position of the s_i x s_i map
        h_i   = bicubic_upsample(e[k_i], H)       (the last scale: e[k_i] itself)
        h_i   = phi_i(h_i) = (1 - ratio) h_i + ratio conv3x3_i(h_i)
        f_hat = f_hat + h_i;  rest = rest - h_i

``phi`` are VAR's residual convolutions: ``phi_convs = P`` 3x3 convs (P = 0: none,
phi is the identity; 1: one shared; P > 1: partially shared); scale i uses the conv
whose tick is nearest to ``i / (S - 1)`` (0 for S = 1) among P evenly spaced ticks
(VAR's ``linspace(1/(3P), 1 - 1/(3P), P)`` for P = 4, ``linspace(1/(2P), 1 - 1/(2P),
P)`` otherwise; ties to the lower tick, as ``np.argmin``).

The loss follows VAR's ``forward``: with ``f_hat_i`` the running sum after scale i,

    loss = 1/S sum_i [ commitment_cost * ||sg[f_hat_i] - f||^2
                       + codebook_weight * ||f_hat_i - sg[f]||^2 ]

(means over all elements; VAR's beta = ``commitment_cost``, its codebook weight is 1):
the codebook and the phi convs learn from the second term at every scale, the encoder
from the first; ``quantized`` is straight-through, ``f + sg[f_hat - f]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..metrics import dead_codes, perplexity, usage_fraction
from ..options import option, unit_interval_excl_zero
from .base import check_indices, fp32_region
from .codebook_base import CodebookLossOptions, LossTrainedQuantizer
from .estimators import mse_terms, straight_through
from .masking import masked_counts
from .output import QuantizerOutput
from .registry import register_quantizer
from .scales import parse_scales, phi_assignment, revival_quota

__all__ = ["MultiScaleOptions", "MultiScaleVQ", "parse_scales", "phi_assignment"]


class MultiScaleVQ(LossTrainedQuantizer):
    """VAR's multi-scale residual quantizer on one shared, loss-trained codebook; the
    algorithm and the loss are in the module docstring.

    Args:
        num_embeddings: K, the shared codebook's size.
        embedding_dim: C, the input channels (the codes' width).
        commitment_cost: beta of the commitment term (VAR: 0.25).
        scales: the sides ``s_0 < ... < s_{S-1}`` (a list or ``"1,2,3,4,5,6,8"``); the
            input must be ``(B, C, s_{S-1}, s_{S-1})``.
        phi_convs: P, the number of phi convs (0: none, 1: shared; VAR: 4).
        phi_ratio: the residual ratio of phi, in (0, 1] (VAR: 0.5).
        codebook_weight: weight of the codebook term (VAR: 1).
        **options: ``channels_last``, ``check_finite``, ``max_scratch_bytes``,
            ``search_backend``, ``usage_decay``, ``process_group``, ``sync_stats`` as
            for :class:`~vqkit.quantizers.CodebookQuantizer`. Not supported (refused):
            ``codebook_dim`` (factorised codes), ``use_cosine``, ``gradient="rotation"``.

    **Codes.** A map's codes do not lie on one grid, so ``indices`` (and ``encode``) are
    every scale's codes flattened row-major and concatenated coarse to fine: int64
    ``(B, L)``, ``L = sum s_i^2`` (the order of VAR's ``idx_Bl`` lists, concatenated).
    :meth:`split_codes` gives the per-scale maps ``[(B, s_i, s_i)]``;
    :meth:`decode` reconstructs from the first N scales (progressive decoding).
    ``num_codes`` = K (each index takes K values); ``codes_per_position`` = 1 and
    :meth:`code_shape` is ``(L,)``: the index map is the sequence ``(B, L)``, not the input's
    grid. ``forward`` takes no padding mask (a padded position has no meaning at a
    coarser scale): a mask is refused.

    **Statistics.** ``counts`` is int64 (S, K), each scale's assignments (global in
    training); ``perplexity`` and ``usage`` are those of all scales' assignments pooled
    (the one codebook's health); ``stages`` holds each scale's own output (indices and
    distances (B, s_i, s_i), its counts (K,), perplexity, usage, its weighted loss term;
    ``quantized`` its phi'd upsampled codes ``h_i``). ``code_usage()`` is the EMA of the
    pooled counts (what revival reads); :meth:`scale_code_usage` the (S, K) EMA per scale.

    **Codebook health.** k-means init is the base's (vectors of the input ``x`` at full
    resolution). Revival is per scale, so that it cannot starve the coarse scales,
    which see few positions (one per image at 1 x 1, against 64 at 8 x 8):

    * a code is dead (:meth:`dead_codes`) only when **every** scale uses it less than
      its share of the threshold, ``threshold * s_i^2 / sum_j s_j^2`` per global batch
      (a code a 1 x 1 scale uses at the uniform rate is alive; pooled, it would count
      as dead and be taken away from that scale at every revival);
    * a dead code takes a vector of what some scale searches, its residual ``r_i``
      (:meth:`scale_residuals`; not ``f``, which no scale but the last searches); the
      dead codes are shared among the scales in proportion to each scale's deficit, K
      minus the codes alive at that scale (:func:`revival_quota`), so revival feeds
      the scales that use the fewest codes, the coarse ones first;
    * a revived code's usage restarts at the threshold at every scale (a flat (N, C)
      input to revival is taken as given).

    The phi convs are float32 parameters trained at the model's learning rate (as in
    VAR); ``codebook_lr_parameters()`` is the codebook only. The residual pass runs in
    float32, also under autocast; no N x K tensor is built (:func:`vqkit.search.nearest_code`).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        *,
        scales: str | Sequence[int] = (1, 2, 3, 4, 5, 6, 8),
        phi_convs: int = 4,
        phi_ratio: float = 0.5,
        **options: Any,
    ) -> None:
        if options.get("codebook_dim") not in (None, embedding_dim):
            raise ValueError("MultiScaleVQ does not support codebook_dim (yet); leave it unset")
        if options.get("use_cosine") or options.get("l2_normalize"):
            raise ValueError("MultiScaleVQ does not support use_cosine (yet); leave it off")
        if options.get("gradient", "ste") != "ste":
            raise ValueError("MultiScaleVQ supports only gradient='ste' (straight-through)")
        if isinstance(phi_convs, bool) or not isinstance(phi_convs, int) or phi_convs < 0:
            raise ValueError(f"phi_convs must be an int >= 0; got {phi_convs!r}")
        if not isinstance(phi_ratio, (int, float)) or not 0.0 < phi_ratio <= 1.0:
            raise ValueError(f"phi_ratio must lie in (0, 1]; got {phi_ratio!r}")
        self.scales = parse_scales(scales)
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **options)
        self.phi_ratio = float(phi_ratio)
        self.phis = nn.ModuleList(
            nn.Conv2d(embedding_dim, embedding_dim, 3, padding=1) for _ in range(phi_convs)
        )
        self.phi_of_scale = phi_assignment(len(self.scales), phi_convs)
        self.reset_parameters()
        if self.tracks_usage:
            self.register_buffer("scale_usage_ema", torch.zeros(len(self.scales), num_embeddings))

    def _make_codes(self) -> None:
        self.codebook = nn.Parameter(torch.empty(self.num_embeddings, self.codebook_dim))

    def reset_parameters(self) -> None:
        k = self.num_embeddings
        nn.init.uniform_(self.codebook, -1.0 / k, 1.0 / k)  # as VectorQuantizer
        for conv in self.phis:
            conv.reset_parameters()

    # -- the index layout ----------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def code_length(self) -> int:
        """L = sum s_i^2, the codes of one map."""
        return sum(s * s for s in self.scales)

    def code_shape(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """``(L,)``: one map's codes, every scale's flattened coarse to fine, for the
        grid the last scale must equal."""
        return (self.code_length,)

    def code_group_shapes(self, grid: tuple[int, ...]) -> list[tuple[int, ...]]:
        """``[(s, s) for s in scales]``: the maps :meth:`code_shape`'s sequence holds."""
        return [(s, s) for s in self.scales]

    @property
    def code_groups(self) -> tuple[str, ...]:
        """The scales, coarse to fine, named by their sides (``"1x1"`` ... ``"8x8"``): the
        rows of ``counts`` (S, K)."""
        return tuple(f"{s}x{s}" for s in self.scales)

    def group_code_usage(self) -> torch.Tensor | None:
        """:meth:`scale_code_usage`, (S, K)."""
        return self.scale_code_usage()

    def code_prefix(self, codes: torch.Tensor, n: int) -> torch.Tensor:
        """``(B, L')`` codes -> the first ``n`` scales' ``(B, sum_{i<n} s_i^2)``; ``n`` must
        lie in [1, the scales ``L'`` holds] (UserError, one line)."""
        try:
            held = self._prefix_scales(codes)
        except ValueError as e:
            raise UserError(str(e)) from None
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= held:
            raise UserError(
                f"the number of scales must be an int in [1, {held}] (the scales "
                f"{','.join(map(str, self.scales[:held]))} these codes hold); got {n!r}"
            )
        return codes[:, : sum(s * s for s in self.scales[:n])]

    def split_codes(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """``(B, L')`` codes, L' a prefix length ``sum_{i<N} s_i^2`` -> the first N
        scales' maps ``[(B, s_i, s_i)]``."""
        n = self._prefix_scales(codes)
        out, at = [], 0
        for s in self.scales[:n]:
            out.append(codes[:, at : at + s * s].reshape(codes.shape[0], s, s))
            at += s * s
        return out

    def _prefix_scales(self, codes: torch.Tensor) -> int:
        lengths = [0]
        for s in self.scales:
            lengths.append(lengths[-1] + s * s)
        if codes.dim() != 2 or codes.shape[1] not in lengths[1:]:
            raise ValueError(
                f"codes must have shape (B, L) with L the codes of the first N scales of "
                f"{','.join(map(str, self.scales))} (one of {lengths[1:]}); "
                f"got {tuple(codes.shape)}"
            )
        return lengths.index(codes.shape[1])

    # -- the residual pass -----------------------------------------------------------
    def _phi(self, i: int, h: torch.Tensor) -> torch.Tensor:
        j = self.phi_of_scale[i]
        if j is None:
            return h
        return h * (1.0 - self.phi_ratio) + self.phis[j](h) * self.phi_ratio

    def _scale_term(self, i: int, codes: torch.Tensor) -> torch.Tensor:
        """h_i: scale i's codes (B, s_i, s_i) -> (B, C, H, W), upsampled (not the last
        scale) and phi'd, float32."""
        h = F.embedding(codes, self.codebook).permute(0, 3, 1, 2)
        side = self.scales[-1]
        if i != self.num_scales - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self._phi(i, h.contiguous())

    def _grid_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as channels-first float32 (B, C, H, W); one line when its grid is
        not the last scale's."""
        grid = tuple(x.shape[1:-1]) if self.channels_last else tuple(x.shape[2:])
        if grid != (self.scales[-1],) * 2:
            raise UserError(
                f"MultiScaleVQ: the last scale ({self.scales[-1]}) must equal the input's "
                f"grid; got a {' x '.join(map(str, grid)) or 'no'} grid with scales "
                f"{','.join(map(str, self.scales))}"
            )
        f = x.movedim(-1, 1) if self.channels_last else x
        return f.to(torch.float32)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, C, H, W), H = W = the last scale; see the class docstring
        for the output."""
        if mask is not None:
            raise ValueError("MultiScaleVQ takes no padding mask")
        self._validate(x, self.codebook.device)
        with fp32_region(x.device):
            f = self._grid_input(x)
            b, c = f.shape[:2]
            f_ng = f.detach()
            rest = f_ng
            f_hat = torch.zeros_like(f_ng)
            last = self.num_scales - 1
            cols, dists, counts, stages = [], [], [], []
            book = commit = None
            for i, s in enumerate(self.scales):
                r = rest if i == last else F.interpolate(rest, size=(s, s), mode="area")
                idx, dist = self._assign(r.permute(0, 2, 3, 1).reshape(-1, c))
                h = self._scale_term(i, idx.reshape(b, s, s))
                f_hat = f_hat + h
                rest = rest - h.detach()
                terms = mse_terms(
                    f, f_hat
                )  # codebook: ||f_hat - sg f||, commitment: ||sg f_hat - f||
                book = terms["codebook"] if book is None else book + terms["codebook"]
                commit = terms["commitment"] if commit is None else commit + terms["commitment"]
                cols.append(idx.reshape(b, s * s))
                dists.append(dist.reshape(b, s * s))
                counts.append(masked_counts(idx, self.num_embeddings, None))
                term = self.codebook_weight * terms["codebook"]
                stages.append((h, term + self.commitment_cost * terms["commitment"]))
            assert book is not None and commit is not None
            losses = {"codebook": book / self.num_scales, "commitment": commit / self.num_scales}
            loss = self.codebook_weight * losses["codebook"]
            loss = loss + self.commitment_cost * losses["commitment"]
            all_counts = torch.stack(counts)  # (S, K)
            if self.training:
                all_counts = self._global_counts(all_counts)
                if self.tracks_usage:
                    self._track_usage(all_counts.sum(0))
                    self._track_scale_usage(all_counts)
            pooled = all_counts.sum(0)
            q = f_hat if not self.channels_last else f_hat.movedim(1, -1)
            quantized = straight_through(x, q.to(x.dtype))
        indices, distances = torch.cat(cols, 1), torch.cat(dists, 1)
        per_scale = [
            QuantizerOutput(
                quantized=h,
                loss=term,
                perplexity=perplexity(all_counts[i]),
                indices=cols[i].reshape(b, s, s),
                usage=usage_fraction(all_counts[i]),
                counts=all_counts[i],
                distances=dists[i].reshape(b, s, s),
                num_embeddings=self.num_embeddings,
            )
            for i, (s, (h, term)) in enumerate(zip(self.scales, stages, strict=True))
        ]
        return QuantizerOutput(
            quantized=quantized,
            loss=loss,
            perplexity=perplexity(pooled),
            indices=indices,
            losses=losses,
            usage=usage_fraction(pooled),
            counts=all_counts,
            distances=distances,
            num_embeddings=self.num_embeddings,
            stages=per_scale,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input (B, C, H, W) -> int64 codes (B, L), every scale coarse to fine."""
        cols, _ = self._residual_pass(x)
        return torch.cat(cols, 1)

    @torch.no_grad()
    def scale_residuals(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) -> the residuals ``r_i`` each scale searches, ``[(B s_i^2, C)]``."""
        return self._residual_pass(x)[1]

    def _residual_pass(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The encoder's pass: each scale's codes (B, s_i^2) and searched rows (B s_i^2, C)."""
        self._validate(x, self.codebook.device)
        with fp32_region(x.device):
            rest = self._grid_input(x)
            b, c = rest.shape[:2]
            cols, rows = [], []
            for i, s in enumerate(self.scales):
                last = i == self.num_scales - 1
                r = rest if last else F.interpolate(rest, size=(s, s), mode="area")
                flat = r.permute(0, 2, 3, 1).reshape(-1, c)
                idx, _ = self._assign(flat)
                cols.append(idx.reshape(b, s * s))
                rows.append(flat)
                if not last:
                    rest = rest - self._scale_term(i, idx.reshape(b, s, s))
        return cols, rows

    # -- codebook health per scale ----------------------------------------------------
    def position_shares(self) -> torch.Tensor:
        """Float32 (S,): each scale's share of a map's positions, ``s_i^2 / sum_j s_j^2``."""
        sides = torch.tensor(self.scales, dtype=torch.float32, device=self.codebook.device)
        return sides**2 / (sides**2).sum()

    def dead_codes(self, threshold: float = 1.0) -> torch.Tensor:
        """Bool (K,): codes that every scale uses less than its share of ``threshold``
        per global batch (see the class docstring)."""
        usage = self.scale_code_usage()
        if usage is None:
            raise RuntimeError(f"{type(self).__name__} does not track code usage")
        return dead_codes(usage, threshold * self.position_shares()[:, None]).all(0)

    def _revive_codes(
        self, x: torch.Tensor, threshold: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Dead codes go to the scales in proportion to each scale's deficit (K minus the
        codes alive at that scale), each taking random rows of its scale's residuals;
        a flat input as given."""
        if x.dim() == 2:
            return super()._revive_codes(x, threshold, generator)
        dead = self.dead_codes(threshold)
        usage = self.scale_code_usage()
        assert usage is not None  # dead_codes needs it
        alive = usage >= threshold * self.position_shares()[:, None]
        quota = revival_quota(int(dead.sum()), self.num_embeddings - alive.sum(1))
        order = dead.nonzero().flatten()  # the dead codes, split among scales in order
        revived = torch.zeros_like(dead)
        new = torch.zeros_like(self.codebook, dtype=torch.float32)
        at = 0
        for rows, n in zip(self.scale_residuals(x), quota, strict=True):
            if n == 0:
                continue
            mine = torch.zeros_like(dead)
            mine[order[at : at + n]] = True
            at += n
            got, vectors = self._replacements(rows, mine, generator)
            self._set_codes(got, vectors)
            new = torch.where(got[:, None], vectors, new)
            revived |= got
        self._restart_codes(revived, new, threshold)
        return revived

    def decode(self, indices: torch.Tensor, num_scales: int | None = None) -> torch.Tensor:
        """Codes (B, L') -> f_hat after the first N scales, float32 (B, C, H, W) (or
        channels-last), H = W the last scale. N is ``num_scales``, or (None) the scales
        that ``L'`` holds (a prefix of the concatenation); with N = S this is exactly
        the forward's ``quantized`` value."""
        check_indices(indices, self.codebook.device, self.num_embeddings)
        held = self._prefix_scales(indices)
        n = held if num_scales is None else num_scales
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= held:
            raise ValueError(f"num_scales must be an int in [1, {held}]; got {num_scales!r}")
        maps = self.split_codes(indices.long())
        with fp32_region(indices.device):
            f_hat = None
            for i in range(n):
                h = self._scale_term(i, maps[i])
                f_hat = h if f_hat is None else f_hat + h
        assert f_hat is not None
        return f_hat.movedim(1, -1) if self.channels_last else f_hat

    lookup = decode

    @torch.no_grad()
    def _track_scale_usage(self, counts: torch.Tensor) -> None:
        """One EMA step of ``scale_usage_ema`` (S, K) with the decay and the condition of
        ``usage_ema`` (a globally empty batch changes nothing)."""
        counts = counts.to(self.scale_usage_ema.dtype)
        decay = torch.where(counts.sum() > 0, self.usage_decay, 1.0)
        self.scale_usage_ema.mul_(decay).add_(counts * (1.0 - decay))

    def scale_code_usage(self) -> torch.Tensor | None:
        """Float32 (S, K): expected assignments of each code at each scale per (global)
        training batch (EMA, debiased like :meth:`code_usage`); None when not tracked."""
        if not self.tracks_usage:
            return None
        return self.scale_usage_ema / self._usage_debias()

    @torch.no_grad()
    def _restart_statistics(self) -> None:
        super()._restart_statistics()
        self.scale_usage_ema.zero_()

    @torch.no_grad()
    def _restart_codes(
        self, revived: torch.Tensor, vectors: torch.Tensor, threshold: float
    ) -> None:
        """A revived code counts as used at its share of ``threshold`` at every scale (one
        usage horizon to be picked), and at ``threshold`` pooled."""
        super()._restart_codes(revived, vectors, threshold)
        start = threshold * self.position_shares()[:, None] * self._usage_debias()
        self.scale_usage_ema.copy_(torch.where(revived, start, self.scale_usage_ema))

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, commitment_cost={self.commitment_cost}"
        s += f", scales={','.join(map(str, self.scales))}, phi_convs={len(self.phis)}"
        return s + f", phi_ratio={self.phi_ratio}"


@dataclass
class MultiScaleOptions(CodebookLossOptions):
    """Options of ``--quantizer multiscale``."""

    scales: str = option(
        "1,2,3,4,5,6,8",
        "sides of the scales, strictly increasing, the last the encoder's grid",
        check=lambda v: None if _scales_ok(v) else "strictly increasing positive ints",
        applies_to="multiscale",
    )
    phi_convs: int = option(
        4,
        "VAR's phi: 3x3 convs on each scale's upsampled codes (0: none, 1: shared, "
        "more: partially shared)",
        check=lambda v: None if v >= 0 else "an int >= 0",
        applies_to="multiscale",
    )
    phi_ratio: float = option(
        0.5,
        "phi's residual ratio: h (1 - ratio) + conv(h) ratio",
        check=unit_interval_excl_zero,
        applies_to="multiscale",
    )

    def __post_init__(self) -> None:
        if _scales_ok(self.scales):  # canonical string: configs compare equal after JSON
            self.scales = ",".join(str(v) for v in parse_scales(self.scales))
        super().__post_init__()

    def build(self, dim: int) -> MultiScaleVQ:
        kw = self.codebook_kwargs()
        kw["codebook_weight"] = self.codebook_weight
        return MultiScaleVQ(
            self.num_embeddings,
            dim,
            scales=self.scales,
            phi_convs=self.phi_convs,
            phi_ratio=self.phi_ratio,
            **kw,
        )


def _scales_ok(v: Any) -> bool:
    try:
        parse_scales(v)
    except ValueError:
        return False
    return True


register_quantizer(
    "multiscale", MultiScaleOptions, "VAR's multi-scale residual VQ: --scales, one codebook"
)
