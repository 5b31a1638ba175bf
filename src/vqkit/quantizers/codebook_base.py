"""The base of the quantizers with an explicit (K, d) codebook searched by nearest L2
code (:class:`~vqkit.VectorQuantizer`, :class:`~vqkit.VectorQuantizerEMA`, the stages of
:class:`~vqkit.quantizers.ResidualVQ`), and the options they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..codebook import kmeans, kmeans_init, sample_replacements
from ..metrics import perplexity, usage_fraction
from ..options import nonneg, nonneg_int, option, positive_int
from ..search import DEFAULT_SCRATCH_BYTES, nearest_code
from .base import BaseQuantizer, check_code_memory, check_count, check_indices, check_weights
from .estimators import rotation_trick, straight_through
from .output import QuantizerOutput
from .registry import QuantizerOptions

__all__ = [
    "GRADIENTS",
    "CodebookLossOptions",
    "CodebookOptions",
    "CodebookQuantizer",
    "CommitmentOptions",
    "EntropyOptions",
    "LossTrainedQuantizer",
]


GRADIENTS = ("ste", "rotation")


@dataclass
class CommitmentOptions(QuantizerOptions):
    """The one declaration of ``commitment_cost``, shared by every kind with a commitment
    term (the codebook kinds and the codebook-free lfq / bsq)."""

    commitment_cost: float = option(
        0.25, "beta, weight of the commitment loss ||z_e - sg[e]||^2", check=nonneg
    )


@dataclass
class CodebookOptions(CommitmentOptions):
    """Options shared by the quantizers with an explicit codebook (vq, ema, rvq)."""

    num_embeddings: int = option(
        512, "K, the number of codes (per stage for rvq)", check=positive_int
    )
    codebook_dim: int = option(
        0,
        "search in a smaller code space with linear in/out projections (factorised codes, "
        "Yu et al. 2021); 0: embedding_dim",
        check=nonneg_int,
    )
    use_cosine: bool = option(False, "l2-normalised inputs and codes (cosine similarity)")
    gradient: str = option(
        "ste",
        "gradient estimator: ste (straight-through) or rotation (rotation trick, "
        "Fifty et al. 2024)",
        choices=GRADIENTS,
    )

    def codebook_kwargs(self) -> dict[str, Any]:
        """The constructor keywords of these options (0 codebook_dim: none)."""
        return {
            "commitment_cost": self.commitment_cost,
            "codebook_dim": self.codebook_dim or None,
            "use_cosine": self.use_cosine,
            "gradient": self.gradient,
        }


@dataclass
class CodebookLossOptions(CodebookOptions):
    """The one declaration of ``codebook_weight``, shared by the kinds whose loss has a
    codebook term (vq, simvq, ibq; rvq and gvq with vq layers)."""

    codebook_weight: float = option(
        1.0,
        "weight of the codebook loss ||sg[z_e] - e||^2 (1.0 in the VQ-VAE paper; IBQ's "
        "reference code uses 0.25 with --commitment-cost 1)",
        check=nonneg,
        applies_to="vq, simvq, ibq, rvq / gvq with vq layers",
    )


@dataclass
class EntropyOptions(QuantizerOptions):
    """The entropy penalty's options, declared once for lfq, bsq and ibq (their
    constructors take these names). ``entropy_weight`` None: the kind's own default,
    its constructor's (the kinds differ)."""

    entropy_weight: float = option(
        None,
        "weight of the entropy penalty, per-sample entropy - gamma x batch entropy (0: "
        "off; default: the kind's own, lfq and bsq 0.1, ibq 0.05)",
        type=float,
        check=nonneg,
        applies_to="lfq, bsq, ibq",
    )
    diversity_gamma: float = option(
        1.0,
        "gamma: entropy term = per-sample entropy - gamma * batch entropy",
        check=nonneg,
        applies_to="lfq, bsq, ibq",
    )

    def entropy_kwargs(self) -> dict[str, Any]:
        """The constructor keywords (``entropy_weight`` left out when None: the
        constructor's default applies)."""
        kw: dict[str, Any] = {"diversity_gamma": self.diversity_gamma}
        if self.entropy_weight is not None:
            kw["entropy_weight"] = self.entropy_weight
        return kw


