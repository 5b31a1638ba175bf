"""The gradient-trained vector quantizer of VQ-VAE (van den Oord et al., 2017)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..options import option
from .codebook_base import CodebookLossOptions, LossTrainedQuantizer
from .masking import keep_rows, masked_counts, masked_mse_terms
from .output import QuantizerOutput
from .registry import register_quantizer

__all__ = ["VQOptions", "VectorQuantizer"]


class VectorQuantizer(LossTrainedQuantizer):
    """Vector quantizer with a codebook learned by gradient descent.

    For an input ``z_e`` (B, D, *spatial) each D-vector ``x`` is replaced by its
    nearest code ``e_k``, ``k = argmin_j ||x - e_j||^2``, found by the chunked
    search in :mod:`vqkit.search` (no N x K matrix). The loss is

        loss = codebook_weight * ||sg[x] - e_k||^2 + commitment_cost * ||x - sg[e_k]||^2

    (means over all elements; ``sg`` = stop-gradient), and the output passes
    gradients straight through: ``x + sg[e_k - x]``.

    Args:
        num_embeddings: K, the number of codes.
        embedding_dim: D, the code dimension; must equal the input's channels.
        commitment_cost: beta, the weight of the commitment term (0.25 in the paper).
        codebook_weight: weight of the codebook term (1.0 in the paper); both weights
            are checked and kept by the base, ``LossTrainedQuantizer``.
        **options: ``codebook_weight``, and the options every codebook quantizer takes, see
            :class:`~vqkit.quantizers.CodebookQuantizer`: ``channels_last``,
            ``check_finite``, ``max_scratch_bytes``, ``search_backend``,
            ``codebook_dim``, ``use_cosine`` (``l2_normalize``), ``gradient``,
            ``usage_decay``, ``process_group``, ``sync_stats``; the defaults are the
            classic layer.
        affine_codebook: the codes are ``codebook * codebook_scale + codebook_shift``
            with a learned per-dimension scale and shift shared by all codes (the
            affine re-parameterisation of Huh et al. 2023, "Straightening Out the
            Straight-Through Estimator"): every gradient step moves the whole
            codebook towards the encoder's output statistics, so codes that are
            never chosen still follow the data instead of being stranded.

    The codebook is the parameter ``codebook`` (K, D), initialised
    uniform(-1/K, 1/K) as in the classic implementation.

    Returns a :class:`QuantizerOutput`; ``loss, quantized, perplexity,
    encodings = vq(x)`` works as with the classic module.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        *,
        affine_codebook: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, commitment_cost, **options)
        self.affine_codebook = bool(affine_codebook)
        if self.affine_codebook:
            self.codebook_scale: nn.Parameter | None = nn.Parameter(torch.ones(self.codebook_dim))
            self.codebook_shift: nn.Parameter | None = nn.Parameter(torch.zeros(self.codebook_dim))
            self._plain = False
        else:
            self.codebook_scale = self.codebook_shift = None
        self.reset_parameters()

    def _make_codes(self) -> None:
        self.codebook = nn.Parameter(torch.empty(self.num_embeddings, self.codebook_dim))

    def reset_parameters(self) -> None:
        k = self.num_embeddings
        nn.init.uniform_(self.codebook, -1.0 / k, 1.0 / k)
        if self.codebook_scale is not None and self.codebook_shift is not None:
            nn.init.ones_(self.codebook_scale)
            nn.init.zeros_(self.codebook_shift)

    def codebook_lr_parameters(self) -> list[nn.Parameter]:
        extra = [p for p in (self.codebook_scale, self.codebook_shift) if p is not None]
        return [self.codebook, *extra]

    def effective_codebook(self) -> torch.Tensor:
        """The codes before any l2-normalisation: ``codebook``, or
        ``codebook * codebook_scale + codebook_shift`` with ``affine_codebook``."""
        if self.codebook_scale is None or self.codebook_shift is None:
            return self.codebook
        return torch.addcmul(self.codebook_shift, self.codebook, self.codebook_scale)

    def _search_codebook(self) -> torch.Tensor:
        cb = self.effective_codebook()
        return F.normalize(cb, dim=-1) if self.use_cosine else cb

    @torch.no_grad()
    def _set_codes(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:
        """Make the effective codes of the rows in ``mask`` equal ``vectors`` (search
        space), inverting the affine map when there is one."""
        if self.codebook_scale is not None and self.codebook_shift is not None:
            scale = self.codebook_scale
            # keep the sign, avoid dividing by ~0
            scale = torch.where(scale.abs() < 1e-6, torch.full_like(scale, 1e-6), scale)
            vectors = (vectors - self.codebook_shift) / scale
        vectors = vectors.to(self.codebook.dtype)
        self.codebook.copy_(torch.where(mask.unsqueeze(1), vectors, self.codebook))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, D, *spatial); ``mask`` (B, *spatial), True = padded: those
        positions are left out of the losses and the statistics
        (:mod:`vqkit.quantizers.masking`)."""
        return loss_trained_forward(
            self, x, mask, lambda indices: F.embedding(indices, self._search_codebook())
        )

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, commitment_cost={self.commitment_cost}"
        if self.affine_codebook:
            s += ", affine_codebook=True"
        if self.codebook_weight != 1.0:
            s += f", codebook_weight={self.codebook_weight}"
        return s


def loss_trained_forward(
    q: Any,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    chosen: Callable[[torch.Tensor], torch.Tensor],
) -> QuantizerOutput:
    """The forward of a codebook trained by its loss (:class:`VectorQuantizer`, SimVQ):
    nearest code of each searched vector, ``chosen(indices)`` the chosen codes (N, d)
    with gradient to what trains them; ``loss = codebook_weight * ||sg[x] - e||^2 +
    commitment_cost * ||x - sg[e]||^2`` over the kept positions (``mask`` True =
    padded); counts summed over the ranks and tracked in training mode."""
    q._validate(x, q.codebook.device)
    keep = keep_rows(mask, q.index_shape(x.shape), x.device)  # None without mask
    flat = q._search_input(q.to_flat(x))  # the input itself by default
    indices, distances = q._assign(flat)
    quantized_flat = chosen(indices)
    losses = masked_mse_terms(flat, quantized_flat, keep)
    loss = q.codebook_weight * losses["codebook"] + q.commitment_cost * losses["commitment"]
    counts = masked_counts(indices, q.num_embeddings, keep)
    if q.training:
        counts = q._global_counts(counts)
        q._track_usage(counts)
    quantized = q._quantized(x, flat, quantized_flat)
    return q._pack(x, quantized, indices, distances, counts, losses, loss)


@dataclass
class VQOptions(CodebookLossOptions):
    """Options of ``--quantizer vq``."""

    affine_codebook: bool = option(
        False,
        "codes = codebook * scale + shift with a learned shared scale and shift (Huh et al. 2023)",
        applies_to="vq",
    )

    def vq_kwargs(self) -> dict[str, Any]:
        return {
            **self.codebook_kwargs(),
            "codebook_weight": self.codebook_weight,
            "affine_codebook": self.affine_codebook,
        }

    def build(self, dim: int) -> VectorQuantizer:
        return VectorQuantizer(self.num_embeddings, dim, **self.vq_kwargs())


register_quantizer("vq", VQOptions, "gradient-trained codebook (van den Oord et al. 2017)")
