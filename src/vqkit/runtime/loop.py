"""The one run loop every training job uses (the tokenizer, the prior, and later ones).

A job (:class:`vqkit.runtime.job.Job`: the runtime around this loop) supplies its state,
its step and its evaluation; the loop owns the rest, written once:

* the learning rates: before every update each of the job's optimizers
  (:class:`ScheduledOptimizer`: an optimizer, its base rates, its own
  :class:`~vqkit.training.optim.Schedule` and, for fp16, its own gradient scaler) gets
  the rate of that step, so a job with a generator and a discriminator optimizer
  declares two and needs nothing else;
* the global step figures: one all-reduce per step through
  :func:`vqkit.distributed.step_figures` (losses averaged over the ranks, per-code
  counts summed, and whether any rank was asked to stop), so every rank stops at the
  same step;
* the cadence: a ``"train"`` record every ``log_every`` steps, the job's periodic
  evaluation (rank 0 alone, no collective inside, so the other ranks cannot hang on it)
  and a checkpoint every ``eval_every`` steps, a checkpoint when ``ckpt_minutes`` have
  passed on rank 0's clock (the decision travels in the step's all-reduce, so every rank
  saves at the same step), and at the end;
* the deferred Ctrl-C (:class:`~vqkit.runtime.interrupt.DeferredInterrupt`): the
  first SIGINT finishes the step in flight, then the checkpoint is written (shielded by
  :func:`~vqkit.runtime.interrupt.no_interrupt`) and ``KeyboardInterrupt`` re-raised.
  A checkpoint always holds one step boundary: a hard interrupt (a second SIGINT) that
  lands inside a step writes nothing, since by then the weights, an optimizer or the
  quantizer's statistics may be a step ahead of the step number (after
  ``optimizer.step()``, or between a generator's and a discriminator's update);
  ``last.pt`` keeps the last boundary saved, which ``--resume`` continues exactly;
* a non-finite loss stops the run with one line; the progress bar (rank 0) with the
  job's figures and an ETA; ``metrics.jsonl`` records through the run directory.

Per step, in this order::

    batch = job.next_batch()
    for each optimizer: set the learning rate of step ``job.step``
    result = job.update(batch, progress)              # forward, backward, updates
    values, counts, stop, save = step_figures(...)    # one all-reduce (DDP)
    job.step += 1;  job.observe(batch, values, counts)
    log / evaluate / save as due;  stop if any rank was asked to
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import distributed
from ..storage.rundir import RunDir
from .interrupt import DeferredInterrupt, no_interrupt
from .schedule import Schedule

__all__ = [
    "Cadence",
    "Job",
    "Progress",
    "RunLoop",
    "ScheduledOptimizer",
    "StepResult",
]

_clock = time.monotonic  # the clock of ckpt_minutes (a test replaces it)


@dataclass(frozen=True)
class Cadence:
    """How long the loop runs and how often it logs, evaluates and saves."""

    steps: int
    log_every: int
    eval_every: int
    ckpt_minutes: float = 0.0
    progress: bool = True
    desc: str = "train"

    @classmethod
    def of(cls, config: Any, desc: str) -> Cadence:
        """The cadence of a job's options (:class:`vqkit.runtime.options.JobOptions`)."""
        return cls(
            config.steps,
            config.log_every,
            config.eval_every,
            config.ckpt_minutes,
            config.progress,
            desc,
        )


