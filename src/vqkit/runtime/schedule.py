"""Learning-rate schedules of every job: linear warmup, then constant or cosine decay to a
floor. A pure function of the step and the options, so a resumed run continues exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["SCHEDULES", "Schedule", "lr_factor"]

SCHEDULES = ("constant", "cosine")


def lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> float:
    """The multiplier of the base learning rate for the update of step ``step`` (0-based:
    the first update is step 0).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (linear, never 0).
    Then ``"constant"``: 1; ``"cosine"``: ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with
    ``r = min_lr_ratio`` and ``p = (step - warmup_steps) / (total_steps - warmup_steps)``
    clamped to [0, 1], so the last update of the run uses about ``r`` times the base rate.
    Without warmup and with the constant schedule the factor is exactly 1.0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Schedule:
    """One optimizer's learning-rate schedule (every training job's: the tokenizer's
    ``--lr-schedule``, the prior's warm-up and cosine decay, and each optimizer of a
    job with several). ``lr(base, step)`` is the rate of the update of 0-based
    ``step``: ``base * (step + 1) / warmup_steps`` during the warmup, then
    ``base * lr_factor(step, ...)`` (exactly ``base`` for ``"constant"``)."""

    total_steps: int
    warmup_steps: int = 0
    kind: str = "constant"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.kind!r}")

    def lr(self, base: float, step: int) -> float:
        if step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        return base * lr_factor(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            schedule=self.kind,
            min_lr_ratio=self.min_lr_ratio,
        )

    @classmethod
    def of(cls, options: Any) -> Schedule:
        """The schedule of a job's options (:class:`vqkit.runtime.options.JobOptions`):
        ``steps``, ``warmup_steps``, ``lr_schedule``, ``min_lr_ratio``."""
        return cls(options.steps, options.warmup_steps, options.lr_schedule, options.min_lr_ratio)
