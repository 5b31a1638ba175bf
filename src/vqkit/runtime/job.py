"""The runtime below every training job: what surrounds the run loop, written once.

A job (the tokenizer, its adversarial form, the prior of either kind, a toy in the tests)
subclasses :class:`Job` and supplies only what differs: its state (``state_dict`` /
``load_state_dict``), its step (``update``, ``optimizers``, ``next_batch``), its
evaluation (``evaluate``, ``after_eval`` for pictures, ``finish``) and what it records
(``run_info``, ``record``). :class:`Job` owns, for every job:

* the process group (torchrun's environment, ``--dist-timeout``) and the device, one GPU
  per process;
* the run directory (:class:`~vqkit.storage.rundir.RunDir`): locked by rank 0, refused
  when it holds a run unless ``--resume`` or ``--overwrite``;
* resume: ``checkpoints/last.pt`` loaded and checked (its kind), the job's state, step,
  log window, best figure and every rank's RNG (CPU and CUDA) restored, metrics after the
  checkpoint dropped, option changes reported (refused by the options' ``on_resume``
  rule: :func:`vqkit.runtime.options.resume_changes`) and logged as a ``"resume"`` record;
* the log window (:class:`~vqkit.runtime.window.Window`), checkpointed, so every record
  after ``--resume`` equals the uninterrupted run's, train windows included;
* ``best.pt``: the lowest ``best_key`` of the periodic evaluations from ``best_from`` on;
* ``config.json``, the TensorBoard sink, the closing barrier and the teardown.

Checkpoint layout (``last.pt`` and ``best.pt``): the job's ``state_dict()`` and
``{"kind", "step", "train_config", "world_size", "best", "window", "rng"}``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import distributed
from ..storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..storage.rundir import ARTIFACTS, RunDir
from .loop import Cadence, Progress, RunLoop, ScheduledOptimizer, StepResult
from .options import JobOptions, resume_changes
from .window import Window

__all__ = ["Job", "LoaderJob"]


class Job:
    """Base of every training job (module docstring). A subclass calls
    ``super().__init__(options, out_dir, resume=..., overwrite=...)``, builds its state
    inside ``with self.setting_up():`` (which restores a resumed checkpoint at its end and
    releases everything on an error), then ``fit()`` runs it."""

    kind: ClassVar[str] = "vqkit-job"  # the checkpoint's kind; another kind is refused
    desc: ClassVar[str] = "train"  # the progress bar's label
    loss_key: ClassVar[str] = "loss"  # the step figure that must stay finite
    best_key: ClassVar[str] = "loss"  # the eval figure best.pt minimises
    rate_key: ClassVar[str] = "items_per_s"  # the train records' throughput
    artifacts: ClassVar[tuple[str, ...]] = ARTIFACTS  # what --overwrite removes
    artifact_globs: ClassVar[tuple[str, ...]] = ()  # ... and these patterns

    def __init__(
        self,
        options: JobOptions,
        out_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.options = options
        self.out = Path(out_dir)
        self.last_path = self.out / "checkpoints" / "last.pt"
        self.best_path = self.out / "checkpoints" / "best.pt"
        self.resume = resume
        self.device = distributed.rank_device(options.device)  # one GPU per process
        if distributed.env_world_size() > 1 and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._owns_group = distributed.init_from_env(self.device, options.dist_timeout)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.run = RunDir(self.out, artifacts=self.artifacts)
        self.step = 0
        self.best, self.best_step = math.inf, -1
        self.window = Window(rate_key=self.rate_key)
        self.checkpoint: dict[str, Any] | None = None
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        self.resume_notes: list[str] = []
        self.last_eval: dict[str, Any] | None = None
        self._improved = False  # the last evaluation chose best.pt: the next save writes it
        try:
            if self.is_main:  # one writer: lock, then check or clean the directory
                self.run.prepare(resume=resume, overwrite=overwrite)
                if overwrite:
                    for pattern in self.artifact_globs:
                        for path in self.out.glob(pattern):
                            path.unlink()
            if resume:
                self.checkpoint = self._load_last()
        except BaseException:
            self.close()
            raise

    def _load_last(self) -> dict[str, Any]:
        if not self.last_path.exists():
            raise CheckpointError(f"nothing to resume: {self.last_path} does not exist")
        ckpt = load_checkpoint(self.last_path, map_location=self.device)
        if ckpt.get("kind", self.kind) != self.kind:
            raise CheckpointError(
                f"{self.last_path} is a {ckpt.get('kind')} checkpoint, not a {self.kind} one"
            )
        return ckpt

    @contextlib.contextmanager
    def setting_up(self) -> Iterator[None]:
        """The block where a job builds its state: at its end a resumed run's checkpoint
        is restored; an error releases the directory and the process group."""
        try:
            yield
            if self.checkpoint is not None:
                self._restore(self.checkpoint)
                self.checkpoint = None
        except BaseException:
            self.close()
            raise

    def rank0_first(self) -> contextlib.AbstractContextManager[None]:
        """Rank 0 runs the block before the others (it fills a cache they then read)."""
        return _rank0_first(self.world, self.is_main)

    # -- what a job supplies ---------------------------------------------------------------
    def optimizers(self) -> list[ScheduledOptimizer]:
        raise NotImplementedError

    def next_batch(self) -> Any:
        raise NotImplementedError

    def update(self, batch: Any, progress: Progress) -> StepResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The job's own state: weights, optimizers, data position, ..."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore :meth:`state_dict`; returns notes on what starts fresh."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        """The periodic evaluation's figures (rank 0; no collective inside)."""
        raise NotImplementedError

    def items(self, batch: Any) -> int:
        """Items of the global batch counted by the train records' rate."""
        return 0

    def record(self) -> dict[str, Any]:
        """What a job adds to a ``"train"`` record besides the window's means."""
        return {}

    def observe(self, batch: Any, values: dict[str, float], counts: Any) -> None:
        """After the step: add its global figures to the window (override to do more)."""
        self.window.add(values, counts, self.items(batch))

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        return {self.loss_key: f"{values[self.loss_key]:.4f}"}

    def report_eval(self, record: dict[str, Any]) -> None:
        """After a periodic evaluation, on rank 0: pictures, curves."""

    @property
    def best_from(self) -> int:
        """The first step whose evaluations may choose best.pt."""
        return 0

    def run_info(self) -> dict[str, Any]:
        """``config.json``: the resolved options and what the run is made of."""
        return {"train": asdict(self.options), "device": str(self.device)}

    def announce(self) -> None:
        """Lines rank 0 prints before the first step (warnings about the options)."""

    def finish(self) -> dict[str, Any]:
        """The final evaluation and exports (rank 0); its figures."""
        return {"step": self.step, **(self.last_eval or {})}

    # -- what the runtime does for every job ----------------------------------------------
    def train_record(self) -> dict[str, Any]:
        return {**self.record(), **self.window.summary()}

    def periodic_eval(self) -> dict[str, Any]:
        record = self.evaluate()
        self.last_eval = {"step": self.step, **record}
        return record

    def after_eval(self, record: dict[str, Any]) -> None:
        """Rank 0: best.pt's choice (written by the :meth:`save` that follows), then the
        job's :meth:`report_eval`."""
        if self.step >= self.best_from > self.best_step:  # the final objective began since
            self.best = math.inf  # earlier weights drop out of the choice
        self._improved = record[self.best_key] < self.best
        if self._improved:
            self.best, self.best_step = float(record[self.best_key]), self.step
        self.report_eval(record)

    def _payload(self, rng: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        return {
            **self.state_dict(),
            "kind": self.kind,
            "step": self.step,
            "train_config": asdict(self.options),
            "world_size": self.world,
            "best": {"key": self.best_key, "value": self.best, "step": self.best_step},
            "window": self.window.state_dict(),
            "rng": rng,
        }

    def save(self, *, collective: bool = True) -> None:
        """Write ``last.pt`` (and ``best.pt`` after an evaluation that improved it) on rank
        0, with every rank's RNG state (``collective``: gathered, every rank calls this;
        otherwise this rank's own stands for all)."""
        rng = _rng_state(self.device)
        states = distributed.gather_objects(rng) if collective else [rng]
        if not self.is_main:
            return
        payload = self._payload(states)
        save_checkpoint(self.last_path, payload)
        if self._improved:
            save_checkpoint(self.best_path, payload)
            self._improved = False

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.resume_changes = self.changes_on_resume(ckpt)  # first: what the user asked
        self.resume_notes = list(self.load_state_dict(ckpt))
        self.step = int(ckpt["step"])
        # checkpoints of before the runtime: best_nmse / best_bits, one rank's RNG
        best = ckpt.get("best") or {
            "value": ckpt.get("best_nmse", ckpt.get("best_bits", math.inf)),
            "step": ckpt.get("best_step", -1),
        }
        self.best, self.best_step = float(best["value"]), int(best["step"])
        self.window.load_state_dict(ckpt.get("window"))
        states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        _set_rng_state(states[self.rank % len(states)], self.device)

    def changes_on_resume(self, ckpt: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{name: (old, new)}`` of the options this resume changes (refusing what it
        cannot change); a job refines it with its model's option groups."""
        return resume_changes(
            self.options,
            ckpt.get("train_config", {}),
            stored_world=int(ckpt.get("world_size", 1)),
            world=self.world,
            ignore=("out_dir", "preset"),
        )

    def _begin(self) -> None:
        """Rank 0, before the first step: resume report, TensorBoard, config.json."""
        if self.resume:
            self.run.truncate_metrics(self.step)  # steps after the checkpoint run again
            for name, (old, new) in self.resume_changes.items():
                print(f"resume: {name} {old!r} -> {new!r} (applied)")
            for note in self.resume_notes:
                print(f"resume: {note}")
            if self.resume_changes:
                changes = {k: {"from": a, "to": b} for k, (a, b) in self.resume_changes.items()}
                self.run.log({"kind": "resume", "step": self.step, "changes": changes})
        if self.options.tensorboard:  # after truncate_metrics: purges the same steps
            self.run.open_tensorboard()
        info = {
            **self.run_info(),
            "world_size": self.world,
            "global_batch_size": self.options.batch_size * self.world,
            "torch": torch.__version__,
        }
        self.run.write_json("config.json", info)
        self.announce()

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``steps`` (or stop after step ``until``, saving ``last.pt`` as an
        interruption would); returns the final evaluation on rank 0, ``{"step": ...}``
        otherwise. Releases the directory and a process group it created."""
        try:
            if self.is_main:
                self._begin()
            loop = RunLoop(self, Cadence.of(self.options, self.desc), self.run, self.world)
            if not loop.run_steps(until):
                return {"step": self.step}  # stopped at ``until`` (saved)
            result = self.finish() if self.is_main else {"step": self.step}
            distributed.barrier()  # leave together: no rank tears down while rank 0 writes
            return result
        finally:
            self.close()

    def close(self) -> None:
        """Release the run directory (and a process group this job created)."""
        self.release()
        self.run.unlock()
        if self._owns_group:
            distributed.teardown()
            self._owns_group = False

    def release(self) -> None:
        """Stop what the job started (data workers); called by :meth:`close`."""

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LoaderJob(Job):
    """A :class:`Job` with one resumable loader (``self.loader``: ``next_batch``,
    ``state_dict``, ``load_state_dict``, ``epoch``) and one scheduled optimizer
    (``self.scheduled``)."""

    loader: Any
    scheduled: ScheduledOptimizer

    def optimizers(self) -> list[ScheduledOptimizer]:
        return [self.scheduled]

    def next_batch(self) -> Any:
        return self.loader.next_batch()

    def record(self) -> dict[str, Any]:
        return {"epoch": self.loader.epoch}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@contextlib.contextmanager
def _rank0_first(world: int, is_main: bool) -> Iterator[None]:
    if world > 1 and not is_main:
        distributed.barrier()  # wait for rank 0
    yield
    if world > 1 and is_main:
        distributed.barrier()  # release the others