@dataclass
class ScheduledOptimizer:
    """An optimizer, the base rate of each of its param groups and its schedule; and its
    gradient scaler (fp16), which the job uses in its update and checkpoints."""

    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    schedule: Schedule
    scaler: torch.amp.GradScaler | None = None

    def set_lr(self, step: int) -> float:
        """Each group's rate for the update of 0-based ``step``; returns the first's."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = self.schedule.lr(base, step)
        return float(self.optimizer.param_groups[0]["lr"])


@dataclass
class StepResult:
    """What one update reports: its figures (floats, averaged over the ranks by the
    loop) and optionally per-code counts (summed over the ranks when ``sum_counts``;
    left as they are when the job's counts are global already)."""

    values: dict[str, float]
    counts: torch.Tensor | None = None
    sum_counts: bool = False


class Progress:
    """The progress bar of rank 0 (tqdm: step, the job's figures, ETA); a no-op
    elsewhere. ``write`` prints above the bar (or plainly without one, on rank 0)."""

    def __init__(self, enabled: bool, is_main: bool, total: int, initial: int, desc: str):
        self.is_main = is_main
        self.bar: Any = None
        if enabled and is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True
            )
        self.desc = desc

    def advance(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.is_main:
            print(message, flush=True)

    def phase(self, name: str | None, message: str = "") -> None:
        """Show that a long phase (k-means init) runs: the bar's label, else a line."""
        if self.bar is not None:
            self.bar.set_description_str(name or self.desc)
        elif name is not None and message and self.is_main:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Job(Protocol):
    """What the loop calls: :class:`vqkit.runtime.job.Job` implements the generic members
    (window, best checkpoint, saving) and a concrete job the rest. ``step`` counts the
    updates done (the loop advances it); ``is_main`` is rank 0; ``loss_key`` names the
    figure that must stay finite; ``last_path`` is where :meth:`save` writes."""

    step: int
    is_main: bool
    device: torch.device
    loss_key: str
    last_path: Path

    def optimizers(self) -> list[ScheduledOptimizer]: ...
    def next_batch(self) -> Any: ...
    def update(self, batch: Any, progress: Progress) -> StepResult: ...
    def observe(self, batch: Any, values: dict[str, float], counts: Any) -> None: ...
    def train_record(self) -> dict[str, Any]: ...
    def postfix(self, values: dict[str, float]) -> dict[str, str]: ...
    def periodic_eval(self) -> dict[str, Any]: ...
    def after_eval(self, record: dict[str, Any]) -> None: ...
    def save(self, *, collective: bool = True) -> None: ...


@dataclass
class RunLoop:
    """Runs a :class:`Job` to ``cadence.steps`` (see the module docstring)."""

    job: Job
    cadence: Cadence
    run: RunDir
    world: int = 1
    _saved_at: float = field(default=0.0, init=False)
    _stopping: bool = field(default=False, init=False)  # the loop's own, collective stop

    def _log(self, record: dict[str, Any]) -> None:
        if self.job.is_main:
            self.run.log(record)

    def save(self, *, collective: bool = True) -> None:
        self.job.save(collective=collective)
        self._saved_at = _clock()

    def run_steps(self, until: int | None = None) -> bool:
        """Train to ``cadence.steps`` (or stop after step ``until``, saving as an
        interruption would); True when the run reached its end. Re-raises
        ``KeyboardInterrupt`` after saving when interrupted at a step boundary."""
        job, cad = self.job, self.cadence
        end = cad.steps if until is None else min(until, cad.steps)
        progress = Progress(cad.progress, job.is_main, cad.steps, job.step, cad.desc)
        stop = DeferredInterrupt()
        self._saved_at = _clock()
        self._stopping = False
        try:
            with stop:
                while job.step < end:
                    stop.completed_step = False  # _step sets it once the step is whole
                    self._step(progress, stop)
        except KeyboardInterrupt:
            progress.close()
            self._interrupted(stop.completed_step)
            raise
        progress.close()
        if job.step < cad.steps:  # stopped at ``until``
            self.save()
            return False
        return True

    def _interrupted(self, at_boundary: bool) -> None:
        """Save a checkpoint that holds one step boundary, or none (module docstring)."""
        job = self.job
        if not at_boundary:
            if job.is_main:
                held = (
                    f"{job.last_path} keeps its last save"
                    if job.last_path.exists()
                    else ("no checkpoint was written yet")
                )
                print(
                    f"\ninterrupted inside step {job.step + 1}: not saved (the weights may "
                    f"be ahead of the step); {held}; continue with --resume",
                    flush=True,
                )
            return
        with no_interrupt("writing the checkpoint; it finishes in a moment"):
            # the loop's own stop is every rank's, at the same step: a collective save;
            # a hard interrupt between steps reaches this rank alone
            self.save(collective=self._stopping)
        if job.is_main:
            print(
                f"\ninterrupted at step {job.step}: saved {job.last_path}; continue with --resume"
            )

    def _step(self, progress: Progress, stop: DeferredInterrupt) -> None:
        job, cad = self.job, self.cadence
        batch = job.next_batch()
        for opt in job.optimizers():
            opt.set_lr(job.step)
        result = job.update(batch, progress)
        values, counts, stop_any = result.values, result.counts, stop.requested
        # rank 0's clock decides a ckpt_minutes save; the all-reduce tells every rank
        save_any = bool(
            cad.ckpt_minutes
            and job.is_main
            and _clock() - self._saved_at >= 60.0 * cad.ckpt_minutes
        )
        if self.world > 1:
            values, summed, stop_any, save_any = distributed.step_figures(
                values,
                stop.requested,
                job.device,
                counts if result.sum_counts else None,
                save=save_any,
            )
            if result.sum_counts:
                counts = summed
        job.step += 1
        job.observe(batch, values, counts)
        stop.completed_step = True  # whole from here: a hard interrupt saves this boundary
        loss = values[job.loss_key]
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss} at step {job.step}; lower the learning rate (--lr)"
            )
        progress.advance(job.postfix(values))
        step = job.step
        if step % cad.log_every == 0 or step == cad.steps:
            self._log({"kind": "train", "step": step, **job.train_record()})
        if step % cad.eval_every == 0 or step == cad.steps:
            if job.is_main:  # no collective inside: the other ranks go on
                record = job.periodic_eval()
                self._log({"kind": "eval", "step": step, **record})
                job.after_eval(record)
            self.save()
        elif save_any:
            self.save()
        if stop_any:
            self._stopping = True
            raise KeyboardInterrupt
