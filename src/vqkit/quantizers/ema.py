"""Vector quantizer whose codebook follows exponential moving averages
(van den Oord et al., 2017, appendix A.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..codebook import assignment_stats, ema_, laplace_smooth
from ..distributed import all_reduce_sum
from ..metrics import ema_debias
from ..options import option, positive, unit_interval
from .base import check_positive, check_weights
from .codebook_base import CodebookOptions, CodebookQuantizer
from .masking import keep_rows, masked_counts, masked_mse_terms
from .output import QuantizerOutput
from .registry import register_quantizer

__all__ = ["EMAOptions", "VectorQuantizerEMA"]


class VectorQuantizerEMA(CodebookQuantizer):
    """Vector quantizer with an EMA-updated codebook and no codebook loss.

    Each training step, after quantizing with the current codebook, the batch
    statistics ``n_k`` (vectors assigned to code k) and ``s_k`` (their sum) update

        N_k <- decay * N_k + (1 - decay) * n_k
        m_k <- decay * m_k + (1 - decay) * s_k
        e_k <- m_k / N~_k,   N~_k = (N_k + eps) / (n + K eps) * n,  n = sum_k N_k

    (Laplace smoothing keeps ``N~_k > 0``). The loss is
    ``commitment_cost * ||x - sg[e_k]||^2`` only.

    EMA start (``zero_debias``):
      * ``False`` (default): the statistics start as if every code had been seen
        once at its initial position, ``N_k = 1`` and ``m_k = e_k``. A code that
        is never chosen stays where it is (``m_k / N_k`` is unchanged by decay),
        instead of being divided by a near-zero count and flung far away, which
        is what the classic PyTorch port does with its independently initialised
        ``ema_w``. Codes drift from their start towards the data at the EMA rate.
      * ``True`` (Sonnet's choice): statistics start at zero and are divided by
        ``1 - decay^t`` after t updates, so after step 1 every used code is
        exactly the mean of its assigned vectors; codes unused so far sit at 0.

    The codebook and the statistics are **buffers** (``codebook``,
    ``cluster_size``, ``embed_sum``, ``num_updates``): nothing here is a
    parameter, so no optimizer holds stale tensors and DDP sees no unused
    parameter. Updates happen only in training mode and after the output has
    been computed (the output uses the pre-update codebook); eval never changes
    the codebook.

    Distributed: in training mode, when ``torch.distributed`` is initialised
    (checked at call time), ``n_k`` and ``s_k`` are summed over the process group
    by one all-reduce before the update, so every rank computes the same
    codebook from the global batch, and the returned perplexity/usage describe
    the global batch. Every rank must then call ``forward`` in training mode
    the same number of times (an empty local batch is fine).

    Args:
        num_embeddings, embedding_dim, commitment_cost: as in
            :class:`~vqkit.VectorQuantizer`.
        decay: EMA decay in [0, 1] (1 freezes the codebook).
        epsilon: Laplace smoothing constant (> 0).
        zero_debias: see above.
        **codebook_options: as for :class:`~vqkit.VectorQuantizer`, including
            ``process_group`` (the group to sync statistics over; default the world),
            ``sync_stats`` (False keeps per-rank codebooks; not recommended),
            ``codebook_dim`` (the EMA codebook and statistics live in the projected
            space; the projections are trained by gradient), ``use_cosine`` (the EMA
            averages normalised vectors; codes are normalised when searched and
            looked up) and ``gradient``. There is no ``usage_decay``: the usage
            statistic (:meth:`code_usage`) is the EMA cluster size itself.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        *,
        zero_debias: bool = False,
        **codebook_options: Any,
    ) -> None:
        if "usage_decay" in codebook_options:
            raise ValueError(
                "VectorQuantizerEMA's usage statistic is its EMA cluster size (decay "
                "`decay`); it takes no usage_decay"
            )
        # usage_decay=None: no second usage EMA, the cluster sizes are the statistic
        super().__init__(num_embeddings, embedding_dim, usage_decay=None, **codebook_options)
        check_weights(commitment_cost=commitment_cost)
        if not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1]; got {decay!r}")
        check_positive(epsilon=epsilon)
        if zero_debias and decay >= 1.0:
            raise ValueError("zero_debias needs decay < 1 (the debias factor 1 - decay^t is 0)")
        self.commitment_cost = float(commitment_cost)
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        self.zero_debias = bool(zero_debias)
        k, d = num_embeddings, self.codebook_dim
        self.register_buffer("codebook", torch.empty(k, d))
        self.register_buffer("cluster_size", torch.empty(k))
        self.register_buffer("embed_sum", torch.empty(k, d))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Codebook ~ uniform(-sqrt(3/d), sqrt(3/d)), d = codebook_dim (Sonnet's
        variance scaling: codes of about unit norm, the scale of a freshly initialised
        encoder's output); statistics reset. The classic PyTorch port's N(0, 1) codes
        have norm ~sqrt(d), so at the start nearly every vector picks the one code of
        smallest norm."""
        bound = math.sqrt(3.0 / self.codebook_dim)  # the space the codes live in
        with torch.no_grad():
            self.codebook.uniform_(-bound, bound)
        self.reset_statistics()

    @torch.no_grad()
    def reset_statistics(self) -> None:
        """Restart the EMA from the current codebook (call after setting it by hand)."""
        self.num_updates.zero_()
        if self.zero_debias:
            self.cluster_size.zero_()
            self.embed_sum.zero_()
        else:
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(self.codebook)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize ``x`` (B, D, *spatial) (and update the codebook in training mode);
        ``mask`` (B, *spatial), True = padded: those positions are left out of the loss,
        the EMA update and the statistics (:mod:`vqkit.quantizers.masking`)."""
        self._validate(x, self.codebook.device)
        keep = keep_rows(mask, self.index_shape(x.shape), x.device)  # None without mask
        # the input itself by default; in-projected / normalised with those options
        flat = self._search_input(self.to_flat(x))
        indices, distances = self._assign(flat)
        quantized_flat = F.embedding(indices, self._search_codebook())  # pre-update codes
        commitment = masked_mse_terms(flat, quantized_flat, keep)["commitment"]
        if self.training:
            counts = self.update_codebook(flat, indices, keep)[0].long()
        else:
            counts = masked_counts(indices, self.num_embeddings, keep)
        losses = {"commitment": commitment}
        quantized = self._quantized(x, flat, quantized_flat)
        loss = self.commitment_cost * commitment
        return self._pack(x, quantized, indices, distances, counts, losses, loss)

    @torch.no_grad()
    def update_codebook(
        self, flat: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One EMA step from a batch ``flat`` (N, D) and its ``indices`` (N,) (only the
        rows where ``keep`` (N,) is True, when given).

        Returns the (globally summed, when distributed) counts (K,) and sums (K, D).
        """
        counts, sums = assignment_stats(flat, indices, self.num_embeddings, keep)
        if self.sync_stats:
            counts, sums = all_reduce_sum([counts, sums], self.process_group)
        # A globally empty batch carries no information: it must leave the statistics
        # and the codebook exactly as they are (not decay them, nor count a step).
        # Tensor-valued decay instead of a Python branch: no host sync, compile-friendly.
        observed = counts.sum() > 0
        decay = torch.where(observed, self.decay, 1.0)
        if self.decay < 1.0:
            ema_(self.cluster_size, counts, decay)
            ema_(self.embed_sum, sums, decay)
        self.num_updates += observed.to(self.num_updates.dtype)
        cluster_size, embed_sum = self.cluster_size, self.embed_sum
        if self.zero_debias:
            bias = 1.0 - torch.pow(
                torch.tensor(self.decay, dtype=torch.float64, device=flat.device),
                self.num_updates,
            ).to(torch.float32)
            cluster_size = cluster_size / bias
            embed_sum = embed_sum / bias
        smoothed = laplace_smooth(cluster_size, self.epsilon)
        # Keep the codebook when this batch was empty or nothing was ever observed.
        new = torch.where(
            (observed & (smoothed > 0)).unsqueeze(1),
            embed_sum / smoothed.clamp(min=1e-30).unsqueeze(1),
            self.codebook,
        )
        self.codebook.copy_(new)
        return counts, sums

    # -- codebook health: data-dependent init, dead codes, revival ----------------
    def _debias(self) -> float:
        """The factor the statistics are divided by: ``1 - decay^t`` under zero_debias
        (:func:`vqkit.metrics.ema_debias`), else 1."""
        return ema_debias(self.decay, int(self.num_updates)) if self.zero_debias else 1.0

    @property
    def tracks_usage(self) -> bool:
        return True

    def code_usage(self) -> torch.Tensor:
        """Float32 (K,): the EMA cluster sizes (vectors per global batch, debiased under
        zero_debias): this quantizer's usage statistic. Identical on every rank."""
        return self.cluster_size / max(self._debias(), 1e-30)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # checkpoints of vqkit <= 0.1 kept a second usage EMA here; the cluster sizes
        # are the statistic now
        for key in ("usage_ema", "usage_updates"):
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def _restart_statistics(self) -> None:
        """After a k-means init, the EMA statistics restart from the new codes
        (:meth:`reset_statistics`)."""
        self.reset_statistics()

    @torch.no_grad()
    def _restart_codes(
        self, revived: torch.Tensor, vectors: torch.Tensor, threshold: float
    ) -> None:
        """A revived code's statistics restart consistently: ``cluster_size = threshold``
        and ``embed_sum = vector * threshold`` (times the debias factor under
        zero_debias), so the next EMA update computes ``m_k / N_k`` = a weighted mean of
        the new vector and the vectors it attracts instead of snapping back to the old
        statistics. ``threshold`` is in expected assignments per GLOBAL batch, so its
        meaning does not change with the world size."""
        mass = threshold * self._debias()
        vectors = vectors.to(self.codebook.dtype)
        self.cluster_size.copy_(torch.where(revived, mass, self.cluster_size))
        self.embed_sum.copy_(torch.where(revived.unsqueeze(1), vectors * mass, self.embed_sum))

    def extra_repr(self) -> str:
        s = (
            f"{super().extra_repr()}, commitment_cost={self.commitment_cost}, "
            f"decay={self.decay}, epsilon={self.epsilon}"
        )
        return s + (", zero_debias=True" if self.zero_debias else "")


@dataclass
class EMAOptions(CodebookOptions):
    """Options of ``--quantizer ema``."""

    decay: float = option(
        0.99, "EMA decay of the codebook statistics", check=unit_interval, applies_to="ema"
    )
    epsilon: float = option(
        1e-5, "Laplace smoothing of the EMA cluster sizes", check=positive, applies_to="ema"
    )
    zero_debias: bool = option(
        False,
        "start the EMA at zero and debias it (Sonnet) instead of at the initial codes",
        applies_to="ema",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.zero_debias and self.decay >= 1.0:
            raise ValueError("zero_debias needs decay < 1 (the debias factor 1 - decay^t is 0)")

    def ema_kwargs(self) -> dict[str, Any]:
        return {
            **self.codebook_kwargs(),
            "decay": self.decay,
            "epsilon": self.epsilon,
            "zero_debias": self.zero_debias,
        }

    def build(self, dim: int) -> VectorQuantizerEMA:
        return VectorQuantizerEMA(self.num_embeddings, dim, **self.ema_kwargs())


register_quantizer("ema", EMAOptions, "EMA-updated codebook (van den Oord et al. 2017, A.1)")
