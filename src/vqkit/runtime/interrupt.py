"""Ctrl-C at a step boundary: the first SIGINT asks the loop to stop after the current
step (so model, optimizer and data position agree in the checkpoint); a second one
interrupts at once; :func:`no_interrupt` shields the checkpoint write itself."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["DeferredInterrupt", "no_interrupt"]


class DeferredInterrupt:
    """Within the block, the first SIGINT only sets ``requested`` (the loop stops at
    the next step boundary); a second one interrupts at once. Only in the main
    thread, where Python delivers signals."""

    def __init__(self) -> None:
        self.requested = False
        self.completed_step = True
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


@contextlib.contextmanager
def no_interrupt(message: str) -> Iterator[None]:
    """Within the block, SIGINT only prints ``message`` (once): a Ctrl-C pressed while the
    interrupted run writes its checkpoint must not abort that write without a word. Only
    in the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    told = []

    def handler(signum: int, frame: Any) -> None:
        if not told:
            print(message, flush=True)
            told.append(True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
