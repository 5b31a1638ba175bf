"""SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized
Models with One Linear Layer"): a frozen random codebook re-parameterised by one
learned linear map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..search import nearest_code
from .base import check_indices, fp32_region
from .codebook_base import CodebookLossOptions, LossTrainedQuantizer
from .output import QuantizerOutput
from .registry import register_quantizer
from .vq import loss_trained_forward

__all__ = ["SimVQ", "SimVQOptions"]


class SimVQ(LossTrainedQuantizer):
    """Vector quantizer whose K codes are ``C W^T``: ``C`` (K, d) a frozen random
    codebook (the buffer ``codebook``, N(0, 1/d) entries: codes of about unit norm) and
    ``W`` (d, d) the learned weight of ``transform`` (no bias; initialised to the
    identity, so training starts from the Gaussian codes).

    Forward: ``k = argmin_j ||x - (C W^T)_j||^2`` by the tiled search of
    :func:`vqkit.search.nearest_code` over the K implicit codes (computed once per
    forward, K x d, no gradient; never N x K), then ``e_k = W c_k`` is recomputed for
    the N chosen rows only, with gradient to ``W``. Loss as
    :class:`~vqkit.VectorQuantizer`: ``codebook_weight * ||sg[x] - e_k||^2 +
    commitment_cost * ||x - sg[e_k]||^2``; the codebook term trains ``W`` and so moves
    ALL codes at once (the paper's point: no code is left behind). Straight-through
    (or rotation-trick) output; ``decode`` recomputes ``W c_k`` the same way, so it
    equals ``quantized`` bit for bit.

    Init and revival: not supported (``supports_init = supports_revival = False``).
    The codes are not free rows: moving one code means changing ``W``, which moves all
    of them, and a k-means fit of K codes by a d x d map is a least-squares problem,
    not an init. ``codebook_lr_parameters()`` is ``[W]`` (the codebook learning rate);
    ``code_row_parameters()`` is empty (W is d x d, not K rows: no optimizer rows to
    restart).

    Args:
        num_embeddings, embedding_dim, commitment_cost, codebook_weight: as for
            :class:`~vqkit.VectorQuantizer`.
        **codebook_options: as for :class:`~vqkit.VectorQuantizer` (``codebook_dim``
            with projections, ``use_cosine`` (normalised codes ``W c_k``),
            ``gradient``, ``max_scratch_bytes``, ``search_backend``, usage tracking).
    """

    supports_init = False
    supports_revival = False

    def _make_codes(self) -> None:
        d = self.codebook_dim
        self.register_buffer("codebook", torch.randn(self.num_embeddings, d) * d**-0.5)
        self.transform = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(d))

    def codebook_lr_parameters(self) -> list[nn.Parameter]:
        return [self.transform.weight]

    def code_row_parameters(self) -> list[nn.Parameter]:
        return []

    def _map(self, frozen: torch.Tensor) -> torch.Tensor:
        """Frozen codes (..., d) -> implicit codes ``W c`` (float32, normalised with
        ``use_cosine``)."""
        with fp32_region(frozen.device):
            codes = F.linear(frozen.to(torch.float32), self.transform.weight.to(torch.float32))
        return F.normalize(codes, dim=-1) if self.use_cosine else codes

    def _search_codebook(self) -> torch.Tensor:
        return self._map(self.codebook)

    def _assign(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # K x d codes for the search only
            codes = self._search_codebook()
        return nearest_code(
            flat,
            codes,
            max_scratch_bytes=self.max_scratch_bytes,
            backend=self.search_backend,  # type: ignore[arg-type]
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, C, *spatial); ``mask`` (B, *spatial), True = padded
        (:mod:`vqkit.quantizers.masking`)."""
        # the chosen codes W c_k: N rows, gradient to W
        return loss_trained_forward(
            self, x, mask, lambda indices: self._map(F.embedding(indices, self.codebook))
        )

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, *spatial) -> codes ``W c_k`` in the input layout (out-projected
        with ``codebook_dim``), float32."""
        check_indices(indices, self.codebook.device, self.num_embeddings)
        codes = self._map(F.embedding(indices.long(), self.codebook))
        if self.project_out is not None:
            codes = self.project_out(codes)
        return codes if self.channels_last else codes.movedim(-1, 1)

    lookup = decode

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, commitment_cost={self.commitment_cost}"


@dataclass
class SimVQOptions(CodebookLossOptions):
    """Options of ``--quantizer simvq``."""

    def build(self, dim: int) -> SimVQ:
        return SimVQ(
            self.num_embeddings,
            dim,
            codebook_weight=self.codebook_weight,
            **self.codebook_kwargs(),
        )


register_quantizer("simvq", SimVQOptions, "frozen random codebook x learned linear map (SimVQ)")
