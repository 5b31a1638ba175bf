"""A run directory (``vqkit train --out DIR``): one writer at a time, clean starts, exact resumes.

* :meth:`RunDir.lock` takes an exclusive ``flock`` on ``DIR/.lock``
  (:class:`vqkit.storage.dirlock.DirLock`, the one lock of vqkit's output folders). The
  kernel drops it when the holding process dies (kill -9 included), so a lock file left
  behind by a dead run is simply taken over; a live holder makes a second run fail at
  once with a message naming its pid and host (written into the lock file); a full disk
  there is one line naming the lock file.
* :meth:`RunDir.prepare` starts clean (``overwrite``: removes only the files vqkit
  writes, never unknown ones) or keeps everything (``resume``); both remove temp files
  orphaned by a killed writer.
* :meth:`RunDir.truncate_metrics` drops the metric records a resumed run will write
  again: those logged after the checkpoint it resumes from, and a line cut short.
* :meth:`RunDir.log` / :meth:`RunDir.write_json` write strict JSON (no NaN/Infinity).
* :meth:`RunDir.attach` adds a sink (e.g. :class:`vqkit.storage.tensorboard.TensorBoardSink`,
  made by :meth:`RunDir.open_tensorboard`) that mirrors every :meth:`RunDir.log` record and
  receives the evaluation pictures of :meth:`RunDir.images`; :meth:`RunDir.unlock` closes it.

The lock is advisory and per host-kernel; on NFS it relies on the server's lock support.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from ..errors import UserError
from .dirlock import DirBusyError, DirLock
from .fileio import (
    atomic_write,
    clean_stale_temps,
    disk_full_error,
    dump_json,
    is_disk_full,
    loads_json,
    write_json,
)
from .tensorboard import TENSORBOARD_DIR, TensorBoardSink

__all__ = ["ARTIFACTS", "RunDir", "RunDirBusyError", "Sink"]

ARTIFACTS = (
    "metrics.jsonl",
    "config.json",
    "eval.json",
    "model.safetensors",
    "recon.png",
    "curves.png",
    "usage.png",
)
"""Files a run writes into its directory; ``prepare(overwrite=True)`` removes these only."""

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


class RunDirBusyError(DirBusyError):
    """Another live process holds the run directory's lock."""


