"""The one output type of every quantizer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["QuantizerOutput"]


@dataclass
class QuantizerOutput:
    """Result of a quantizer's forward pass.

    Attributes:
        quantized: straight-through quantized tensor, same shape and dtype as
            the input (forward value = chosen codes, gradient = identity).
        loss: scalar, the weighted sum of ``losses``.
        perplexity: scalar, ``exp(entropy)`` of code usage in this batch.
        indices: int64 ``(B, *spatial)`` chosen code per position
            (``(B, *spatial, Q)`` for a Q-stage :class:`ResidualVQ`).
        losses: named unweighted loss terms (e.g. ``codebook``, ``commitment``);
            empty for quantizers without loss terms (FSQ, whose ``loss`` is 0).
        usage: scalar, fraction of the K codes used at least once in this batch.
        counts: int64 (K,) number of positions assigned to each code ((Q, K) per
            stage for ResidualVQ; None for an FSQ too large to bincount).
        distances: float32 ``(B, *spatial)`` squared distance to the chosen code
            (in the search space; None where there is no search).
        num_embeddings: K, needed to build ``encodings`` on demand.
        stages: for ResidualVQ, each stage's own output (on that stage's
            residual, flattened to (N, D)); None otherwise.

    Unpacks like the classic VQ-VAE module:
    ``loss, quantized, perplexity, encodings = vq(x)``. ``encodings`` is the
    dense (N, K) float one-hot; it is built only when accessed (N x K memory).
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    usage: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    distances: torch.Tensor | None = None
    num_embeddings: int = 0
    stages: list[QuantizerOutput] | None = None

    @property
    def encodings(self) -> torch.Tensor:
        """Dense one-hot (N, K) float32 of ``indices`` (allocates N x K)."""
        flat = self.indices.reshape(-1)
        return F.one_hot(flat, self.num_embeddings).to(torch.float32)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Classic 4-tuple: (loss, quantized, perplexity, encodings).
        yield self.loss
        yield self.quantized
        yield self.perplexity
        yield self.encodings
