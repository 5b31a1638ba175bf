"""TensorBoard as an optional mirror of a run's ``metrics.jsonl`` (``--tensorboard``).

:class:`TensorBoardSink` writes TensorBoard event files into ``RUN/tensorboard/``:

* :meth:`~TensorBoardSink.log` turns one metrics record into scalars, tag
  ``"{kind}/{name}"`` (``train/loss``, ``eval/nmse``, ...) at the record's ``step``:
  every finite int or float of the record (``step`` itself, strings, bools, lists and
  nested objects are not curves and are skipped);
* :meth:`~TensorBoardSink.images` writes a batch of images (B, C, H, W) in vqkit's
  range [-0.5, 0.5] as one image grid (TensorBoard tiles it, 8 per row);
* a resumed run passes ``purge_step = checkpoint step + 1``: TensorBoard's reader then
  drops the events the interrupted run wrote after its checkpoint, so the event stream
  continues without duplicated steps, as :meth:`vqkit.storage.rundir.RunDir.truncate_metrics`
  does for ``metrics.jsonl``.

The ``tensorboard`` package is an optional extra (``pip install vqkit[tensorboard]``):
asking for ``--tensorboard`` without it fails when the options are checked, before any
data is read, with a one-line message. Only the process that writes the run directory
(rank 0) attaches a sink.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..options import Options, option

__all__ = ["TENSORBOARD_DIR", "TensorBoardOptions", "TensorBoardSink", "scalars_of"]

TENSORBOARD_DIR = "tensorboard"
"""Sub-directory of a run that holds its event files."""

INSTALL_HINT = "pip install 'vqkit[tensorboard]'"


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package can be imported (without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


def _check_available(on: bool) -> str | None:
    if on and not tensorboard_available():
        return f"off: the tensorboard package is not installed ({INSTALL_HINT})"
    return None


@dataclass
class TensorBoardOptions(Options):
    """The logging option shared by ``vqkit train`` and ``vqkit prior`` (declared once,
    inherited by both jobs' option groups)."""

    tensorboard: bool = option(
        False,
        f"also write the metrics and the evaluation pictures as TensorBoard events into "
        f"RUN/{TENSORBOARD_DIR}/ (needs {INSTALL_HINT})",
        check=_check_available,
    )


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The curves of one metrics record: ``{"{kind}/{name}": value}`` for every finite
    int/float field other than ``step`` (``kind`` defaults to ``"metrics"``)."""
    kind = str(record.get("kind", "metrics"))
    out = {}
    for name, value in record.items():
        if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{name}"] = float(value)
    return out


def _after_existing_files(logdir: Path) -> None:
    """Wait, if needed, until a new event file sorts after the existing ones.

    TensorBoard reads a directory's event files in name order; a name starts with the
    writer's creation time in whole seconds, then host, pid and a counter that does not
    sort numerically. A file made in the same second as an existing one could be read
    before it, and a resumed run's events before the stale ones they replace."""
    stamps = []
    for p in logdir.glob("events.out.tfevents.*"):
        field = p.name.split(".")[3]
        if field.isdigit():
            stamps.append(int(field))
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class TensorBoardSink:
    """Event-file writer of one run (see the module docstring).

    Args:
        logdir: the directory of the event files (``RUN/tensorboard``).
        purge_step: on resume, the checkpoint's step + 1: events of this step and later,
            written by the interrupted run, are discarded by TensorBoard's reader.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, purge_step: int | None = None) -> None:
        if not tensorboard_available():
            raise UserError(
                f"--tensorboard needs the tensorboard package, which is not installed "
                f"({INSTALL_HINT})"
            )
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        _after_existing_files(self.logdir)
        # flush_secs: a crashed run still leaves its curves; log() flushes at each record
        self._writer = SummaryWriter(str(self.logdir), purge_step=purge_step, flush_secs=10)

    def log(self, record: Mapping[str, Any]) -> None:
        """Write a metrics record's scalars at its ``step`` (records without one are skipped)."""
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            return
        for tag, value in scalars_of(record).items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def images(self, step: int, tag: str, images: torch.Tensor) -> None:
        """One grid of ``images`` (B, C, H, W), C = 1 or 3, values in [-0.5, 0.5]
        (clamped), at ``step``."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"expected images (B, 1 or 3, H, W); got {tuple(images.shape)}")
        x = (images.detach().float().cpu() + 0.5).clamp(0.0, 1.0)
        self._writer.add_images(tag, x, step, dataformats="NCHW")
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (idempotent)."""
        self._writer.close()
