"""The one run loop every training job uses (the tokenizer, the prior, and later ones).

A job supplies its state, its step and its evaluation (:class:`Job`); the loop owns the
rest, written once:

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
  passed, and at the end;
* the deferred Ctrl-C (:class:`~vqkit.training.interrupt.DeferredInterrupt`): the
  first SIGINT finishes the step in flight, then the checkpoint is written (shielded by
  :func:`~vqkit.training.interrupt.no_interrupt`) and ``KeyboardInterrupt`` re-raised;
  a hard interrupt inside a step rewinds the job's data position to before that step's
  draw, so the batch is drawn again on resume and ``--resume`` reproduces the
  uninterrupted run bit for bit;
* a non-finite loss stops the run with one line; the progress bar (rank 0) with the
  job's figures and an ETA; ``metrics.jsonl`` records through the run directory.

Per step, in this order::

    state = job.data_state();  batch = job.next_batch()
    for each optimizer: set the learning rate of step ``job.step``
    result = job.update(batch, progress)              # forward, backward, updates
    values, counts, stop = step_figures(result, ...)  # one all-reduce (DDP)
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
from ..options import nonneg, option, positive_int
from ..storage.rundir import RunDir
from ..storage.tensorboard import TensorBoardOptions
from .interrupt import DeferredInterrupt, no_interrupt
from .optim import Schedule

__all__ = [
    "Cadence",
    "Job",
    "LoaderJob",
    "Progress",
    "RunLoop",
    "RunOptions",
    "ScheduledOptimizer",
    "StepResult",
]

_clock = time.monotonic  # the clock of ckpt_minutes (a test replaces it)


@dataclass
class RunOptions(TensorBoardOptions):
    """The run loop's options, declared once: every job's options inherit them
    (``TrainOptions``, ``PriorTrainConfig``), so ``--log-every`` & co. mean the same in
    every command, and an option added here reaches every job's CLI, config files and
    checkpoints. (``steps`` stays with each job: its default is the job's.) ``tensorboard``
    is inherited from its declaration beside the sink, :mod:`vqkit.storage.tensorboard`."""

    log_every: int = option(50, "write a train record every N steps", check=positive_int)
    eval_every: int = option(
        500, "evaluate and write checkpoints/last.pt every N steps", check=positive_int
    )
    ckpt_minutes: float = option(
        0.0,
        "also write checkpoints/last.pt when this many minutes passed since the last one "
        "(0: only every --eval-every steps)",
        check=nonneg,
    )
    progress: bool = option(True, "show a progress bar")


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
        """The cadence of a job's config: its ``steps`` and its :class:`RunOptions`."""
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
    """What a training job gives the loop. ``step`` counts the updates done (the loop
    advances it); ``is_main`` is rank 0; ``loss_key`` names the figure that must stay
    finite; ``last_path`` is where :meth:`save` writes."""

    step: int
    is_main: bool
    device: torch.device
    loss_key: str
    last_path: Path

    def optimizers(self) -> list[ScheduledOptimizer]: ...
    def data_state(self) -> Any: ...
    def restore_data_state(self, state: Any) -> None: ...
    def next_batch(self) -> Any: ...
    def update(self, batch: Any, progress: Progress) -> StepResult: ...
    def observe(self, batch: Any, values: dict[str, float], counts: Any) -> None: ...
    def train_record(self) -> dict[str, Any]: ...
    def postfix(self, values: dict[str, float]) -> dict[str, str]: ...
    def periodic_eval(self) -> dict[str, Any]: ...
    def after_eval(self, record: dict[str, Any]) -> None: ...
    def save(self) -> None: ...


class LoaderJob:
    """The parts of a :class:`Job` that one resumable loader (``self.loader``: with
    ``next_batch``, ``state_dict``, ``load_state_dict``) and one optimizer
    (``self.scheduled``) give, written once for the jobs that have just those."""

    loader: Any
    scheduled: ScheduledOptimizer

    def optimizers(self) -> list[ScheduledOptimizer]:
        return [self.scheduled]

    def data_state(self) -> Any:
        return self.loader.state_dict()

    def restore_data_state(self, state: Any) -> None:
        self.loader.load_state_dict(state)

    def next_batch(self) -> Any:
        return self.loader.next_batch()


@dataclass
class RunLoop:
    """Runs a :class:`Job` to ``cadence.steps`` (see the module docstring)."""

    job: Job
    cadence: Cadence
    run: RunDir
    world: int = 1
    _saved_at: float = field(default=0.0, init=False)

    def _log(self, record: dict[str, Any]) -> None:
        if self.job.is_main:
            self.run.log(record)

    def save(self) -> None:
        self.job.save()
        self._saved_at = _clock()

    def run_steps(self, until: int | None = None) -> bool:
        """Train to ``cadence.steps`` (or stop after step ``until``, saving as an
        interruption would); True when the run reached its end. Re-raises
        ``KeyboardInterrupt`` after saving when interrupted."""
        job, cad = self.job, self.cadence
        end = cad.steps if until is None else min(until, cad.steps)
        progress = Progress(cad.progress, job.is_main, cad.steps, job.step, cad.desc)
        stop = DeferredInterrupt()
        state = job.data_state()
        self._saved_at = _clock()
        try:
            with stop:
                while job.step < end:
                    stop.completed_step = False
                    state = job.data_state()
                    self._step(progress, stop)
        except KeyboardInterrupt:
            if not stop.completed_step:  # hard interrupt inside a step: draw it again
                job.restore_data_state(state)
            with no_interrupt("writing the checkpoint; it finishes in a moment"):
                self.save()
            progress.close()
            if job.is_main:
                print(
                    f"\ninterrupted at step {job.step}: saved {job.last_path}; "
                    "continue with --resume"
                )
            raise
        progress.close()
        if job.step < cad.steps:  # stopped at ``until``
            self.save()
            return False
        return True

    def _step(self, progress: Progress, stop: DeferredInterrupt) -> None:
        job, cad = self.job, self.cadence
        batch = job.next_batch()
        for opt in job.optimizers():
            opt.set_lr(job.step)
        result = job.update(batch, progress)
        values, counts, stop_any = result.values, result.counts, stop.requested
        if self.world > 1:
            values, summed, stop_any = distributed.step_figures(
                values, stop.requested, job.device, counts if result.sum_counts else None
            )
            if result.sum_counts:
                counts = summed
        job.step += 1
        job.observe(batch, values, counts)
        stop.completed_step = True
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
        elif cad.ckpt_minutes and _clock() - self._saved_at >= 60.0 * cad.ckpt_minutes:
            self.save()  # rank 0 alone decides: saving calls no collective
        if stop_any:
            raise KeyboardInterrupt
