"""Index backpropagation quantization (Shi et al. 2024, "Taming Scalable Visual
Tokenizer for Autoregressive Image Generation", IBQ): the hard code in the forward,
a softmax over ALL codes in the backward, so every code receives gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..options import nonneg, option, positive
from ..search import nearest_code
from .base import check_positive, check_weights, fp32_region
from .codebook_base import CodebookLossOptions, EntropyOptions, LossTrainedQuantizer
from .masking import keep_rows, masked_counts, masked_mean, masked_mse_terms
from .output import QuantizerOutput
from .registry import register_quantizer
from .softmax_entropy import (
    IBQ_SCRATCH_BYTES,
    LOG2E,
    check_terms_args,
    clamped_exp2,
    ibq_scratch_bytes,
    ibq_terms,
    row_max,
    whole_rows,
)

__all__ = ["IBQ", "IBQOptions", "ibq_lookup"]


_MAX_TILE_N = 4096
_MAX_TILE_K = 2048
_FUSED_MIN_ROWS = 64
""":func:`ibq_lookup` uses the whole-row Function where its tiles hold this many rows."""


def _tiles(n: int, k: int, itemsize: int, scratch: int) -> tuple[int, int]:
    budget = max(1, scratch // (2 * itemsize))  # two (rows x codes) tiles live at once
    tile_k = max(1, min(k, _MAX_TILE_K, budget))
    return max(1, min(max(n, 1), _MAX_TILE_N, budget // tile_k)), tile_k


def _tile_buffer(tile_n: int, tile_k: int, like: torch.Tensor) -> torch.Tensor | None:
    """A flat scratch reused by every tile of one pass (eager only): fresh tile-sized
    allocations fragment glibc's heap (RSS grew ~4x over the live tiles). Dynamo cannot
    trace ``out=`` into views of it, so compiled graphs allocate per tile instead."""
    if torch.compiler.is_compiling():
        return None
    return torch.empty(tile_n * tile_k, dtype=like.dtype, device=like.device)


def _mm(a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """``a @ b``, written into the front of ``buf`` when there is one."""
    if buf is None:
        return a @ b
    return torch.mm(a, b, out=buf[: a.shape[0] * b.shape[1]].view(a.shape[0], b.shape[1]))


class _IBQLookup(torch.autograd.Function):
    """Forward: ``E[argmax_k x.e_k]`` (N, d) and the indices; backward: the gradient of
    ``q @ E`` with ``q = onehot + p - sg[p]``, ``p = softmax(x E^T)``, without N x K.

    With ``g = dL/dout`` (N, d) and ``zbar = p @ E`` (N, d), ``s_nk = x_n.e_k``:

        dL/ds_nk = p_nk (g_n.e_k - g_n.zbar_n)
        dL/dx_n  = sum_k dL/ds_nk e_k
        dL/de_k  = sum_n [argmax_n = k] g_n + sum_n dL/ds_nk x_n

    (``q``'s VALUE is the one-hot, so ``d(q @ E)/dE`` routes ``g`` to the chosen code
    only; the softmax path adds the second sum.) The forward walks code tiles with an
    online softmax (running max ``m``, running sum of ``exp(s - m)`` and running
    ``sum exp(s - m) e``, rescaled when ``m`` grows, as in flash attention; each
    exponential as ``exp2`` of base-2 logits, clamped as in
    :mod:`~vqkit.quantizers.softmax_entropy`) and saves
    ``x, E``, the log-sum-exp (N,), ``zbar`` (N, d) and the indices; the backward
    recomputes each tile's logits from them. Peak extra memory: two (tile_n x tile_k)
    tiles plus O((N + K) d). Ties go to the lowest index (strict ``>`` across tiles,
    first maximum within one), as ``torch.argmax``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, e: torch.Tensor, tile_n: int, tile_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # autocast off in both passes: AOT autograd traces them under the caller's autocast
        with fp32_region(x.device):
            return _IBQLookup._forward(ctx, x, e, tile_n, tile_k)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor, _g_idx: Any) -> tuple[torch.Tensor | None, ...]:
        with fp32_region(g.device):
            return _IBQLookup._backward(ctx, g)

    @staticmethod
    def _forward(
        ctx: Any, x: torch.Tensor, e: torch.Tensor, tile_n: int, tile_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = x.shape[0], e.shape[0]
        idx_parts, lse_parts, zbar_parts = [], [], []
        buf = _tile_buffer(min(tile_n, n), min(tile_k, k), x)
        for r0 in range(0, n, tile_n):
            xb = x[r0 : r0 + tile_n]
            best = bidx = m = s = acc = None
            for c0 in range(0, k, tile_k):
                et = e[c0 : c0 + tile_k]
                lg = _mm(xb, et.t(), buf)
                tmax, targ = row_max(lg)  # the first maximum within the tile
                if best is None:
                    best, bidx, m = tmax, targ, tmax
                    pe = clamped_exp2(lg.sub_(m.unsqueeze(1)).mul_(LOG2E), lg)  # one live tile
                    s, acc = pe.sum(1), pe @ et
                    continue
                better = tmax > best  # strict: an earlier tile wins ties
                best = torch.where(better, tmax, best)
                bidx = torch.where(better, targ + c0, bidx)
                m_new = torch.maximum(m, tmax)
                alpha = torch.exp(m - m_new)
                pe = clamped_exp2(lg.sub_(m_new.unsqueeze(1)).mul_(LOG2E), lg)
                s = s * alpha + pe.sum(1)
                acc = torch.addmm(acc * alpha.unsqueeze(1), pe, et)
                m = m_new
            assert m is not None and s is not None and acc is not None and bidx is not None
            idx_parts.append(bidx)
            lse_parts.append(m + s.log())
            zbar_parts.append(acc / s.unsqueeze(1))
        if n == 0:
            idx = torch.empty(0, dtype=torch.int64, device=x.device)
            lse = x.new_empty(0)
            zbar = x.new_empty(0, x.shape[1])
        else:
            idx, lse, zbar = torch.cat(idx_parts), torch.cat(lse_parts), torch.cat(zbar_parts)
        ctx.save_for_backward(x, e, lse, zbar, idx)
        ctx.tiles = (tile_n, tile_k)
        ctx.mark_non_differentiable(idx)
        return F.embedding(idx, e), idx

    @staticmethod
    def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, e, lse, zbar, idx = ctx.saved_tensors
        tile_n, tile_k = ctx.tiles
        need_x, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = g.to(x.dtype).contiguous()  # an expanded (stride-0) grad made each tile GEMM copy
        gz = (g * zbar).sum(1)  # g_n . zbar_n
        de = torch.zeros_like(e) if need_e else None
        dx_parts = []
        n, k = x.shape[0], e.shape[0]
        buf_p, buf_s = (
            _tile_buffer(min(tile_n, n), min(tile_k, k), x),
            _tile_buffer(min(tile_n, n), min(tile_k, k), x),
        )
        for r0 in range(0, n, tile_n):
            xb, gb = x[r0 : r0 + tile_n], g[r0 : r0 + tile_n]
            lseb = lse[r0 : r0 + tile_n].unsqueeze(1) * LOG2E  # base 2, as the forward
            gzb = gz[r0 : r0 + tile_n].unsqueeze(1)
            dxb = torch.zeros_like(xb) if need_x else None
            for c0 in range(0, k, tile_k):
                et = e[c0 : c0 + tile_k]
                lg = _mm(xb, et.t(), buf_p).mul_(LOG2E).sub_(lseb)
                p = clamped_exp2(lg, lg)  # softmax(x E^T) of this tile
                ds = _mm(gb, et.t(), buf_s).sub_(gzb).mul_(p)  # dL/ds for this tile
                if dxb is not None:
                    dxb.addmm_(ds, et)
                if de is not None:
                    de[c0 : c0 + tile_k].addmm_(ds.t(), xb)
            if dxb is not None:
                dx_parts.append(dxb)
        dx = None
        if need_x:
            dx = torch.cat(dx_parts) if dx_parts else torch.zeros_like(x)
        if de is not None:
            de.index_add_(0, idx, g)  # the hard one-hot's share: g to the chosen code
        return dx, de, None, None


def ibq_lookup(
    x: torch.Tensor,
    codebook: torch.Tensor,
    max_scratch_bytes: int = IBQ_SCRATCH_BYTES,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IBQ's straight-through-softmax lookup of rows ``x`` (N, d) in ``codebook`` (K, d)
    (same floating dtype): ``(codes (N, d), indices (N,))`` with the value
    ``codebook[argmax_k x.e_k]`` exactly and the gradient of ``(onehot + p - sg[p]) @ E``,
    ``p = softmax(x E^T)``, to ``x`` and ``codebook``; memory bounded by
    ``max_scratch_bytes``.

    Two exact ways, chosen by how many whole rows of K codes fit the bound: at least
    64 (K <= 2^14 at the default 16 MiB), the whole-row Function
    (:func:`~vqkit.quantizers.softmax_entropy.ibq_terms` without the entropy: five
    N x D x K products, each row's softmax complete in its tile); fewer, the code-tiled
    :class:`_IBQLookup` (six products, but (1024 x 2048) tiles that stream the codebook
    once per 1024 rows). Measured for the lookup alone, N = 2048, 1 thread: at
    K = 2^14 the whole-row one 4-9 % faster in each of five interleaved rounds (417
    against 433 ms, medians); at K = 2^18 (4-row tiles) 3.6x slower. Wrong shapes,
    dtypes or devices raise a one-line error, and so do NaN/Inf with ``check_finite``
    (:func:`~vqkit.quantizers.softmax_entropy.check_terms_args`)."""
    check_terms_args(x, codebook, None, max_scratch_bytes, check_finite, "ibq_lookup")
    if whole_rows(codebook.shape[0], x.element_size(), max_scratch_bytes) >= _FUSED_MIN_ROWS:
        q, idx, _, _ = ibq_terms(
            x, codebook, None, max_scratch_bytes=max_scratch_bytes, check_finite=False
        )
        return q, idx
    tile_n, tile_k = _tiles(x.shape[0], codebook.shape[0], x.element_size(), max_scratch_bytes)
    return _IBQLookup.apply(x, codebook, tile_n, tile_k)


class IBQ(LossTrainedQuantizer):
    """Index backpropagation quantizer.

    Logits ``s_nk = x_n.e_k`` (inner products, not distances), index ``k_n = argmax_k
    s_nk``, output ``q_n = sum_k (onehot + p - sg[p])_nk e_k`` with ``p = softmax(s)``:
    value exactly ``e_{k_n}``, gradient through the softmax to ``x`` and to EVERY code
    (:func:`ibq_lookup`; tiled, never N x K, in forward and backward). Unlike the other
    quantizers the output is not straight-through from ``x``: its gradient reaches ``x``
    through the logits only. In eval mode (or without gradient) the index is found by
    the tiled search alone (:func:`vqkit.search.nearest_code` with zero code norms:
    ``argmin -2 x.e = argmax x.e``).

    Loss (float32; means over the kept positions and all channels), the paper's
    reference code's three terms::

        codebook    = mean ||sg[x] - e_k||^2
        commitment  = mean ||x - sg[e_k]||^2
        double_quant = mean ||q - x||^2     (q the IBQ output: gradient to x directly
                                             and, through the softmax, to x and E)
        loss = codebook_weight * codebook + commitment_cost * commitment
               + double_quant_weight * double_quant

    The reference code weights them (codebook 0.25, commitment 1, double 1): use
    ``commitment_cost=1.0, codebook_weight=0.25`` for that; the defaults keep vqkit's
    VQ convention (beta = 0.25 on the commitment).

    Entropy penalty (training mode, ``entropy_weight > 0``; the paper's configurations
    all use it: weight 0.05, temperature 0.01, both terms weighted 1), over
    ``p_n = softmax(x_n E^T / entropy_temperature)``::

        entropy = mean_n H(p_n) - diversity_gamma * H(mean_n p_n)
        loss   += entropy_weight * entropy

    exact and tiled, in one pass each way with the lookup
    (:func:`~vqkit.quantizers.softmax_entropy.ibq_terms`: never N x K), the batch
    term over the global batch under torch.distributed.
    Without it, inner-product argmax lets a few codes of large norm take every vector:
    a CIFAR-10 run at K = 16384 fell to one code within 100 steps.

    Args:
        num_embeddings, embedding_dim, commitment_cost, codebook_weight: as for
            :class:`~vqkit.VectorQuantizer`; codes initialised N(0, 1).
        double_quant_weight: weight of the double-quantization term.
        entropy_weight, diversity_gamma, entropy_temperature: the entropy penalty
            (0 switches it off).
        **codebook_options: ``codebook_dim`` (projections), ``max_scratch_bytes``
            (the IBQ tiles and the eval search; default
            :func:`~vqkit.quantizers.softmax_entropy.ibq_scratch_bytes`: 16 MiB up to
            K = 2^16, 256 bytes a code above),
            ``search_backend``, usage tracking options. ``use_cosine`` and
            ``gradient="rotation"`` do not apply.

    Init and revival: not supported (``supports_init = supports_revival = False``).
    With inner-product logits a code can only be chosen if it lies on the convex hull
    of the codebook; k-means centroids and revived data vectors mostly fall inside it
    and are never picked. The reference initialisation, N(0, 1) codes (nn.Embedding's),
    puts the codes at about equal norms, so every code starts on the hull. Measured
    (CIFAR-10, K = 1024, 400 steps, entropy on): k-means init + revival every 20
    steps ended with 58 codes used on the eval images (NMSE 0.33); N(0, 1) codes
    without revival with 396 (NMSE 0.22).
    """

    supports_init = False
    supports_revival = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        *,
        double_quant_weight: float = 1.0,
        entropy_weight: float = 0.05,
        diversity_gamma: float = 1.0,
        entropy_temperature: float = 0.01,
        **codebook_options: Any,
    ) -> None:
        if codebook_options.get("use_cosine") or codebook_options.get("l2_normalize"):
            raise ValueError("IBQ's logits are inner products; use_cosine does not apply")
        if codebook_options.get("gradient", "ste") != "ste":
            raise ValueError("IBQ has its own gradient estimator; gradient must be 'ste'")
        check_weights(
            double_quant_weight=double_quant_weight,
            entropy_weight=entropy_weight,
            diversity_gamma=diversity_gamma,
        )
        check_positive(entropy_temperature=entropy_temperature)
        codebook_options.setdefault("max_scratch_bytes", ibq_scratch_bytes(num_embeddings))
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **codebook_options)
        self.double_quant_weight = float(double_quant_weight)
        self.entropy_weight = float(entropy_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.entropy_temperature = float(entropy_temperature)

    def _make_codes(self) -> None:
        self.codebook = nn.Parameter(torch.empty(self.num_embeddings, self.codebook_dim))
        nn.init.normal_(self.codebook)  # the reference (nn.Embedding): codes of ~equal norm

    def _assign(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Largest inner product per row: (indices (N,), sq. distances to those codes)."""
        e = self.codebook.detach().to(torch.float32)
        zero = torch.zeros(e.shape[0], dtype=torch.float32, device=e.device)
        idx, _ = nearest_code(flat, e, code_sqnorm=zero, max_scratch_bytes=self.max_scratch_bytes)
        diff = flat.detach().to(torch.float32) - F.embedding(idx, e)
        return idx, (diff * diff).sum(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, C, *spatial); ``mask`` (B, *spatial), True = padded
        (:mod:`vqkit.quantizers.masking`)."""
        self._validate(x, self.codebook.device)
        index_shape = self.index_shape(x.shape)
        keep = keep_rows(mask, index_shape, x.device)
        flat = self._search_input(self.to_flat(x))
        with fp32_region(x.device):
            f32 = flat.to(torch.float32)
            e = self.codebook.to(torch.float32)
            soft = self.training and torch.is_grad_enabled()
            soft = soft and (f32.requires_grad or e.requires_grad)
            use_entropy = self.training and self.entropy_weight > 0
            if soft and not use_entropy:  # the lookup alone
                q, indices = ibq_lookup(f32, e, self.max_scratch_bytes, self.check_finite)
                hard = F.embedding(indices, e)
                distances = ((f32.detach() - hard.detach()) ** 2).sum(1)
            elif use_entropy:
                # one tiled pass each way for the lookup and the entropy penalty
                q, indices, per, batch = ibq_terms(
                    f32,
                    e,
                    self.entropy_temperature if use_entropy else None,
                    keep,
                    lookup=soft,
                    sync=self.sync_stats,
                    group=self.process_group,
                    max_scratch_bytes=self.max_scratch_bytes,
                    check_finite=self.check_finite,
                )
                hard = F.embedding(indices, e)
                q = q if soft else hard
                distances = ((f32.detach() - hard.detach()) ** 2).sum(1)
            else:
                indices, distances = self._assign(f32)
                q = hard = F.embedding(indices, e)
            losses = masked_mse_terms(f32, hard, keep)
            losses["double_quant"] = masked_mean((q - f32).pow(2).mean(1), keep)
            loss = (
                self.codebook_weight * losses["codebook"]
                + self.commitment_cost * losses["commitment"]
                + self.double_quant_weight * losses["double_quant"]
            )
            if use_entropy:
                entropy = per - self.diversity_gamma * batch
                losses.update(per_sample_entropy=per, batch_entropy=batch, entropy=entropy)
                loss = loss + self.entropy_weight * entropy
        counts = masked_counts(indices, self.num_embeddings, keep)
        if self.training:
            counts = self._global_counts(counts)
            self._track_usage(counts)
        out = self.project_out(q) if self.project_out is not None else q
        quantized = self.from_flat(out.to(x.dtype), x.shape)
        return self._pack(x, quantized, indices, distances, counts, losses, loss)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, commitment_cost={self.commitment_cost}, "
            f"double_quant_weight={self.double_quant_weight}, "
            f"entropy_weight={self.entropy_weight}, diversity_gamma={self.diversity_gamma}, "
            f"entropy_temperature={self.entropy_temperature}"
        )


@dataclass
class IBQOptions(CodebookLossOptions, EntropyOptions):
    """Options of ``--quantizer ibq`` (``entropy_weight`` and ``diversity_gamma``: the
    declaration shared with lfq / bsq; None: IBQ's own default, the paper's 0.05)."""

    # configs and checkpoints written before the one-name rule (vqkit.models.vqvae)
    renamed: ClassVar[dict[str, str]] = {"ibq_entropy_weight": "entropy_weight"}

    double_quant_weight: float = option(
        1.0, "weight of IBQ's double-quantization loss ||q - x||^2", check=nonneg, applies_to="ibq"
    )
    entropy_temperature: float = option(
        0.01,
        "T of IBQ's entropy penalty over softmax(x.e / T) (the paper's 0.01)",
        check=positive,
        applies_to="ibq",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_cosine:
            raise ValueError("use_cosine does not apply to ibq (its logits are inner products)")
        if self.gradient != "ste":
            raise ValueError("gradient does not apply to ibq (it has its own estimator)")

    def build(self, dim: int) -> IBQ:
        kw = self.codebook_kwargs()
        kw.pop("use_cosine")
        kw.pop("gradient")
        return IBQ(
            self.num_embeddings,
            dim,
            codebook_weight=self.codebook_weight,
            double_quant_weight=self.double_quant_weight,
            entropy_temperature=self.entropy_temperature,
            **self.entropy_kwargs(),
            **kw,
        )


register_quantizer("ibq", IBQOptions, "index backpropagation quantization (Shi et al. 2024)")
