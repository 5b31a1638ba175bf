"""Draw the next batch in a background thread while the current step computes.

:class:`Prefetcher` wraps a loader with the ``BatchLoader`` interface (``next_batch``,
``state_dict``, ``load_state_dict``, ``epoch``) and keeps at most one batch drawn ahead.
It is deterministic: the wrapped loader is only ever called from the one thread, in
order, so the batches are exactly the unwrapped loader's; and ``state_dict()`` is the
loader's state right after the last batch *returned* (taken in the thread when that batch
was drawn), not after the one drawn ahead, so a checkpoint resumes at the same batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Prefetcher"]


class _Draw(threading.Thread):
    """One draw in a daemon thread of its own. Not a ThreadPoolExecutor: a DataLoader's
    worker processes may be forked from this thread (a new epoch of shards), and a
    forked child inherits the executor's exit hook, which then tries to join the very
    thread it runs in and fails the worker with exit code 1."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True, name="vqkit-prefetch")
        self.fn, self.value, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the caller by result()
            self.error = e

    def done(self) -> bool:
        return not self.is_alive()

    def result(self) -> Any:
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class Prefetcher:
    """One batch ahead of ``loader``, drawn in a worker thread (see the module doc)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._ahead: _Draw | None = None
        self._state = loader.state_dict()
        self._lock = threading.Lock()

    def _draw(self) -> tuple[Any, dict[str, Any]]:
        batch = self.loader.next_batch()
        return batch, self.loader.state_dict()

    def _submit(self) -> None:
        self._ahead = _Draw(self._draw)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's next batch; starts drawing the one after it."""
        with self._lock:
            if self._ahead is None:
                self._submit()
            assert self._ahead is not None
            ahead, self._ahead = self._ahead, None
            try:
                batch, state = ahead.result()
            except BaseException:
                if ahead.done():  # the draw failed: rewind, so a retry draws it again
                    self.loader.load_state_dict(self._state)
                else:  # interrupted while waiting: _cancel() must wait for the draw
                    self._ahead = ahead
                raise
            self._state = state
            self._submit()
            return batch

    def _cancel(self) -> None:
        """Wait for the batch in flight and forget it; the loader is rewound to the state
        after the last batch returned."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            try:
                ahead.result()
            except Exception:  # the draw is discarded; its error comes again if redrawn
                pass
            self.loader.load_state_dict(self._state)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._cancel()
            self.loader.load_state_dict(state)
            self._state = self.loader.state_dict()

    @property
    def epoch(self) -> int:
        """Epoch of the next batch returned (not of the one drawn ahead)."""
        return int(self._state["epoch"])

    def __getattr__(self, name: str) -> Any:
        # describe(), batch_size, ...: the loader's own (never called while drawing ahead
        # changes them)
        return getattr(self.__dict__["loader"], name)

    def close(self) -> None:
        """Stop drawing ahead (the loader keeps the returned batches' position)."""
        with self._lock:
            self._cancel()
            close = getattr(self.loader, "close", None)
            if close is not None:
                close()