class CodebookQuantizer(BaseQuantizer):
    """A quantizer with an explicit (K, d) codebook searched by nearest L2 code.

    Subclasses register ``codebook`` (a parameter or a buffer) of shape
    ``(num_embeddings, codebook_dim)`` and call ``_search_input`` / ``_assign`` /
    ``_search_codebook`` / ``_quantized`` / ``_pack`` from ``forward``.

    Options shared by the VQ layers (the defaults give the classic layer, whose
    forward runs exactly the ops it always did):

    * ``codebook_dim`` (default ``embedding_dim``): a smaller code space, with a
      linear in-projection ``embedding_dim -> codebook_dim`` before the search and
      an out-projection back after it (factorised codes, Yu et al. 2021,
      "Vector-quantized Image Modeling with Improved VQGAN"). The loss terms
      live in the code space; ``decode`` applies the out-projection.
    * ``use_cosine`` (alias ``l2_normalize``): inputs (after the in-projection)
      and codes are l2-normalised before the search and the lookup, so the
      nearest code is the one of largest cosine similarity, the quantized
      vectors are unit codes and the loss terms compare unit vectors.
    * ``gradient``: ``"ste"`` (straight-through: identity to the input) or
      ``"rotation"`` (the rotation trick, Fifty et al. 2024, see
      :func:`rotation_trick`). Either way the forward value is exactly the code.

    Usage tracking (every codebook quantizer): in training mode each forward folds the
    batch's per-code counts (summed over the ranks of ``process_group`` when
    ``torch.distributed`` is initialised and ``sync_stats``) into the buffer
    ``usage_ema`` with decay ``usage_decay``; :meth:`code_usage` and
    :meth:`dead_codes` read it. Under torch.distributed every rank must therefore call
    ``forward`` in training mode the same number of times (an empty local batch is
    fine), and the returned ``counts`` / ``perplexity`` / ``usage`` describe the
    global batch.
    """

    codebook: torch.Tensor
    supports_init = True
    supports_revival = True

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        channels_last: bool = False,
        check_finite: bool = True,
        max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
        search_backend: str = "torch",
        codebook_dim: int | None = None,
        use_cosine: bool = False,
        l2_normalize: bool | None = None,
        gradient: str = "ste",
        usage_decay: float | None = 0.99,
        process_group: dist.ProcessGroup | None = None,
        sync_stats: bool = True,
    ) -> None:
        super().__init__(embedding_dim, channels_last=channels_last, check_finite=check_finite)
        check_count(num_embeddings=num_embeddings)
        if not isinstance(max_scratch_bytes, int) or max_scratch_bytes < 4:
            raise ValueError(f"max_scratch_bytes must be an int >= 4; got {max_scratch_bytes!r}")
        if search_backend not in ("torch", "faiss", "auto"):
            raise ValueError(
                f"search_backend must be 'torch', 'faiss' or 'auto'; got {search_backend!r}"
            )
        if codebook_dim is None:
            codebook_dim = embedding_dim
        check_count(codebook_dim=codebook_dim)
        # float32 codes and usage statistic: a lower bound of what the kind keeps per code
        check_code_memory(type(self).__name__, num_embeddings, 4 * (codebook_dim + 1))
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {list(GRADIENTS)}; got {gradient!r}")
        if l2_normalize is not None:
            use_cosine = use_cosine or bool(l2_normalize)
        self.num_embeddings = num_embeddings
        self.num_codes = num_embeddings
        self.max_scratch_bytes = max_scratch_bytes
        self.search_backend = search_backend
        self.codebook_dim = codebook_dim
        self.use_cosine = bool(use_cosine)
        self.gradient = gradient
        if codebook_dim != embedding_dim:
            self.project_in: nn.Linear | None = nn.Linear(embedding_dim, codebook_dim)
            self.project_out: nn.Linear | None = nn.Linear(codebook_dim, embedding_dim)
        else:
            self.project_in = self.project_out = None
        # the classic layer: no projection, no normalisation, straight-through
        self._plain = self.project_in is None and not self.use_cosine and gradient == "ste"
        self._init_sync(process_group, sync_stats)
        if usage_decay is not None:  # None: the subclass keeps its own usage statistic
            self._init_usage(num_embeddings, usage_decay)

    def code_row_parameters(self) -> list[nn.Parameter]:
        return [self.codebook] if isinstance(self.codebook, nn.Parameter) else []

    def codebook_lr_parameters(self) -> list[nn.Parameter]:
        return self.code_row_parameters()

    # -- codebook health: one procedure; subclasses say how codes and statistics are set
    def _init_codes(self, x: torch.Tensor, iters: int, generator: torch.Generator | None) -> None:
        """The k-means centres of ``x`` (searched as ``forward`` does, i.e. in-projected /
        normalised with those options) become the codes; the statistics restart
        (:meth:`_restart_statistics`)."""
        centers = self._kmeans_centers(x, iters, generator)
        everything = torch.ones(self.num_embeddings, dtype=torch.bool, device=centers.device)
        self._set_codes(everything, centers)
        self._restart_statistics()

    def _revive_codes(
        self, x: torch.Tensor, threshold: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Dead codes take vectors of ``x`` (:func:`vqkit.codebook.sample_replacements`);
        their statistics restart at ``threshold`` (:meth:`_restart_codes`), so they have
        one usage horizon to be picked."""
        revived, vectors = self._replacements(x, self.dead_codes(threshold), generator)
        self._set_codes(revived, vectors)
        self._restart_codes(revived, vectors, threshold)
        return revived

    @torch.no_grad()
    def _set_codes(self, mask: torch.Tensor, vectors: torch.Tensor) -> None:
        """Make the codes (search space) of the rows in ``mask`` equal ``vectors``."""
        vectors = vectors.to(self.codebook.dtype)
        self.codebook.copy_(torch.where(mask.unsqueeze(1), vectors, self.codebook))

    @torch.no_grad()
    def _restart_statistics(self) -> None:
        """After a k-means init: usage statistics start again from nothing."""
        self.usage_ema.zero_()
        self.usage_updates.zero_()

    @torch.no_grad()
    def _restart_codes(
        self, revived: torch.Tensor, vectors: torch.Tensor, threshold: float
    ) -> None:
        """After a revival: the revived codes count as used ``threshold`` times per batch."""
        self._restart_usage(revived, threshold)

    def _kmeans_centers(
        self, x: torch.Tensor, iters: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """(K, codebook_dim) float32 k-means++ + ``iters`` Lloyd centres of ``x`` (an input
        of this layer or flat (N, embedding_dim) vectors, searched as ``forward`` does)
        of every rank of ``process_group`` (identical on all; local with
        ``sync_stats=False``)."""
        self._validate(x, self.codebook.device)  # shape, dtype, NaN/Inf, device
        flat = self._search_input(self.to_flat(x.detach()))
        if not self.sync_stats:
            return kmeans(flat, self.num_embeddings, iters, generator, self.max_scratch_bytes)
        return kmeans_init(
            flat,
            self.num_embeddings,
            iters,
            group=self.process_group,
            generator=generator,
            max_scratch_bytes=self.max_scratch_bytes,
        )

    def _replacements(
        self, x: torch.Tensor, dead: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask (K,), vectors (K, codebook_dim)): rows of the current global batch ``x``
        (an input of this layer or flat (N, embedding_dim) vectors, searched as
        ``forward`` does) for the ``dead`` codes; the same bits on every rank."""
        self._validate(x, self.codebook.device)  # shape, dtype, NaN/Inf, device
        flat = self._search_input(self.to_flat(x.detach()))
        return sample_replacements(
            flat, dead, group=self.process_group, sync=self.sync_stats, generator=generator
        )

    def _search_input(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, embedding_dim) -> the vectors that are searched and compared with the
        codes (N, codebook_dim): in-projected and/or l2-normalised (float32) when
        those options are on; ``flat`` itself otherwise."""
        flat = self._project(self.project_in, flat)  # any float dtype; NaN weights refused
        if self.use_cosine:
            flat = F.normalize(flat.to(torch.float32), dim=-1)
        return flat

    def _search_codebook(self) -> torch.Tensor:
        """The codes as searched and looked up: ``codebook``, l2-normalised rows when
        ``use_cosine`` (differentiable, K x d: no N x K)."""
        if self.use_cosine:
            return F.normalize(self.codebook, dim=-1)
        return self.codebook

    def _assign(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code per row of ``flat`` (N, D): (indices (N,), sq. distances (N,)).
        With ``check_finite`` the search also rejects a NaN/Inf code (a corrupted codebook
        would otherwise capture every vector)."""
        return nearest_code(
            flat,
            self._search_codebook(),
            max_scratch_bytes=self.max_scratch_bytes,
            backend=self.search_backend,
            check_finite=self.check_finite,
        )  # type: ignore[arg-type]

    def _quantized(
        self, x: torch.Tensor, flat: torch.Tensor, quantized_flat: torch.Tensor
    ) -> torch.Tensor:
        """The output tensor in ``x``'s layout and dtype: the chosen codes
        ``quantized_flat`` (N, d) with the configured gradient estimator from the searched
        vectors ``flat`` (straight-through or rotation; out-projected)."""
        if self._plain:
            quantized = self.from_flat(quantized_flat.to(x.dtype), x.shape)
            # Straight-through: the gradient of the classic x + sg[q - x] (identity to
            # x, none to the codebook), but the forward value is exactly the code, so
            # decode(indices) == quantized bit for bit.
            quantized = straight_through(x, quantized)
        else:
            # flat: the searched vectors (projected / normalised), quantized_flat: codes
            if self.gradient == "rotation":
                st = rotation_trick(flat, quantized_flat)
            else:
                st = straight_through(flat, quantized_flat)
            if self.project_out is not None:
                st = self.project_out(st)
            quantized = self.from_flat(st.to(x.dtype), x.shape)
        return quantized

    def _pack(
        self,
        x: torch.Tensor,
        quantized: torch.Tensor,
        indices: torch.Tensor,
        distances: torch.Tensor,
        counts: torch.Tensor,
        losses: dict[str, torch.Tensor],
        loss: torch.Tensor,
    ) -> QuantizerOutput:
        """The output for input ``x``: ``quantized`` (in ``x``'s layout), indices and
        distances (N,) shaped as the index map, perplexity and usage of ``counts``."""
        index_shape = self.index_shape(x.shape)
        return QuantizerOutput(
            quantized=quantized,
            loss=loss,
            perplexity=perplexity(counts),
            indices=indices.reshape(index_shape),
            losses=losses,
            usage=usage_fraction(counts),
            counts=counts,
            distances=distances.reshape(index_shape),
            num_embeddings=self.num_embeddings,
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> int64 index map (B, *spatial). Never updates a codebook."""
        self._validate(x, self.codebook.device)
        indices, _ = self._assign(self._search_input(self.to_flat(x)))
        return indices.reshape(self.index_shape(x.shape))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Map an index map (B, *spatial) back to codes in the input layout:
        (B, D, *spatial), or (B, *spatial, D) when ``channels_last`` (normalised
        codes when ``use_cosine``, out-projected when ``codebook_dim`` is set)."""
        check_indices(indices, self.codebook.device, self.num_embeddings)
        codes = F.embedding(indices.long(), self._search_codebook())  # (B, *spatial, d)
        if self.project_out is not None:
            codes = self.project_out(codes)
        return codes if self.channels_last else codes.movedim(-1, 1)

    lookup = decode

    def extra_repr(self) -> str:
        s = f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
        if self.project_in is not None:
            s += f", codebook_dim={self.codebook_dim}"
        if self.use_cosine:
            s += ", use_cosine=True"
        if self.gradient != "ste":
            s += f", gradient={self.gradient!r}"
        extra = super().extra_repr()
        return f"{s}, {extra}" if extra else s


class LossTrainedQuantizer(CodebookQuantizer):
    """A codebook trained by the loss (:class:`~vqkit.VectorQuantizer`, SimVQ, IBQ):
    ``loss = codebook_weight * ||sg[x] - e_k||^2 + commitment_cost * ||x - sg[e_k]||^2``
    (+ the subclass's terms). The two weights are checked and kept here (finite, >= 0),
    then the subclass makes its codes (:meth:`_make_codes`), after the projections.

    Args:
        num_embeddings, embedding_dim: K and D.
        commitment_cost: beta, the weight of the commitment term (0.25 in the paper).
        codebook_weight: weight of the codebook term (1.0 in the paper).
        **codebook_options: as for :class:`CodebookQuantizer`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        *,
        codebook_weight: float = 1.0,
        **codebook_options: Any,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, **codebook_options)
        check_weights(commitment_cost=commitment_cost, codebook_weight=codebook_weight)
        self.commitment_cost = float(commitment_cost)
        self.codebook_weight = float(codebook_weight)
        self._make_codes()

    def _make_codes(self) -> None:
        """Register ``codebook`` (and whatever else makes the codes)."""
        raise NotImplementedError
