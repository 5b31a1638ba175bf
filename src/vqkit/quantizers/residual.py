"""Residual vector quantization (Zeghidour et al., 2021, "SoundStream", Algorithm 1).

Stage 1 quantizes the input, stage i the residual left by stages 1 .. i-1:

    r_1 = x;   q_i = Q_i(r_i);   r_{i+1} = r_i - q_i;   output = q_1 + ... + q_Q

Each stage is an ordinary codebook quantizer (:class:`~vqkit.VectorQuantizer` or
:class:`~vqkit.VectorQuantizerEMA`) applied to its own residual, so every stage's
commitment term is ``||r_i - sg[q_i]||^2`` on *its* input (and the codebook term /
EMA update of stage i sees ``r_i``). The residual is updated by one subtraction
per stage, with ``sg[q_i]``: the gradient of stage i's commitment term reaches the
input through ``r_i = x - sg[q_1 + ... + q_{i-1}]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..options import option, positive_int, unit_interval
from ..search import DEFAULT_SCRATCH_BYTES
from .base import BaseQuantizer, check_indices, fp32_region
from .codebook_base import GRADIENTS, CodebookQuantizer
from .ema import EMAOptions, VectorQuantizerEMA
from .estimators import rotation_trick, straight_through
from .masking import keep_rows
from .output import QuantizerOutput
from .registry import register_quantizer
from .vq import VectorQuantizer, VQOptions

__all__ = ["RVQOptions", "ResidualVQ"]

STAGE_KINDS = {"vq": VectorQuantizer, "ema": VectorQuantizerEMA}


class LayeredQuantizer(BaseQuantizer):
    """Base of the quantizers made of codebook layers (``self.layers``: rvq's stages,
    gvq's groups): their contract parameters and count flags are the layers'."""

    layers: nn.ModuleList

    def codebook_lr_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.codebook_lr_parameters()]

    def code_row_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.code_row_parameters()]

    @property
    def counts_are_global(self) -> bool:
        return all(layer.counts_are_global for layer in self.layers)


class ResidualVQ(LayeredQuantizer):
    """Q quantizer stages on successive residuals; output = sum of the stages' codes.

    Args:
        num_quantizers: Q, the number of stages.
        num_embeddings: K, codes per stage.
        embedding_dim: D, the input channels.
        stage: ``"vq"`` (gradient-trained codebooks) or ``"ema"`` (EMA codebooks).
        shared_codebook: one codebook (one stage module) for all Q stages (an EMA
            codebook is then updated Q times per training step, once per residual).
        quantizer_dropout: probability, per training sample, of quantizer dropout:
            such a sample uses only its first ``n`` stages, ``n`` uniform in
            ``{1, ..., Q}`` (SoundStream trains with it so that one model serves
            every bitrate; 1.0 is the paper's setting). Only in training mode.
        generator: a CPU ``torch.Generator`` for the dropout draws (default: the
            global RNG, so ``torch.manual_seed`` makes them reproducible).
        gradient: ``"ste"`` (straight-through from the sum of the codes to the
            input) or ``"rotation"`` (rotation trick from the input to that sum).
        channels_last, check_finite: as in :class:`~vqkit.VectorQuantizer` (the
            finiteness check runs once, not per stage).
        **stage_options: passed to every stage: ``commitment_cost``, ``decay``,
            ``epsilon``, ``zero_debias``, ``codebook_weight``, ``use_cosine``,
            ``codebook_dim``, ``max_scratch_bytes``, ``search_backend``, ...

    Output (:class:`QuantizerOutput`): ``quantized`` = sum of the codes (input
    layout and dtype); ``indices`` int64 ``(B, *spatial, Q)``, stage on the last
    axis, ``-1`` where a stage was dropped; ``loss`` = sum of the stages' losses
    (each a mean over the positions that stage quantized), ``losses`` their
    unweighted sums per term; ``counts`` (Q, K) per stage; ``perplexity`` and
    ``usage`` the means over stages; ``stages`` each stage's own output (on its
    flattened residual). ``decode(indices)`` sums the stages' codes (skipping -1),
    exactly the forward's ``quantized`` in float32.

    The residual is kept in float32 (also for half-precision inputs).

    Codebook health (``supports_init``, ``supports_revival``): stage by stage, each on
    its own residual, as ``forward`` computes it without quantizer dropout: stage 1 is
    set (k-means, or its dead codes revived) from ``r_1 = x``, then ``r_2`` is taken
    with stage 1's new codes, and so on, so every stage starts from residuals its
    predecessors actually leave. Revival returns the (Q, K) mask, row i stage i's
    revived codes (row i indexes the i-th of ``code_row_parameters()`` when the stages
    are gradient-trained; ema stages list none); a stage is dead by its own usage
    statistic, which under quantizer dropout counts only the rows that reached it. With
    ``shared_codebook`` the one codebook is set from the residuals of every stage
    pooled (k-means: from ``x`` alone, the later residuals depending on its codes) and
    revival returns its (K,) mask.
    """

    supports_init = True
    supports_revival = True

    def __init__(
        self,
        num_quantizers: int,
        num_embeddings: int,
        embedding_dim: int,
        *,
        stage: str = "vq",
        shared_codebook: bool = False,
        quantizer_dropout: float = 0.0,
        generator: torch.Generator | None = None,
        gradient: str = "ste",
        channels_last: bool = False,
        check_finite: bool = True,
        max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
        **stage_options: Any,
    ) -> None:
        super().__init__(embedding_dim, channels_last=channels_last, check_finite=check_finite)
        if not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int; got {num_quantizers!r}")
        if stage not in STAGE_KINDS:
            raise ValueError(f"stage must be one of {sorted(STAGE_KINDS)}; got {stage!r}")
        if not isinstance(quantizer_dropout, (int, float)) or not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must lie in [0, 1]; got {quantizer_dropout!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {list(GRADIENTS)}; got {gradient!r}")
        if "gradient" in stage_options or "channels_last" in stage_options:
            raise ValueError("gradient and channels_last apply to the whole ResidualVQ")
        self.num_quantizers = num_quantizers
        self.num_embeddings = num_embeddings
        self.num_codes = num_embeddings  # per stage
        self.codes_per_position = num_quantizers
        self.stage_kind = stage
        self.shared_codebook = bool(shared_codebook)
        self.quantizer_dropout = float(quantizer_dropout)
        self.generator = generator
        self.gradient = gradient
        cls = STAGE_KINDS[stage]
        n_modules = 1 if shared_codebook else num_quantizers
        self.layers = nn.ModuleList(
            cls(
                num_embeddings,
                embedding_dim,
                check_finite=False,  # checked once on the input
                max_scratch_bytes=max_scratch_bytes,
                **stage_options,
            )
            for _ in range(n_modules)
        )

    def stage(self, i: int) -> CodebookQuantizer:
        """The quantizer of stage ``i`` (the same module for every i when shared)."""
        return self.layers[0 if self.shared_codebook else i]  # type: ignore[return-value]

    def _draw_stages(self, batch: int, device: torch.device) -> torch.Tensor:
        """Number of stages per sample (B,) int64 for quantizer dropout."""
        q = self.num_quantizers
        drop = torch.rand(batch, generator=self.generator) < self.quantizer_dropout
        n = torch.randint(1, q + 1, (batch,), generator=self.generator)
        return torch.where(drop, n, torch.full_like(n, q)).to(device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, D, *spatial); ``mask`` (B, *spatial), True = padded: passed
        to every stage (left out of each stage's loss and statistics; see
        :mod:`vqkit.quantizers.masking`)."""
        self._validate(x, self.layers[0].codebook.device)
        keep_rows(mask, self.index_shape(x.shape), x.device)  # checks the mask
        pad = None if mask is None else mask.reshape(-1)  # per flat row, True = padded
        flat = self.to_flat(x)
        n = flat.shape[0]
        dropout = self.training and self.quantizer_dropout > 0 and n > 0
        with fp32_region(x.device):
            residual = flat.to(torch.float32)  # r_1 = x (graph-connected to x)
            rows_stages = None
            if dropout:
                per_sample = n // x.shape[0]
                rows_stages = self._draw_stages(x.shape[0], x.device).repeat_interleave(per_sample)
            total = None
            outs: list[QuantizerOutput] = []
            cols: list[torch.Tensor] = []
            for i in range(self.num_quantizers):
                layer = self.stage(i)
                if rows_stages is None:
                    o = layer(residual, mask=pad)
                    q = o.quantized.detach()
                    idx = o.indices
                else:
                    rows = (rows_stages > i).nonzero().squeeze(1)
                    o = layer(
                        residual.index_select(0, rows),
                        mask=None if pad is None else pad.index_select(0, rows),
                    )
                    q = torch.zeros(
                        n, residual.shape[1], dtype=residual.dtype, device=residual.device
                    ).index_copy_(0, rows, o.quantized.detach())
                    idx = torch.full((n,), -1, dtype=torch.int64, device=x.device).index_copy_(
                        0, rows, o.indices
                    )
                outs.append(o)
                cols.append(idx)
                if i + 1 < self.num_quantizers:
                    residual = residual - q  # one subtraction per stage
                total = q if total is None else total + q
            assert total is not None
            if self.gradient == "rotation":
                st = rotation_trick(flat.to(torch.float32), total)
            else:
                st = straight_through(flat, total)
            quantized = self.from_flat(st.to(x.dtype), x.shape)
            loss = outs[0].loss
            for o in outs[1:]:
                loss = loss + o.loss
            losses: dict[str, torch.Tensor] = {}
            for o in outs:
                for name, v in o.losses.items():
                    losses[name] = v if name not in losses else losses[name] + v
            counts = torch.stack([o.counts for o in outs])  # type: ignore[misc]
            ppl = torch.stack([o.perplexity for o in outs]).mean()
            usage = torch.stack([o.usage for o in outs]).mean()  # type: ignore[misc]
        indices = torch.stack(cols, dim=-1).reshape(*self.index_shape(x.shape), self.num_quantizers)
        return QuantizerOutput(
            quantized=quantized,
            loss=loss,
            perplexity=ppl,
            indices=indices,
            losses=losses,
            usage=usage,
            counts=counts,
            distances=None,
            num_embeddings=self.num_embeddings,
            stages=outs,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> int64 indices (B, *spatial, Q), all stages, no codebook update."""
        self._validate(x, self.layers[0].codebook.device)
        residual = self.to_flat(x).to(torch.float32)
        cols = []
        with fp32_region(x.device):
            for i in range(self.num_quantizers):
                layer = self.stage(i)
                idx = layer.encode(residual)
                cols.append(idx)
                if i + 1 < self.num_quantizers:
                    residual = residual - layer.decode(idx)
        return torch.stack(cols, dim=-1).reshape(*self.index_shape(x.shape), self.num_quantizers)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, *spatial, Q) -> sum of the stages' codes (B, D, *spatial) (or
        channels-last), float32; ``-1`` entries (dropped stages) contribute nothing.
        Fewer than Q stages on the last axis decode the first ones (a lower bitrate)."""
        device = self.layers[0].codebook.device
        check_indices(indices, device, self.num_embeddings, low=-1)
        if indices.dim() < 2 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"indices must have shape (B, *spatial, Q') with 1 <= Q' <= "
                f"{self.num_quantizers}; got {tuple(indices.shape)}"
            )
        flat = indices.reshape(-1, indices.shape[-1]).long()
        total = None
        for i in range(flat.shape[1]):
            col = flat[:, i]
            codes = self.stage(i).decode(col.clamp(min=0))  # (N, D)
            codes = torch.where((col >= 0).unsqueeze(1), codes, torch.zeros_like(codes))
            total = codes if total is None else total + codes
        assert total is not None
        out = total.reshape(*indices.shape[:-1], total.shape[-1])
        return out if self.channels_last else out.movedim(-1, 1)

    # -- codebook health ---------------------------------------------------------------
    def _stage_step(self, i: int, residual: torch.Tensor) -> torch.Tensor:
        """``r_{i+1} = r_i - Q_i(r_i)`` by stage i's current codes (float32, no update)."""
        layer = self.stage(i)
        return residual - layer.decode(layer.encode(residual)).to(residual.dtype)

    def _residual_input(self, x: torch.Tensor) -> torch.Tensor:
        """An input or flat (N, D) vectors (already the kept rows), checked -> float32
        (N, D)."""
        self._validate(x, self.layers[0].codebook.device)
        return self.to_flat(x.detach()).to(torch.float32)

    def _init_codes(self, x: torch.Tensor, iters: int, generator: torch.Generator | None) -> None:
        """k-means of stage i's codebook on ``r_i``, stage after stage (class docstring)."""
        residual = self._residual_input(x)
        with fp32_region(residual.device):
            if self.shared_codebook:
                self.layers[0].init_codebook_kmeans(residual, iters=iters, generator=generator)
                return
            for i, layer in enumerate(self.layers):
                layer.init_codebook_kmeans(residual, iters=iters, generator=generator)
                if i + 1 < self.num_quantizers:
                    residual = self._stage_step(i, residual)

    def _revive_codes(
        self, x: torch.Tensor, threshold: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Each stage's dead codes take rows of its own residual, stage after stage:
        the (Q, K) mask (shared codebook: (K,), from the residuals of every stage)."""
        residual = self._residual_input(x)
        with fp32_region(residual.device):
            if self.shared_codebook:
                pooled = [residual]
                for i in range(self.num_quantizers - 1):
                    pooled.append(self._stage_step(i, pooled[-1]))
                return self.layers[0].revive_dead_codes(
                    torch.cat(pooled), threshold=threshold, generator=generator
                )
            masks = []
            for i, layer in enumerate(self.layers):
                masks.append(
                    layer.revive_dead_codes(residual, threshold=threshold, generator=generator)
                )
                if i + 1 < self.num_quantizers:
                    residual = self._stage_step(i, residual)
            return torch.stack(masks)

    def extra_repr(self) -> str:
        s = (
            f"num_quantizers={self.num_quantizers}, num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, stage={self.stage_kind!r}"
        )
        if self.shared_codebook:
            s += ", shared_codebook=True"
        if self.quantizer_dropout:
            s += f", quantizer_dropout={self.quantizer_dropout}"
        if self.gradient != "ste":
            s += f", gradient={self.gradient!r}"
        extra = super().extra_repr()
        return f"{s}, {extra}" if extra else s


@dataclass
class LayerKindOptions(VQOptions, EMAOptions):
    """Options of a quantizer made of vq or ema layers (rvq's stages, gvq's groups):
    those of the chosen layer kind; the other kind's must keep their defaults."""

    def check_layer_kind(self, kind: str, name: str, layers: str) -> None:
        """ValueError when an option of the kind not chosen was changed (``name``: the
        option that chose ``kind``; ``layers``: "stages" or "groups")."""
        if kind == "ema" and self.affine_codebook:
            raise ValueError("affine_codebook applies to gradient-trained codebooks (vq)")
        if kind == "ema" and self.codebook_weight != VQOptions.defaults()["codebook_weight"]:
            raise ValueError(f"codebook_weight applies to vq {layers}, not {name}='ema'")
        if kind == "vq":
            for f in ("decay", "epsilon", "zero_debias"):
                if getattr(self, f) != EMAOptions.defaults()[f]:
                    raise ValueError(f"{f} applies to ema {layers}, not {name}='vq'")

    def layer_kwargs(self, kind: str) -> dict[str, Any]:
        """The constructor keywords of one layer of ``kind``."""
        return self.ema_kwargs() if kind == "ema" else self.vq_kwargs()


@dataclass
class RVQOptions(LayerKindOptions):
    """Options of ``--quantizer rvq``: its own, and those of its stage kind."""

    # configs and checkpoints written before the one-name rule (vqkit.models.vqvae)
    renamed: ClassVar[dict[str, str]] = {"rvq_stage": "stage"}

    num_quantizers: int = option(
        4, "number of residual stages", check=positive_int, applies_to="rvq"
    )
    stage: str = option("ema", "stage quantizer", choices=tuple(STAGE_KINDS), applies_to="rvq")
    quantizer_dropout: float = option(
        0.0,
        "probability per training image of using only a random number of leading stages "
        "(SoundStream quantizer dropout)",
        check=unit_interval,
        applies_to="rvq",
    )
    shared_codebook: bool = option(False, "one codebook for all stages", applies_to="rvq")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_layer_kind(self.stage, "stage", "stages")

    def build(self, dim: int) -> ResidualVQ:
        stage = self.layer_kwargs(self.stage)
        gradient = stage.pop("gradient")
        return ResidualVQ(
            self.num_quantizers,
            self.num_embeddings,
            dim,
            stage=self.stage,
            quantizer_dropout=self.quantizer_dropout,
            shared_codebook=self.shared_codebook,
            gradient=gradient,
            **stage,
        )


register_quantizer("rvq", RVQOptions, "residual VQ: --num-quantizers stages (SoundStream)")
