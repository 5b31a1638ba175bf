"""The training jobs' codebook-health policy: k-means init at step 0, dead-code
revival every ``revive_every`` steps (with the optimizer's state of revived rows
restarted) and the logged health figures; its options (:class:`HealthOptions`),
declared once here for both jobs of ``vqkit train`` (the image tokenizer,
:mod:`.tokenizer`, and the speech codec, :mod:`.audio_trainer`). It talks to the
quantizer only through the contract of :class:`~vqkit.quantizers.BaseQuantizer`.

Latents are the quantizer's inputs: ``(B, D, h, w)`` maps of the image job, ``(B, D, T)``
frame sequences of the codec, whose padding frames (``masks``, ``(B, T)``, True =
padded: :mod:`vqkit.quantizers.masking`) are left out of the init and the revival.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..codebook import kmeans_defaults, reset_optimizer_rows
from ..errors import UserError
from ..metrics import codebook_health, group_health, perplexity, usage_fraction
from ..options import Options, nonneg_int, option, positive
from ..quantizers import BaseQuantizer
from .optim import WeightEMA

__all__ = [
    "CodebookHealth",
    "HealthConfig",
    "HealthOptions",
    "seeded_generator",
    "with_global_usage",
]


@dataclass
class HealthOptions(Options):
    """The codebook-health options of both training jobs, declared once: a job's flat
    config composes this group (the image job's :class:`~vqkit.training.config.
    TrainConfig`, the codec's :class:`~vqkit.training.audio_config.AudioTrainConfig`).
    ``init="auto"`` and the None defaults are resolved per run by
    :meth:`health_defaults`, and a resumed run takes them from its checkpoint
    (:meth:`stored_health`)."""

    # the defaults left open: resolved per run from the quantizer and the batch
    OPEN: ClassVar[dict[str, Any]] = {
        "init": "auto",
        "revive_every": None,
        "dead_threshold": None,
        "init_iters": None,
    }

    init: str = option(
        "auto",
        "codebook init: kmeans (k-means++ and --init-iters Lloyd iterations on the latents "
        "of --init-batches batches, all processes), random (the quantizer's own), or auto "
        "(kmeans when the quantizer has a codebook)",
        choices=("auto", "random", "kmeans"),
        on_resume="fixed",
    )
    init_iters: int = option(
        None,
        "Lloyd iterations of the k-means init; default: 10 up to 4096 codes, fewer above "
        "(ceil(40960 / K), at least 2)",
        type=int,
        check=nonneg_int,
        on_resume="fixed",
    )
    init_batches: int = option(
        0,
        "batches per process for --init kmeans; 0: enough for 16 vectors per code up to "
        "4096 codes, fewer above (16 * 4096 / K, at least 2)",
        check=nonneg_int,
        on_resume="fixed",
    )
    revive_every: int = option(
        None,
        "every N steps replace dead codes by latents of the current batch (and restart "
        "their optimizer state); 0: never; default: 20 when the quantizer can revive codes",
        type=int,
        check=nonneg_int,
    )
    dead_threshold: float = option(
        None,
        "a code is dead when its usage is below this many assignments per global batch "
        "(revival and the logged 'dead' count); default: --dead-fraction of a uniform "
        "code's share",
        type=float,
        check=positive,
    )
    dead_fraction: float = option(
        1 / 16,
        "the default --dead-threshold as a fraction of a uniform code's share (vectors per "
        "global batch / codes), so it transfers across codebook and batch sizes",
        check=positive,
    )

    def stored_health(self, stored: dict[str, Any]) -> dict[str, Any]:
        """The options of :attr:`OPEN` this config leaves open, as a resumed run's
        ``stored`` config resolved them (so a resume keeps the run's values)."""
        return {k: stored[k] for k, v in self.OPEN.items() if getattr(self, k) == v and k in stored}

    def health_defaults(
        self, supports_init: bool, supports_revival: bool, vectors_per_batch: int, codes: int
    ) -> dict[str, Any]:
        """The defaults that depend on the quantizer and the batch, made explicit (so the
        stored config keeps its meaning if the defaults change): ``init="auto"`` ->
        kmeans when the quantizer supports it; ``revive_every=None`` -> 20 when it can
        revive codes, else 0; ``dead_threshold=None`` -> ``dead_fraction`` of a uniform
        code's share, ``vectors_per_batch / codes`` assignments per global batch;
        ``init_iters=None`` -> :func:`~vqkit.codebook.kmeans_defaults`' iterations for
        ``codes`` (10 up to 4096 codes)."""
        init = self.init
        if init == "auto":
            init = "kmeans" if supports_init else "random"
        revive = self.revive_every
        if revive is None:
            revive = 20 if supports_revival else 0
        threshold = self.dead_threshold
        if threshold is None:
            threshold = self.dead_fraction * vectors_per_batch / max(codes, 1)
        iters = self.init_iters
        if iters is None:
            iters = kmeans_defaults(codes)[1]
        return {
            "init": init,
            "revive_every": revive,
            "dead_threshold": threshold,
            "init_iters": iters,
        }


class HealthConfig(Protocol):
    """What :class:`CodebookHealth` reads of a job's config: :class:`HealthOptions`
    resolved (:meth:`HealthOptions.health_defaults`), and the job's batch size (per
    process) and seed."""

    init: str
    init_iters: int
    init_batches: int
    revive_every: int
    dead_threshold: float
    batch_size: int
    seed: int


def seeded_generator(seed: int, *tag: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *tag): the same on every rank, no state to save,
    and the global RNG is left alone."""
    g = torch.Generator()
    g.manual_seed(hash((seed, *tag)) & ((1 << 62) - 1))
    return g


class CodebookHealth:
    """Init, revival and health figures for one run's quantizer (see the module doc).

    Options are checked against the quantizer's contract on construction, so an
    unsupported combination fails before the first step."""

    def __init__(self, config: HealthConfig, quantizer: BaseQuantizer) -> None:
        self.config = config
        self.quantizer = quantizer
        name = type(quantizer).__name__
        if config.init == "kmeans" and not quantizer.supports_init:
            raise UserError(
                f"init='kmeans' is not supported by {name} (no k-means init; its docstring "
                "says why); use --init auto or random"
            )
        if config.revive_every and not quantizer.supports_revival:
            raise UserError(
                f"revive_every is not supported by {name} (it cannot revive dead codes; its "
                "docstring says why); use --revive-every 0"
            )

    def init_batch_count(self, positions: int, world: int) -> int:
        """Batches (per rank) whose latents feed the k-means init: ``init_batches``, or
        (0) enough for :func:`~vqkit.codebook.kmeans_defaults`'s vectors per code (16 up
        to 4096 codes, fewer above: the init's work stays minutes at K = 65536), at least
        one; ``positions`` are the latent positions per input (an image's latent map,
        a crop's frames)."""
        if self.config.init_batches:
            return self.config.init_batches
        k = self.quantizer.num_codes
        per_batch = self.config.batch_size * world * positions
        return max(1, math.ceil(kmeans_defaults(k)[0] * k / per_batch))

    @torch.no_grad()
    def init_codebook(
        self, latents: list[torch.Tensor], masks: list[torch.Tensor] | None = None
    ) -> None:
        """k-means on the latents (each ``(B, D, *spatial)``) of every rank; ``masks``
        (each ``(B, *spatial)``, True = padded), when given, leave padding out."""
        q = self.quantizer
        flats = [q.to_flat(z) for z in latents]
        if masks is not None:
            flats = [f[~m.reshape(-1).to(f.device)] for f, m in zip(flats, masks, strict=True)]
        flat = torch.cat(flats)
        q.init_codebook_kmeans(
            flat, iters=self.config.init_iters, generator=seeded_generator(self.config.seed, 0)
        )

    def due(self, step: int) -> bool:
        """Whether revival runs after training step ``step``."""
        every = self.config.revive_every
        return bool(every) and step % every == 0

    def revive(
        self,
        latents: torch.Tensor,
        step: int,
        optimizer: torch.optim.Optimizer,
        weight_ema: WeightEMA | None = None,
        model: nn.Module | None = None,
        mask: torch.Tensor | None = None,
    ) -> int:
        """Replace dead codes by latents (``(B, D, *spatial)``; ``mask`` ``(B, *spatial)``,
        True = padded, left out) of this step's global batch (same on all ranks); the
        optimizer's state of the revived rows is restarted too, so momentum cannot pull
        them back, and so is their weight average (``weight_ema`` of ``model``, whose
        quantizer is ``model.quantizer``). A quantizer of Q codebooks (residual VQ's
        stages) returns a (Q, K) mask: row i restarts the i-th of its
        ``code_row_parameters()``, and the weight average restarts the rows revived in
        any stage (it cannot tell the stages' entries apart). Returns the number of
        revived codes."""
        revived = self.quantizer.revive_dead_codes(
            latents,
            threshold=self.config.dead_threshold,
            generator=seeded_generator(self.config.seed, 1, step),
            mask=mask,
        )
        params = self.quantizer.code_row_parameters()
        if revived.dim() == 1:
            rows = [revived] * len(params)
        elif params and len(params) != revived.shape[0]:
            raise RuntimeError(
                f"{type(self.quantizer).__name__} revived {revived.shape[0]} codebooks but "
                f"lists {len(params)} code-row parameters"
            )
        else:
            rows = list(revived)
        for p, r in zip(params, rows, strict=False):
            reset_optimizer_rows(optimizer, p, r)
        if weight_ema is not None and model is not None and bool(revived.any()):
            union = revived if revived.dim() == 1 else revived.any(0)
            weight_ema.reset_rows(model, "quantizer.", union)
        return int(revived.sum())

    def figures(
        self, window_counts: torch.Tensor | None, group_counts: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """``dead`` (by the quantizer's usage statistic when it keeps one, else codes
        unused in the window), ``codes_used`` and ``window_perplexity``; None each when
        the quantizer counts no codes (a huge implicit codebook). With code groups (the
        quantizer's ``code_groups``, e.g. a multi-scale tokenizer's scales) and the
        window's ``group_counts`` (G, K), also ``code_groups``: per group name, the same
        three figures and ``window_usage`` (:func:`vqkit.metrics.group_health`)."""
        if window_counts is None:
            return {"dead": None, "codes_used": None, "window_perplexity": None}
        h = codebook_health(window_counts)  # dead: unused in the window, unless ...
        if self.quantizer.code_usage() is not None:  # ... the quantizer's own definition
            h["dead"] = int(self.quantizer.dead_codes(self.config.dead_threshold).sum())
        out: dict[str, Any] = {
            "dead": h["dead"],
            "codes_used": h["codes_used"],
            "window_perplexity": h["perplexity"],
        }
        names = self.quantizer.code_groups
        if names is not None and group_counts is not None:
            out["code_groups"] = group_health(
                names,
                group_counts,
                self.quantizer.group_code_usage(),
                self.config.dead_threshold,
                window=True,
            )
        return out


def with_global_usage(values: dict[str, float], counts: torch.Tensor | None) -> None:
    """For one codebook, the step's perplexity and usage recomputed from the global
    batch's counts (the ranks' own figures, averaged by the run loop, are not those of
    the global batch); in place."""
    if counts is not None and counts.dim() == 1:
        values["perplexity"] = float(perplexity(counts))
        values["usage"] = float(usage_fraction(counts))
