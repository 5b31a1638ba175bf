"""Process plumbing of a training run: the device, the rank, deferred Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch

from .. import distributed

__all__ = ["DeferredInterrupt", "launch_rank", "rank_device", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; a named CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def launch_rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK (0 when alone)."""
    return distributed.rank() if distributed.is_distributed() else int(os.environ.get("RANK", 0))


def rank_device(name: str) -> torch.device:
    """:func:`resolve_device`, and under torchrun one GPU per process (by LOCAL_RANK)."""
    dev = resolve_device(name)
    if distributed.env_world_size() > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", distributed.local_rank())
    return dev


class DeferredInterrupt:
    """Inside the block the first Ctrl-C only sets ``requested`` (the loop stops at the
    next step boundary, with model, optimizer and loader in step); a second one
    interrupts at once. Signals reach only the main thread."""

    def __init__(self) -> None:
        self.requested = False
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
