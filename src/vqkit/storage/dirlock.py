"""One writer per folder: an exclusive ``flock`` on ``FOLDER/.lock`` (the one lock of
vqkit's output folders: a run directory, ``vqkit pack``'s shards folder).

The kernel drops the lock when the holding process dies (kill -9 included), so a lock
file left behind by a dead writer is simply taken over; a live holder makes a second
writer fail at once with a message naming its pid and host, which the holder writes into
the lock file (the text is for that message only: the lock is the flock). The file stays
after release: unlinking it would let a process that has it open lock a file no longer
in the folder while a third makes a new one. A full disk while the pid is written is a
one-line :class:`~vqkit.storage.fileio.DiskFullError` naming the lock file, and the lock
is not kept.

The lock is advisory and per host-kernel; on NFS it relies on the server's lock support.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path

from .fileio import disk_full_error, is_disk_full

__all__ = ["LOCK", "DirBusyError", "DirLock"]

LOCK = ".lock"


class DirBusyError(FileExistsError):
    """Another live process (or another lock object of this one) holds the folder."""


def _words(fd: int) -> str:
    """'pid N on HOST' from the lock file's text, else 'another process'."""
    words = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    return f"pid {words[0]} on {words[1]}" if len(words) >= 2 else "another process"


class DirLock:
    """The exclusive lock of ``folder`` (``folder/.lock``). ``busy(who)`` makes the
    message of the :class:`DirBusyError` (or ``error``, a subclass) raised when ``who``
    ("pid N on HOST") holds it."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        busy: Callable[[str], str],
        error: type[DirBusyError] = DirBusyError,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._busy = busy
        self._error = error
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> DirLock:
        """Take the lock (creating the folder); a no-op if this object holds it. Raises
        the busy error at once (no waiting) when another holder has it; DiskFullError
        naming the lock file when the disk is too full to create or write it."""
        if self._fd is not None:
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full_error(e.errno or errno.ENOSPC, self.path) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _words(fd)
            os.close(fd)
            raise self._error(self._busy(who)) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # who holds it, for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except BaseException as e:
            os.close(fd)  # releases the flock: no half-taken lock stays behind
            if is_disk_full(e):
                raise disk_full_error(
                    getattr(e, "errno", None) or errno.ENOSPC, self.path
                ) from None
            raise
        self._fd = fd
        return self

    def holder(self) -> str | None:
        """Who holds the lock, as "pid N on HOST" ("another process" when unsaid), or None
        when nobody does (this object's own lock included: None). Takes no lock of its
        own beyond a shared probe of an instant, and creates no file."""
        if self._fd is not None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file: never locked
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _words(fd)
        finally:
            os.close(fd)  # closing releases the probe
        return None

    def check_free(self) -> None:
        """Raise the busy error now when another holder has the lock (a probe, as
        :meth:`holder`): a command refuses before its long work, not after it."""
        who = self.holder()
        if who is not None:
            raise self._error(self._busy(who))

    def release(self) -> None:
        """Release the lock (a no-op when not held); the file stays (module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:  # the pid text is only for the busy message; the flock goes below
            pass
        finally:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
