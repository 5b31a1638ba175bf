"""Lookup-free quantization (Yu et al. 2023, "Language Model Beats Diffusion --
Tokenizer is Key to Visual Generation", MAGVIT-v2), and the base it shares with
binary spherical quantization (:class:`~vqkit.quantizers.BSQ`).

Each of the ``d = num_bits`` channels is quantized to its sign, ``q_i = s`` if
``u_i > 0`` else ``-s`` (straight-through gradient, value exactly the code); the
implicit codebook is ``{-s, +s}^d`` (K = 2^d codes, no tensor), the index is the bit
pattern ``sum_i [u_i > 0] 2^i`` (channel 0 least significant, like FSQ's mixed radix
with all levels 2). LFQ: ``u = z`` and ``s = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..options import option, positive, positive_int
from ..search import DEFAULT_SCRATCH_BYTES
from .base import BaseQuantizer, check_indices, check_positive, check_weights, fp32_region
from .codebook_base import CommitmentOptions, EntropyOptions
from .entropy import MAX_EXACT_BITS, batch_entropy, per_sample_entropy
from .estimators import straight_through
from .fsq import DEFAULT_MAX_BINCOUNT, grid_output
from .masking import keep_rows, masked_mse_terms
from .output import QuantizerOutput
from .registry import register_quantizer

__all__ = ["BinaryOptions", "BinaryQuantizer", "LFQ", "LFQOptions"]


class BinaryQuantizer(BaseQuantizer):
    """Sign quantization of ``num_bits`` channels with the entropy terms of LFQ / BSQ.

    Subclasses define :meth:`_to_sphere` (the map from the projected input ``z`` to the
    quantized space ``u``), ``code_scale`` ``s`` and :meth:`_batch_entropy`.

    Loss (float32 scalars; means over the kept positions)::

        commitment = mean ||u - sg[q]||^2                        (over all N * d elements)
        entropy    = per_sample_entropy - diversity_gamma * batch_entropy
        loss       = commitment_cost * commitment + entropy_weight * entropy

    with the soft assignment ``p(c|u) ∝ exp(-||u - c||^2 / temperature)`` over the
    2^d codes (see :mod:`vqkit.quantizers.entropy`): per-sample entropy
    ``mean_n H(p(.|u_n))`` (exact, O(N d)) and batch entropy ``H(mean_n p(.|u_n))``.
    The entropy terms are computed in training mode only (they shape training; an
    eval-mode ``losses`` holds ``commitment`` alone) and only when ``entropy_weight > 0``.
    ``losses`` holds the unweighted ``commitment``, ``per_sample_entropy``,
    ``batch_entropy`` and ``entropy``.
    """

    code_scale: float = 1.0

    def __init__(
        self,
        num_bits: int,
        embedding_dim: int | None = None,
        *,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commitment_cost: float = 0.25,
        temperature: float = 1.0,
        channels_last: bool = False,
        check_finite: bool = True,
        max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
        max_bincount: int = DEFAULT_MAX_BINCOUNT,
        usage_decay: float = 0.99,
        process_group: dist.ProcessGroup | None = None,
        sync_stats: bool = True,
    ) -> None:
        if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 62:
            raise ValueError(f"num_bits must be an int in [1, 62]; got {num_bits!r}")
        if embedding_dim is None:
            embedding_dim = num_bits
        super().__init__(embedding_dim, channels_last=channels_last, check_finite=check_finite)
        check_weights(
            entropy_weight=entropy_weight,
            diversity_gamma=diversity_gamma,
            commitment_cost=commitment_cost,
        )
        check_positive(temperature=temperature)
        if not isinstance(max_scratch_bytes, int) or max_scratch_bytes < 4:
            raise ValueError(f"max_scratch_bytes must be an int >= 4; got {max_scratch_bytes!r}")
        self.num_bits = num_bits
        self.num_codes = 2**num_bits
        self.entropy_weight = float(entropy_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.commitment_cost = float(commitment_cost)
        self.temperature = float(temperature)
        self.max_scratch_bytes = max_scratch_bytes
        self.max_bincount = int(max_bincount)
        pow2 = 2 ** torch.arange(num_bits, dtype=torch.int64)
        self.register_buffer("_pow2", pow2, persistent=False)
        if embedding_dim != num_bits:
            self.project_in: nn.Linear | None = nn.Linear(embedding_dim, num_bits)
            self.project_out: nn.Linear | None = nn.Linear(num_bits, embedding_dim)
        else:
            self.project_in = self.project_out = None
        self._init_sync(process_group, sync_stats)
        if self.num_codes <= self.max_bincount:
            self._init_usage(self.num_codes, usage_decay)

    # -- what LFQ and BSQ differ in --------------------------------------------------
    def _to_sphere(self, z: torch.Tensor) -> torch.Tensor:
        """The projected input (N, d) float32 -> the quantized space ``u``."""
        return z

    def _batch_entropy(self, a: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------
    def bit_logits(self, u: torch.Tensor) -> torch.Tensor:
        """Per-bit logits ``a = 4 s u / temperature`` (N, d): ``p(bit i set | u) =
        sigmoid(a_i)`` under ``p(c|u) ∝ exp(-||u - c||^2 / temperature)``."""
        return u * (4.0 * self.code_scale / self.temperature)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 indices (...) -> codes (..., d) in ``{-s, +s}``, float32."""
        bits = (indices.long().unsqueeze(-1) // self._pow2) % 2
        return (bits.to(torch.float32) * 2.0 - 1.0) * self.code_scale

    def _quantize(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, embedding_dim) -> (u (N, d) float32, codes with straight-through gradient
        (N, d) float32, indices (N,))."""
        z = self._project(self.project_in, flat)
        with fp32_region(z.device):
            u = self._to_sphere(z.to(torch.float32))
            pos = u > 0
            q = torch.where(pos, self.code_scale, -self.code_scale)
            indices = (pos.long() * self._pow2).sum(-1)
            codes = straight_through(u, q)
        return u, codes, indices

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, C, *spatial); ``mask`` (B, *spatial), True = padded
        (:mod:`vqkit.quantizers.masking`)."""
        self._validate(x, self._pow2.device)
        index_shape = self.index_shape(x.shape)
        keep = keep_rows(mask, index_shape, x.device)
        u, codes, indices = self._quantize(self.to_flat(x))
        with fp32_region(x.device):
            commitment = masked_mse_terms(u, codes.detach(), keep)["commitment"]
            losses = {"commitment": commitment}
            loss = self.commitment_cost * commitment
            if self.training and self.entropy_weight > 0:
                a = self.bit_logits(u)
                per = per_sample_entropy(a, keep)
                batch = self._batch_entropy(a, keep)
                entropy = per - self.diversity_gamma * batch
                losses.update(per_sample_entropy=per, batch_entropy=batch, entropy=entropy)
                loss = loss + self.entropy_weight * entropy
        return grid_output(self, x, codes, indices, keep, loss, losses)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> int64 indices (B, *spatial)."""
        self._validate(x, self._pow2.device)
        _, _, indices = self._quantize(self.to_flat(x))
        return indices.reshape(self.index_shape(x.shape))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, *spatial) -> output (B, embedding_dim, *spatial) (or channels-last),
        float32; exactly the forward's ``quantized`` (float32 input)."""
        check_indices(indices, self._pow2.device, self.num_codes)
        codes = self.indices_to_codes(indices)
        if self.project_out is not None:
            codes = self.project_out(codes)
        return codes if self.channels_last else codes.movedim(-1, 1)

    def extra_repr(self) -> str:
        s = f"num_bits={self.num_bits}, embedding_dim={self.embedding_dim}"
        s += f", entropy_weight={self.entropy_weight}, temperature={self.temperature}"
        extra = super().extra_repr()
        return f"{s}, {extra}" if extra else s


class LFQ(BinaryQuantizer):
    """Lookup-free quantizer (MAGVIT-v2): codes ``{-1, +1}^num_bits``, K = 2^num_bits.

    Args:
        num_bits: d, the number of binary channels (K = 2^d codes).
        embedding_dim: input channels; default ``num_bits``. Otherwise a linear
            in-projection ``embedding_dim -> num_bits`` before the sign and an
            out-projection back after it (trained by gradient).
        entropy_weight: weight of the entropy term (0.1 in the paper).
        diversity_gamma: gamma, weight of the batch entropy inside the entropy term.
        commitment_cost: weight of ``mean ||z - sg[q]||^2``.
        temperature: tau of ``p(c|z) ∝ exp(-||z - c||^2 / tau)`` (per-bit logit 4 z / tau).
            vector-quantize-pytorch's logits ``2 z.c * inv_temperature`` are the same
            distribution with ``tau = 1 / inv_temperature`` (its default is 100).
        max_scratch_bytes: scratch bound of the batch entropy's row tiles.
        max_bincount, usage_decay, process_group, sync_stats, channels_last,
            check_finite: as for :class:`~vqkit.quantizers.FSQ` (usage tracking for
            K <= max_bincount; DDP-summed counts and batch-entropy marginal).

    Entropy terms (see :class:`BinaryQuantizer` for the loss):

    * per-sample entropy ``mean_n H(p(.|z_n)) = mean_n sum_i H_b(sigmoid(4 z_ni / tau))``:
      EXACT, O(N d).
    * batch entropy ``H(mean_n p(.|z_n))`` over all 2^d codes: EXACT (no approximation;
      float rounding only), computed by :func:`~vqkit.quantizers.entropy.batch_entropy`
      with bounded memory (the K-float marginal plus row tiles of 2^ceil(d/2) columns,
      within ``max_scratch_bytes``; never N x K) and a custom autograd Function that
      recomputes the tiles in the backward. Time O(N 2^d) multiply-adds in one GEMM per
      tile. Under torch.distributed the marginal is the global batch's. At most
      ``MAX_EXACT_BITS`` (24) bits with ``entropy_weight > 0`` (the marginal's 2^d floats).
    """

    def __init__(self, num_bits: int, embedding_dim: int | None = None, **options: Any) -> None:
        super().__init__(num_bits, embedding_dim, **options)
        if self.entropy_weight > 0 and num_bits > MAX_EXACT_BITS:
            raise ValueError(
                f"LFQ's exact batch entropy over 2^{num_bits} codes needs a 2^{num_bits}-float "
                f"marginal; use num_bits <= {MAX_EXACT_BITS}, entropy_weight=0, or BSQ "
                "(factorised entropy)"
            )

    def _batch_entropy(self, a: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return batch_entropy(
            a,
            keep,
            sync=self.sync_stats,
            group=self.process_group,
            max_scratch_bytes=self.max_scratch_bytes,
        )


@dataclass
class BinaryOptions(CommitmentOptions, EntropyOptions):
    """Options shared by ``--quantizer lfq`` and ``bsq`` (the entropy penalty's are
    :class:`~vqkit.quantizers.codebook_base.EntropyOptions`, shared with ibq)."""

    num_bits: int = option(
        10,
        "d, binary channels (K = 2^d codes); projections from --embedding-dim when different",
        check=positive_int,
        applies_to="lfq, bsq",
    )
    temperature: float = option(
        1.0,
        "tau of the soft assignment p(c|z) ∝ exp(-||z - c||^2 / tau) of the entropy terms",
        check=positive,
        applies_to="lfq, bsq",
    )

    def binary_kwargs(self) -> dict[str, Any]:
        return {
            **self.entropy_kwargs(),
            "commitment_cost": self.commitment_cost,
            "temperature": self.temperature,
        }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_bits > 62:
            raise ValueError(f"num_bits must be <= 62 (int64 indices); got {self.num_bits}")


@dataclass
class LFQOptions(BinaryOptions):
    """Options of ``--quantizer lfq``."""

    def build(self, dim: int) -> LFQ:
        return LFQ(self.num_bits, dim, **self.binary_kwargs())


register_quantizer("lfq", LFQOptions, "lookup-free quantization, 2^num-bits codes (MAGVIT-v2)")
