"""The one output type of every quantizer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["MAX_ENCODINGS_BYTES", "QuantizerOutput", "one_hot"]

MAX_ENCODINGS_BYTES = 2**31
"""Largest dense one-hot ``encodings`` built (2 GiB of float32); above it, the classic
4-tuple unpacking raises and points to ``out.indices``."""


def one_hot(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Float32 (N, K) one-hot of ``indices`` (any shape, flattened), written by one
    scatter into zeros: no int64 N x K intermediate (``F.one_hot`` builds one)."""
    flat = indices.reshape(-1, 1).long()
    need = flat.shape[0] * num_codes * 4
    if need > MAX_ENCODINGS_BYTES:
        raise MemoryError(
            f"the dense one-hot encodings would take {need / 2**30:.1f} GiB ({flat.shape[0]} x "
            f"{num_codes} float32), above vqkit.quantizers.output.MAX_ENCODINGS_BYTES "
            f"({MAX_ENCODINGS_BYTES / 2**30:.0f} GiB); use out.indices (the codes) instead "
            "of the classic 4-tuple's encodings"
        )
    out = torch.zeros(flat.shape[0], num_codes, dtype=torch.float32, device=indices.device)
    return out.scatter_(1, flat, 1.0)


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
        """Dense one-hot (N, K) float32 of ``indices`` (allocates N x K floats, nothing
        else; refused above :data:`MAX_ENCODINGS_BYTES`: use ``indices`` instead)."""
        return one_hot(self.indices, self.num_embeddings)

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Classic 4-tuple: (loss, quantized, perplexity, encodings).
        yield self.loss
        yield self.quantized
        yield self.perplexity
        yield self.encodings
