"""The gradient-trained vector quantizer of VQ-VAE (van den Oord et al., 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..codebook import kmeans_init
from ..metrics import code_counts
from ..search import DEFAULT_SCRATCH_BYTES
from .base import CodebookQuantizer, QuantizerOutput, mse_terms

__all__ = ["VectorQuantizer"]


class VectorQuantizer(CodebookQuantizer):
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
        codebook_weight: weight of the codebook term (1.0 in the paper).
        channels_last: inputs are (B, *spatial, D) instead of (B, D, *spatial).
        check_finite: reject NaN/Inf inputs with a ValueError (one extra pass
            over the input and a host sync per call; off while compiling).
        max_scratch_bytes: memory bound of the search's scratch tile.
        search_backend: "torch" (default), "faiss" or "auto"; see
            :func:`vqkit.search.nearest_code`.
        codebook_dim: a smaller code space with linear in/out projections
            (factorised codes); ``use_cosine`` / ``l2_normalize``: l2-normalised
            inputs and codes (cosine-similarity search); ``gradient``: ``"ste"`` or
            ``"rotation"`` (the rotation trick). See
            :class:`~vqkit.quantizers.CodebookQuantizer`; the defaults are the
            classic layer.

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
        codebook_weight: float = 1.0,
        channels_last: bool = False,
        check_finite: bool = True,
        max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
        search_backend: str = "torch",
        codebook_dim: int | None = None,
        use_cosine: bool = False,
        l2_normalize: bool | None = None,
        gradient: str = "ste",
    ) -> None:
        super().__init__(
            num_embeddings,
            embedding_dim,
            channels_last=channels_last,
            check_finite=check_finite,
            max_scratch_bytes=max_scratch_bytes,
            search_backend=search_backend,
            codebook_dim=codebook_dim,
            use_cosine=use_cosine,
            l2_normalize=l2_normalize,
            gradient=gradient,
        )
        for name, v in (("commitment_cost", commitment_cost), ("codebook_weight", codebook_weight)):
            if not isinstance(v, (int, float)) or v < 0 or v != v:
                raise ValueError(f"{name} must be a non-negative number; got {v!r}")
        self.commitment_cost = float(commitment_cost)
        self.codebook_weight = float(codebook_weight)
        self.codebook = nn.Parameter(torch.empty(num_embeddings, self.codebook_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        k = self.num_embeddings
        nn.init.uniform_(self.codebook, -1.0 / k, 1.0 / k)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        self._validate(x, self.codebook.device)
        flat = self._search_input(self.to_flat(x))  # the input itself by default
        indices, distances = self._assign(flat)
        quantized_flat = F.embedding(indices, self._search_codebook())
        losses = mse_terms(flat, quantized_flat)
        loss = (
            self.codebook_weight * losses["codebook"] + self.commitment_cost * losses["commitment"]
        )
        counts = code_counts(indices, self.num_embeddings)
        return self._output(x, flat, quantized_flat, indices, distances, counts, losses, loss)

    @torch.no_grad()
    def init_codebook_kmeans(
        self,
        x: torch.Tensor,
        iters: int = 10,
        generator: torch.Generator | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        """Set the codebook to k-means++ + ``iters`` Lloyd iterations on ``x`` (an input of
        this layer, or flat (N, embedding_dim) vectors; searched as ``forward`` does, i.e.
        in-projected / normalised with those options) of every rank of ``process_group``,
        identical on all. Explicit (never inside ``forward``); call it before the optimizer
        steps, since optimizer moments for the codebook are not reset here."""
        flat = self._search_input(self.to_flat(x))
        centers = kmeans_init(
            flat,
            self.num_embeddings,
            iters,
            group=process_group,
            generator=generator,
            max_scratch_bytes=self.max_scratch_bytes,
        )
        self.codebook.copy_(centers.to(self.codebook.dtype))

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, commitment_cost={self.commitment_cost}"
        if self.codebook_weight != 1.0:
            s += f", codebook_weight={self.codebook_weight}"
        return s
