"""The options every job has, declared once, and the one resume policy.

:class:`RunOptions` (the loop's cadence) and :class:`JobOptions` (steps, batch, learning
rate and its schedule, clipping, seed, device, the process group's timeout) are declared
here, once: each job's option group inherits them (``TrainOptions`` of ``vqkit train``,
``PriorTrainConfig`` of ``vqkit prior``), so a flag means the same in every command and
reaches its CLI, config files and checkpoints from this one declaration. Where jobs need
other defaults (the prior trains 3000 steps of 64 sequences with a cosine decay), the job
takes :func:`~vqkit.options.with_defaults` of these: the same option (type, check, help,
resume rule), another default.

The resume policy (:func:`resume_changes`) reads each option's ``on_resume`` metadata:
``"fixed"`` options shaped the checkpoint's state and a resumed run that changes them is
refused; the others are applied and reported. There is no list of names anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..options import (
    nonneg,
    nonneg_int,
    option,
    option_fields,
    positive,
    positive_int,
    unit_interval,
)
from ..storage.tensorboard import TensorBoardOptions
from .schedule import SCHEDULES

__all__ = ["JobOptions", "RunOptions", "check_resume_steps", "resume_changes"]


@dataclass
class RunOptions(TensorBoardOptions):
    """The run loop's cadence (``tensorboard`` is inherited from its declaration beside the
    sink, :mod:`vqkit.storage.tensorboard`)."""

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


@dataclass
class JobOptions(RunOptions):
    """The options of every training job (the tokenizer's defaults; other jobs change
    defaults with :func:`~vqkit.options.with_defaults`, never a declaration)."""

    steps: int = option(1500, "optimizer steps", check=nonneg_int)
    batch_size: int = option(
        32,
        "items (images, code maps) per step and per process (global batch: x number of processes)",
        check=positive_int,
        on_resume="fixed",  # the data position is counted in batches of this size
    )
    lr: float = option(3e-4, "peak learning rate (after the warmup)", check=positive)
    warmup_steps: int = option(
        0, "linear learning-rate warmup over the first N steps (0: none)", check=nonneg_int
    )
    lr_schedule: str = option(
        "constant",
        "after the warmup: constant, or cosine decay to --min-lr-ratio x --lr at --steps "
        "(a resume that changes --steps reshapes the rest of the decay)",
        choices=SCHEDULES,
    )
    min_lr_ratio: float = option(
        0.0, "cosine schedule: the final learning rate as a fraction of --lr", check=unit_interval
    )
    grad_clip: float = option(
        0.0, "clip the global gradient norm to this (0: off); logs grad_norm", check=nonneg
    )
    seed: int = option(
        0,
        "random seed (initialisation, data order, the job's random draws)",
        on_resume="fixed",  # the data order is restored with the stored seed
    )
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    dist_timeout: float = option(
        600.0,
        "seconds a process waits for the others at a collective before the run stops "
        "with an error (a stuck rank must not freeze the others for 30 minutes)",
        check=positive,
    )


def check_resume_steps(steps: int | None, step: int, where: str = "the run") -> None:
    """``steps`` below the checkpoint's ``step`` is refused: nothing would be trained, yet
    the smaller number would be recorded."""
    if steps is not None and steps < step:
        raise UserError(
            f"--steps {steps} is below the step {step} of {where}'s checkpoint: nothing "
            f"to train; give --steps above {step} to train on"
        )


def resume_changes(
    options: Any,
    stored: dict[str, Any],
    *,
    stored_world: int = 1,
    world: int = 1,
    fixed_groups: tuple[type, ...] = (),
    ignore: tuple[str, ...] = (),
) -> dict[str, tuple[Any, Any]]:
    """``{name: (old, new)}`` of the options that differ from the checkpoint's ``stored``
    ones. A changed option marked ``on_resume="fixed"``, or declared by one of
    ``fixed_groups`` (the options that shape the model), is a UserError naming them all.
    ``batch_size`` is compared per global batch (x processes), so a run resumes under
    another world size."""
    fixed_model = {f.name for g in fixed_groups for f in option_fields(g)}
    changes: dict[str, tuple[Any, Any]] = {}
    refused = []
    for f in option_fields(options):
        if f.name not in stored or f.name in ignore:
            continue
        old, new = stored[f.name], getattr(options, f.name)
        if f.name == "batch_size" and old * stored_world == new * world:
            continue
        if old == new:
            continue
        if f.name in fixed_model or f.metadata["on_resume"] == "fixed":
            refused.append(f"{f.name} ({old!r} -> {new!r})")
        else:
            changes[f.name] = (old, new)
    if refused:
        raise UserError(
            "a resumed run cannot change "
            + ", ".join(refused)
            + ": they shaped the checkpoint's state; start a new run (--overwrite or "
            "another --out) to change them"
        )
    return changes
