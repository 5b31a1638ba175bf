"""Process plumbing of a training run: the device, the rank, deferred Ctrl-C."""

from __future__ import annotations

import os

import torch

from .. import distributed
from ..distributed import resolve_device
from ..training.interrupt import DeferredInterrupt

__all__ = ["DeferredInterrupt", "launch_rank", "rank_device", "resolve_device"]


def launch_rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK (0 when alone)."""
    return distributed.rank() if distributed.is_distributed() else int(os.environ.get("RANK", 0))


def rank_device(name: str) -> torch.device:
    """:func:`resolve_device`, and under torchrun one GPU per process (by LOCAL_RANK)."""
    dev = resolve_device(name)
    if distributed.env_world_size() > 1 and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", distributed.local_rank())
    return dev