class Sink(Protocol):
    """Where a run's records are mirrored besides ``metrics.jsonl``."""

    def log(self, record: Mapping[str, Any]) -> None: ...

    def images(self, step: int, tag: str, images: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class RunDir:
    """One run's output directory (see the module docstring).

    ``RunDir(path)`` touches nothing; ``with RunDir(path) as run:`` locks it for the
    block. ``artifacts``: the file names :meth:`prepare` may remove on overwrite.
    """

    def __init__(self, path: str | os.PathLike[str], artifacts: Iterable[str] = ARTIFACTS):
        self.path = Path(path)
        self.artifacts = tuple(artifacts)
        self._lock = DirLock(self.path, self._busy, RunDirBusyError)
        self._sinks: list[Sink] = []
        self._resumed_at: int | None = None  # the step truncate_metrics kept records up to

    def _busy(self, who: str) -> str:
        return (
            f"run directory {self.path} is in use by {who}; wait for that run to end or "
            "stop it, or choose another output directory"
        )

    @property
    def checkpoints(self) -> Path:
        """``path/checkpoints``."""
        return self.path / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        """``path/metrics.jsonl``."""
        return self.path / METRICS

    @property
    def tensorboard_dir(self) -> Path:
        """``path/tensorboard``: the TensorBoard event files (``--tensorboard``)."""
        return self.path / TENSORBOARD_DIR

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock.locked

    # -- lock -------------------------------------------------------------------
    def lock(self) -> RunDir:
        """Take the directory's exclusive lock (creating the directory); a no-op if held.

        Raises :class:`RunDirBusyError` (a FileExistsError) when another process, or
        another RunDir object of this process, holds it; a one-line DiskFullError naming
        the lock file when the disk is too full to write it.
        """
        self._lock.acquire()
        return self

    def holder(self) -> str | None:
        """Who holds the lock, as "pid N on HOST" ("another process" when unsaid), or None
        when nobody does (this object's own lock included: None). Takes no lock of its
        own beyond a shared probe of an instant, and creates no file."""
        return self._lock.holder()

    def unlock(self) -> None:
        """Release the lock. The file stays: unlinking it would let a process that has
        it open lock a file no longer in the directory while a third makes a new one."""
        self.close_sinks()
        self._lock.release()

    def __enter__(self) -> RunDir:
        return self.lock()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unlock()

    # -- start / resume ------------------------------------------------------------
    def existing_artifacts(self) -> list[Path]:
        """The run files present (known artifacts and checkpoint files)."""
        found = [self.path / n for n in self.artifacts if (self.path / n).is_file()]
        if self.checkpoints.is_dir():
            found += sorted(self.checkpoints.glob("*.pt"))
        if self.tensorboard_dir.is_dir():
            found += sorted(self.tensorboard_dir.glob("events.out.tfevents.*"))
        return found

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> list[Path]:
        """Lock the directory (if not yet) and make it ready for a run; returns the paths
        removed.

        ``resume``: keep everything. ``overwrite``: remove the known artifacts,
        ``checkpoints/*.pt`` and ``tensorboard/events.out.tfevents.*`` (other files stay;
        ``checkpoints/`` and ``tensorboard/`` go only if then empty).
        Neither: the directory must hold no run files (FileExistsError naming them).
        All three remove orphaned temp files (:func:`vqkit.storage.fileio.clean_stale_temps`).
        """
        if resume and overwrite:
            raise UserError("resume and overwrite exclude each other; pass one of them")
        self.lock()
        removed = clean_stale_temps(self.path) + clean_stale_temps(self.checkpoints)
        present = self.existing_artifacts()
        if overwrite:
            for p in present:
                p.unlink(missing_ok=True)
                removed.append(p)
            for d in (self.checkpoints, self.tensorboard_dir):
                try:
                    d.rmdir()
                except OSError:  # absent, or holds files that are not ours
                    pass
        elif not resume and present:
            names = ", ".join(str(p.relative_to(self.path)) for p in present[:5])
            raise FileExistsError(
                f"{self.path} already holds a run ({names}); resume it (--resume) or start "
                "again (--overwrite)"
            )
        return removed

    def truncate_metrics(self, step: int) -> int:
        """Drop records of ``metrics.jsonl`` with ``"step" > step``, unreadable lines and a
        trailing line without its newline (a kill mid-write). Call on resume with the
        checkpoint's step: the resumed run logs those steps again. Returns the number of
        lines dropped; the file is rewritten atomically, and only if something changes.
        """
        self._resumed_at = step
        path = self.metrics_path
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return 0
        lines = text.split("\n")
        tail = lines.pop()  # "" when the file ends with a newline, else a partial line
        keep, dropped = [], int(bool(tail))
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = loads_json(line)
            except ValueError:
                dropped += 1
                continue
            s = rec.get("step") if isinstance(rec, Mapping) else None
            if isinstance(s, (int, float)) and s > step:
                dropped += 1
                continue
            keep.append(line)
        if dropped:
            body = "".join(line + "\n" for line in keep)
            atomic_write(path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
        return dropped

    # -- writing -------------------------------------------------------------------
    def log(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` as one strict-JSON line (non-finite floats
        become null) and flush it. One write call per line, so lines do not interleave."""
        line = dump_json(dict(record)) + "\n"
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(e.errno, self.metrics_path) from e
            raise
        for sink in self._sinks:
            sink.log(record)

    # -- sinks ---------------------------------------------------------------------
    def attach(self, sink: Sink) -> Sink:
        """Mirror every later :meth:`log` record (and :meth:`images`) to ``sink``; closed
        by :meth:`close_sinks` (and :meth:`unlock`). Returns ``sink``."""
        self._sinks.append(sink)
        return sink

    def open_tensorboard(self, purge_step: int | None = None) -> TensorBoardSink:
        """Attach a :class:`~vqkit.storage.tensorboard.TensorBoardSink` on
        :attr:`tensorboard_dir`. ``purge_step`` defaults, after :meth:`truncate_metrics`
        (a resume), to the kept step + 1, so the resumed event stream holds each step
        once; on a fresh run to None. Call it on the writing rank only."""
        if purge_step is None and self._resumed_at is not None:
            purge_step = self._resumed_at + 1
        sink = TensorBoardSink(self.tensorboard_dir, purge_step=purge_step)
        self.attach(sink)
        return sink

    def images(self, step: int, tag: str, images: torch.Tensor) -> None:
        """Hand a grid of images (B, C, H, W) in [-0.5, 0.5] to the attached sinks (no
        file of its own: the PNGs are written by the jobs)."""
        for sink in self._sinks:
            sink.images(step, tag, images)

    def close_sinks(self) -> None:
        """Close and detach every sink."""
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as strict, indented JSON to ``path/name`` atomically; returns the path."""
        target = self.path / name
        write_json(target, obj)
        return target
