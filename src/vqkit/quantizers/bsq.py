"""Binary spherical quantization (Zhao et al. 2024, "Image and Video Tokenization with
Binary Spherical Quantization")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..options import option, positive_int
from .entropy import MAX_EXACT_BITS, batch_entropy
from .lfq import BinaryOptions, BinaryQuantizer
from .registry import register_quantizer

__all__ = ["BSQ", "BSQOptions"]


class BSQ(BinaryQuantizer):
    """Binary spherical quantizer: ``u = z / ||z||`` on the unit sphere, ``q = sign(u) /
    sqrt(d)`` (a unit vector too), implicit codebook ``{-1/sqrt(d), +1/sqrt(d)}^d``,
    K = 2^d codes, index = bit pattern (channel 0 least significant); straight-through
    gradient from ``q`` to ``u`` (through the normalisation to ``z``).

    Args: as :class:`~vqkit.quantizers.LFQ` (``num_bits``, ``embedding_dim`` with
    projections when different, ``entropy_weight``, ``diversity_gamma``,
    ``commitment_cost``, ``temperature``, ...), plus

        entropy_group_size: bits per group of the factorised batch entropy (below); at
            most ``MAX_EXACT_BITS`` (24) bits per group with ``entropy_weight > 0``.

    Soft assignment ``p(c|u) ∝ exp(-||u - c||^2 / tau) ∝ exp(2 c.u / tau)``: per-bit
    logit ``a_i = 4 u_i / (sqrt(d) tau)`` (the reference code's ``inv_temperature`` is
    ``1 / tau``).

    * per-sample entropy ``mean_n H(p(.|u_n))``: EXACT (it factorises over bits).
    * batch entropy: the paper's factorised APPROXIMATION
      ``H(mean_n p(.|u_n)) ~= sum_i H(mean_n p_i(.|u_ni))`` (``entropy_group_size=1``):
      O(N d), an upper bound of the exact joint entropy (subadditivity); equal to it
      when the bits are independent over the batch. ``entropy_group_size=g`` sums the
      exact entropies of groups of g consecutive bits (the reference code's "group"
      mode uses g = 9), tighter as g grows and exact for ``g >= num_bits`` (the tiled
      computation of :class:`~vqkit.quantizers.LFQ`). ``tests/test_bsq.py`` measures
      the gap against the brute-force joint entropy.

    Loss as :class:`~vqkit.quantizers.lfq.BinaryQuantizer`: ``commitment_cost *
    mean ||u - sg[q]||^2 + entropy_weight * (per_sample - gamma * batch)``. The
    reference code sums the commitment over channels (a factor d) and divides the
    entropy term by its inverse temperature; scale the weights to match it.
    """

    def __init__(
        self,
        num_bits: int,
        embedding_dim: int | None = None,
        *,
        entropy_group_size: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(num_bits, embedding_dim, **options)
        if not isinstance(entropy_group_size, int) or entropy_group_size < 1:
            raise ValueError(
                f"entropy_group_size must be a positive int; got {entropy_group_size!r}"
            )
        self.entropy_group_size = min(entropy_group_size, num_bits)
        if self.entropy_weight > 0 and self.entropy_group_size > MAX_EXACT_BITS:
            # caught here, not at the first training step (the 2^g-float group marginal)
            raise ValueError(
                f"entropy_group_size must be <= {MAX_EXACT_BITS} (the exact entropy of a "
                f"group of g bits needs a 2^g-float marginal); got {entropy_group_size} "
                f"with num_bits={num_bits}"
            )
        self.code_scale = 1.0 / math.sqrt(num_bits)

    def _to_sphere(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=-1)

    def _batch_entropy(self, a: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return batch_entropy(
            a,
            keep,
            group_size=self.entropy_group_size,
            sync=self.sync_stats,
            group=self.process_group,
            max_scratch_bytes=self.max_scratch_bytes,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, entropy_group_size={self.entropy_group_size}"


@dataclass
class BSQOptions(BinaryOptions):
    """Options of ``--quantizer bsq``."""

    entropy_group_size: int = option(
        1,
        "bits per group of the factorised batch entropy (1: the paper's per-bit "
        "approximation; >= num-bits: exact)",
        check=positive_int,
        applies_to="bsq",
    )

    def build(self, dim: int) -> BSQ:
        return BSQ(
            self.num_bits, dim, entropy_group_size=self.entropy_group_size, **self.binary_kwargs()
        )


register_quantizer("bsq", BSQOptions, "binary spherical quantization, 2^num-bits codes (BSQ)")
