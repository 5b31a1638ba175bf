"""Shuffled, resumable, shardable batches from an in-memory ImageData.

Each epoch's order is ``torch.randperm(N)`` from a generator seeded by a hash of
(seed, epoch), so any epoch can be regenerated on its own: resuming needs only
(epoch, position), not a saved RNG state.

Sharding works like ``torch.utils.data.DistributedSampler``: the epoch's permutation is
made a multiple of ``world_size`` long, and rank r takes elements r, r + world_size, ...
With ``shard_tail="pad"`` (the default, as DistributedSampler's drop_last=False) the
permutation is extended by repeating its start, so every sample is seen each epoch and at
most world_size - 1 samples are seen twice; with ``"drop"`` the last N mod world_size
samples of that epoch's order are left out, so the shards are strictly disjoint. Either
way every rank gets the same number of samples, hence the same number of batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from ..errors import UserError
from ._core import ImageData, normalize

__all__ = ["BatchLoader", "epoch_permutation", "iterate_batches"]

_STATE_VERSION = 1


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash, not seed + epoch: (seed=1, epoch=0) and (seed=0, epoch=1) must differ.
    digest = hashlib.sha256(f"vqkit-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(
    num_samples: int, seed: int, epoch: int, shuffle: bool = True
) -> torch.Tensor:
    """The order (int64, shape (num_samples,)) in which an epoch visits the samples."""
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator()
    g.manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=g)


class LoaderPosition:
    """Where a resumable loader stands (the base of :class:`BatchLoader` and
    :class:`~vqkit.data.shards.ShardLoader`): the epoch of the next batch and the
    samples of it this rank consumed, and the check of a saved state against it."""

    _epoch: int
    _position: int

    @property
    def epoch(self) -> int:
        """Epoch the next batch belongs to (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Samples of this epoch consumed by this rank (the same count on every rank)."""
        return self._position

    def _check_state(self, state: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
        """UserError when a saved ``state`` holds another value of one of ``keys``."""
        for key in keys:
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"loader state does not match{what}: {key}={state[key]!r} in the state, "
                    f"{getattr(self, key)!r} here"
                )


class BatchLoader(LoaderPosition):
    """Endless iterator of ``(images, labels)`` batches over epochs.

    ``images``: float32 (B, C, H, W) in [-0.5, 0.5]; ``labels``: int64 (B,). Both are on
    ``device`` (default: where the data lives). Moving the uint8 batch before converting
    keeps host-to-device copies 4x smaller.

    Args:
        data: the split to iterate (ImageData, or a uint8 (N, C, H, W) tensor), or a
            sample count N for an index-only loader (:meth:`next_indices`; the audio
            crops of :class:`~vqkit.data.audio.CropLoader`).
        batch_size: samples per batch (per rank).
        shuffle: new seeded order each epoch; False visits samples in order.
        seed: base seed; epoch e uses a generator seeded by hash(seed, e).
        drop_last: drop a final partial batch of each epoch (default True, so every
            training step sees batch_size samples).
        rank, world_size: this process's shard (see the module docstring).
        shard_tail: "pad" or "drop" to make the epoch divisible by world_size.
        device: where batches are returned.

    ``epoch`` and ``position`` (samples of this rank's shard already consumed in the
    current epoch) say where the next batch comes from; ``state_dict()`` /
    ``load_state_dict()`` save and restore them so that a resumed loader yields exactly
    the batches an uninterrupted one would.
    """

    def __init__(
        self,
        data: ImageData | torch.Tensor | int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shard_tail: Literal["pad", "drop"] = "pad",
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(data, int) and not isinstance(data, bool):
            # an index-only loader (next_indices): a set held elsewhere, e.g. audio clips
            self.images = torch.empty(data, 0, dtype=torch.uint8)
            self.labels = torch.zeros(data, dtype=torch.int64)
        elif isinstance(data, ImageData):
            self.images, self.labels = data.images, data.labels
        else:
            self.images = data
            self.labels = torch.zeros(data.shape[0], dtype=torch.int64, device=data.device)
        if self.images.dtype != torch.uint8:
            raise TypeError(f"BatchLoader expects uint8 images, got {self.images.dtype}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if shard_tail not in ("pad", "drop"):
            raise UserError(f"shard_tail must be 'pad' or 'drop', not {shard_tail!r}")
        self.num_samples = int(self.images.shape[0])
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.shard_tail = shard_tail
        self.device = torch.device(device) if device is not None else self.images.device
        if shard_tail == "drop":
            self.shard_size = self.num_samples // world_size
        else:
            self.shard_size = -(-self.num_samples // world_size)
        if self.batches_per_epoch == 0:
            raise UserError(
                f"no batches per epoch: {self.num_samples} samples, world_size {world_size}, "
                f"batch_size {batch_size}, drop_last={drop_last}"
            )
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (the same on every rank)."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """Sample indices (int64, shape (shard_size,)) this rank visits in ``epoch``, in order."""
        perm = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
        total = self.shard_size * self.world_size
        if total > self.num_samples:  # pad by repeating the start of this epoch's order
            reps = -(-total // self.num_samples)
            perm = perm.repeat(reps)[:total]
        else:
            perm = perm[:total]
        return perm[self.rank : total : self.world_size]

    def _current_order(self) -> torch.Tensor:
        if self._order_epoch != self._epoch:
            self._order = self.shard_indices(self._epoch).to(self.images.device)
            self._order_epoch = self._epoch
        return self._order

    def _epoch_done(self) -> bool:
        remaining = self.shard_size - self._position
        return remaining < (self.batch_size if self.drop_last else 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(images, labels)`` batch; rolls over into the next epoch as needed."""
        idx = self.next_indices()
        x = self.images[idx].to(self.device, non_blocking=True)
        y = self.labels[idx].to(self.device, non_blocking=True)
        return normalize(x), y

    def next_indices(self) -> torch.Tensor:
        """The sample indices (int64, (batch_size,) or fewer at a kept partial end) of the
        next batch, advancing the position as :meth:`next_batch` does."""
        if self._epoch_done():  # e.g. a state loaded at the very end of an epoch
            self._epoch, self._position = self._epoch + 1, 0
        order = self._current_order()
        start = self._position
        idx = order[start : start + self.batch_size]
        self._position = start + self.batch_size
        if self._epoch_done():
            # Advance now, so that state_dict() taken after an epoch's last batch already
            # points at the next epoch.
            self._epoch, self._position = self._epoch + 1, 0
        return idx

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain-int state: {epoch, position, seed, batch_size, num_samples, ...}."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "rank": self.rank,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "shard_tail": self.shard_tail,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``. The seed is taken from the state; the dataset size,
        batch size and order options must match (the rank may differ, since every rank is
        at the same epoch and position; the per-rank batch size may differ when the world
        size does).

        A state saved under another world size is mapped to the same point of the epoch's
        global order: ranks take interleaved elements of one permutation, so after
        ``position`` samples per rank on ``W`` ranks exactly the first ``position * W``
        elements of the epoch's (padded) order are consumed. Here the position becomes
        ``floor(position * W / world_size)``, so going to fewer ranks continues exactly
        where the old run stopped, and going to more ranks re-reads at most
        ``world_size - 1`` samples. Past the end of this epoch's (padded) order, the next
        batch starts the next epoch."""
        saved_world = int(state.get("world_size", self.world_size))
        keys = ("num_samples", "batch_size", "shuffle", "drop_last", "shard_tail")
        if saved_world != self.world_size:  # the per-rank batch may change with the ranks
            keys = tuple(k for k in keys if k != "batch_size")
        self._check_state(state, keys, "")
        epoch, position = int(state["epoch"]), int(state["position"])
        if saved_world < 1 or position < 0:
            raise UserError(f"invalid loader state: world_size={saved_world}, position={position}")
        if saved_world != self.world_size:
            position = min(position * saved_world // self.world_size, self.shard_size)
        if epoch < 0 or not 0 <= position <= self.shard_size:
            raise UserError(f"invalid loader state: epoch={epoch}, position={position}")
        self.seed = int(state.get("seed", self.seed))
        self._epoch, self._position = epoch, position
        self._order_epoch = -1

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        self._epoch, self._position = int(epoch), 0


def iterate_batches(
    data: ImageData | torch.Tensor,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass in order (for evaluation): ``(images, labels)`` with images float32
    (B, C, H, W) in [-0.5, 0.5]; the last batch may be smaller."""
    images = data.images if isinstance(data, ImageData) else data
    labels = (
        data.labels
        if isinstance(data, ImageData)
        else torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
    )
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        if device is not None:
            x, y = x.to(device), y.to(device)
        yield normalize(x), y
