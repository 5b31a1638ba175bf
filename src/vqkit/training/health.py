"""The trainer's codebook-health policy: k-means init at step 0, dead-code revival
every ``revive_every`` steps (with the optimizer's state of revived rows restarted)
and the logged health figures. It talks to the quantizer only through the contract
of :class:`~vqkit.quantizers.BaseQuantizer`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..codebook import kmeans_defaults, reset_optimizer_rows
from ..errors import UserError
from ..metrics import codebook_health, group_health, perplexity, usage_fraction
from ..quantizers import BaseQuantizer
from .config import TrainConfig
from .optim import WeightEMA

__all__ = ["CodebookHealth", "seeded_generator", "with_global_usage"]


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

    def __init__(self, config: TrainConfig, quantizer: BaseQuantizer) -> None:
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
        one; ``positions`` are the latent positions per image."""
        if self.config.init_batches:
            return self.config.init_batches
        k = self.quantizer.num_codes
        per_batch = self.config.batch_size * world * positions
        return max(1, math.ceil(kmeans_defaults(k)[0] * k / per_batch))

    @torch.no_grad()
    def init_codebook(self, latents: list[torch.Tensor]) -> None:
        """k-means on the latents (each ``(B, D, h, w)``) of every rank."""
        q = self.quantizer
        flat = torch.cat([q.to_flat(z) for z in latents])
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
    ) -> int:
        """Replace dead codes by latents of this step's global batch (same on all ranks);
        the optimizer's state of the revived rows is restarted too, so momentum cannot
        pull them back, and so is their weight average (``weight_ema`` of ``model``, whose
        quantizer is ``model.quantizer``). Returns the number of revived codes."""
        mask = self.quantizer.revive_dead_codes(
            latents,
            threshold=self.config.dead_threshold,
            generator=seeded_generator(self.config.seed, 1, step),
        )
        for p in self.quantizer.code_row_parameters():
            reset_optimizer_rows(optimizer, p, mask)
        if weight_ema is not None and model is not None and bool(mask.any()):
            weight_ema.reset_rows(model, "quantizer.", mask)
        return int(mask.sum())

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
        h = codebook_health(
            window_counts,
            ema_counts=self.quantizer.code_usage(),
            threshold=self.config.dead_threshold,
        )
        if self.quantizer.code_usage() is not None:  # the quantizer's own definition
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
