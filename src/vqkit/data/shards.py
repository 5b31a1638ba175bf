"""Streaming sharded datasets: WebDataset-layout tar shards, decoded in DataLoader workers.

Layout: each shard is a plain tar of samples ``KEY.png`` (or .jpg, .webp, ...) plus an
optional ``KEY.cls`` (the label as ASCII digits), members of one sample adjacent, as
:func:`vqkit.data.pack.pack` writes them (with a ``manifest.json`` of per-shard counts,
channels, size and class names beside the shards).

Sources (:func:`open_shards`): a brace pattern ``shards/train-{000000..000009}.tar`` (one
split; its name is the file prefix's last ``-`` part if that is a split name such as
train/test/val, else "train"), or a directory holding ``{split}-NNNNNN.tar`` files
(a directory whose ``.tar`` files have no split prefix is one "train" split). Without a
manifest, sample counts come from one scan of the tar headers.

Order of an epoch (all from (seed, epoch); nothing random is saved):

1. the shard order is a seeded permutation, padded by repeating its start to a multiple of
   ``world_size`` (as DistributedSampler pads samples); rank r takes every world_size-th
   shard from r, and its stream s (of ``streams``, one per DataLoader worker) every
   streams-th of those: no two (rank, stream) pairs read the same shard slot;
2. each stream reads its shards in order through a seeded shuffle buffer of
   ``shuffle_buffer`` samples, and emits chunks of ``chunk_size`` images;
3. the rank's batches cut the round-robin interleaving of its streams' chunks (the order
   a DataLoader returns them) into ``batch_size`` batches; every rank stops the epoch at
   the same count, the smallest rank's share, rounded down to whole batches, so all ranks
   run the same number of steps.

Resume is exact, at sample granularity: the state is (epoch, samples consumed this epoch),
the same on every rank. The buffer's choices depend only on how many samples entered it,
so a stream replays them on sample indices (no reading or decoding) to rebuild the buffer;
it then re-reads raw bytes from the shard of the oldest sample still buffered (typically
the current shard or a few before it; earlier shards are not opened), keeping only the
buffered samples, and decodes nothing it does not emit.
The batches after a resume are identical to an uninterrupted run's (with the same
world_size, streams, chunk_size and shuffle_buffer; resuming under different ones
continues at the same fraction of the epoch, in the new layout's order, with a warning).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import UserError
from ._core import normalize
from ._shardset import MANIFEST_FORMAT, ShardSet, is_shard_source, open_shards
from ._stream import (
    MANIFEST_NAME,
    ChunkJob,
    Decode,
    EpochStream,
    HistogramJob,
    Stream,
    assign_shards,
    count_samples,
    iter_shard,
    mix_seed,
    resume_point,
    variance_from_histogram,
)
from .loader import LoaderPosition
from .transforms import CROPS

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "ShardLoader",
    "ShardSet",
    "assign_shards",
    "count_samples",
    "is_shard_source",
    "iter_shard",
    "open_shards",
]

_STATE_VERSION = 1


class ShardLoader(LoaderPosition):
    """Endless, resumable batches streamed from shards; the interface of ``BatchLoader``.

    ``next_batch()`` returns ``(images, labels)``: float32 (B, C, H, W) in [-0.5, 0.5] and
    int64 (B,), on ``device``. ``epoch`` / ``position`` say where the next batch comes from;
    ``state_dict()`` / ``load_state_dict()`` resume exactly (see the module docstring).

    Args:
        data: a :class:`ShardSet`, or a source for :func:`open_shards` (with ``split``).
        batch_size: samples per batch (per rank).
        shuffle: seeded shard order and shuffle buffer; False reads shards and samples in
            order (streams still interleave).
        seed: base seed of every random choice (shard order, buffers, random crops).
        rank, world_size: this process's share of the shards.
        num_workers: DataLoader worker processes that read and decode (0: this process).
        streams: parallel shard streams per rank, which fix the order; default
            max(1, num_workers), and must equal num_workers when that is > 0 (so a run
            can be continued with num_workers=0 and the same streams).
        shuffle_buffer: samples each stream mixes across its shards (memory: this many
            encoded images per stream).
        chunk_size: images per worker chunk (the unit of interleaving).
        image_size, crop, crop_scale: resize/crop in the workers (see transforms.py);
            without image_size all images must share the dataset's size.
        channels: 1 or 3 (default: the dataset's).
        device: where batches are returned (default CPU).
    """

    def __init__(
        self,
        data: ShardSet | str | os.PathLike[str],
        batch_size: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        streams: int | None = None,
        shuffle_buffer: int = 1000,
        chunk_size: int = 16,
        image_size: int | None = None,
        crop: str = "center",
        crop_scale: float = 1.0,
        channels: int | None = None,
        device: torch.device | str | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        self.data = data if isinstance(data, ShardSet) else open_shards(data, split)
        streams = streams if streams is not None else max(1, num_workers)
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
        if batch_size < 1 or chunk_size < 1 or streams < 1 or num_workers < 0:
            raise UserError("batch_size, chunk_size and streams must be >= 1, num_workers >= 0")
        if num_workers and num_workers != streams:
            raise UserError(f"streams ({streams}) must equal num_workers ({num_workers})")
        if crop not in CROPS or not 0.0 < crop_scale <= 1.0:
            raise UserError(f"crop must be one of {CROPS}, crop_scale in (0, 1]")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, int(seed)
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.streams = num_workers, streams
        self.shuffle_buffer, self.chunk_size = shuffle_buffer if shuffle else 1, chunk_size
        self.resize, self.crop, self.crop_scale = image_size, crop, crop_scale
        self.channels = int(channels or self.data.channels)
        hw = (image_size, image_size) if image_size else self.data.size
        if hw is None:
            raise UserError(f"{self.data.source}: images differ in size; pass image_size")
        self.hw: tuple[int, int] = (int(hw[0]), int(hw[1]))
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.prefetch_factor = prefetch_factor
        self.num_samples, self.num_shards = self.data.num_images, self.data.num_shards
        self._epoch = self._position = 0
        self._plan: tuple[int, list[list[int]], int] | None = None
        self._it: Iterator[Any] | None = None
        self._chunk: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.batches_per_epoch == 0:
            raise UserError(
                f"{self.data.source}: no batches in epoch 0: rank shares of "
                f"{self.epoch_samples} samples < batch_size {batch_size}"
            )

    # -- where we are ---------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Side of the (square) batches; ValueError if they are not square."""
        if self.hw[0] != self.hw[1]:
            raise UserError(f"images are not square ({self.hw}); use .hw")
        return self.hw[0]

    def _layout(self, epoch: int) -> tuple[list[list[int]], int]:
        """(this rank's shard indices per stream, samples per rank this epoch)."""
        if self._plan is None or self._plan[0] != epoch:
            c = self.data.counts
            ranks = [
                assign_shards(
                    len(c),
                    self.seed,
                    epoch,
                    rank=r,
                    world_size=self.world_size,
                    streams=1,
                    shuffle=self.shuffle,
                )[0]
                for r in range(self.world_size)
            ]
            length = min(sum(c[i] for i in r) for r in ranks)
            mine = ranks[self.rank]
            self._plan = (epoch, [mine[k :: self.streams] for k in range(self.streams)], length)
        return self._plan[1], self._plan[2]

    @property
    def epoch_samples(self) -> int:
        """Samples each rank takes in the current epoch (the smallest rank's share)."""
        return self._layout(self._epoch)[1]

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank gets in the current epoch (it varies a little with the shard
        order when shard sizes differ)."""
        return self.epoch_samples // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- the stream -------------------------------------------------------------------
    def _decode(self, epoch: int, crop: str | None = None) -> Decode:
        return Decode(
            self.channels,
            self.resize,
            crop or self.crop,
            self.crop_scale,
            self.hw,
            self.seed,
            epoch,
        )

    def _loader(self, streams: list[Stream], job: Callable[[Stream], Iterator[Any]]) -> Any:
        ds = EpochStream(streams, job)
        if not self.num_workers:
            return iter(ds)
        return iter(
            torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=len(streams),
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.device.type == "cuda",
            )
        )

    def _start(self) -> None:
        """Open this epoch's stream at ``position`` (streams rotated so the next chunk's
        stream is worker 0, the way the uninterrupted DataLoader would have continued)."""
        per_stream, _ = self._layout(self._epoch)
        c = self.data.counts
        totals = [sum(c[i] for i in shards) for shards in per_stream]
        done, first, drop = resume_point(totals, self.chunk_size, self._position)
        streams = [
            Stream(
                tuple(self.data.shards[i] for i in per_stream[k]),
                tuple(c[i] for i in per_stream[k]),
                mix_seed(self.seed, self._epoch, self.rank, k),
                done[k],
            )
            for k in range(self.streams)
        ]
        streams = streams[first:] + streams[:first]
        job = ChunkJob(self.shuffle_buffer, self.chunk_size, self._decode(self._epoch))
        self._it = self._loader(streams, job)
        x, y = self._next_chunk()
        self._chunk = (x[drop:], y[drop:])

    def _next_chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._it)  # type: ignore[arg-type]
        except BaseException:
            self.close()  # a failed epoch's workers would otherwise linger until GC
            raise

    def close(self) -> None:
        """Stop the current epoch's workers (the next batch restarts them)."""
        it, self._it, self._chunk = self._it, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(images, labels)`` batch; rolls over into the next epoch as needed."""
        while self._position + self.batch_size > self.batches_per_epoch * self.batch_size:
            self.set_epoch(self._epoch + 1)  # (an epoch can be too short for a batch)
        if self._it is None:
            self._start()
        xs, ys, n = [], [], 0
        while n < self.batch_size:
            if self._chunk is None or len(self._chunk[1]) == 0:
                self._chunk = self._next_chunk()
            x, y = self._chunk
            take = min(self.batch_size - n, len(y))
            xs.append(x[:take])
            ys.append(y[:take])
            self._chunk, n = (x[take:], y[take:]), n + take
        self._position += self.batch_size
        if self._position + self.batch_size > self.batches_per_epoch * self.batch_size:
            # advance now, so a state taken after an epoch's last batch points at the next
            self.set_epoch(self._epoch + 1)
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        y = torch.cat(ys) if len(ys) > 1 else ys[0]
        x = x.to(self.device, non_blocking=True)
        return normalize(x), y.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch``."""
        self.close()
        self._epoch, self._position = int(epoch), 0

    # -- state --------------------------------------------------------------------------
    _LAYOUT_KEYS = ("world_size", "streams", "chunk_size", "shuffle_buffer", "shuffle")

    def state_dict(self) -> dict[str, Any]:
        """Plain values: {kind, epoch, position, seed, the order-defining options, ...}."""
        return {
            "version": _STATE_VERSION,
            "kind": "shards",
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "num_shards": self.num_shards,
            "rank": self.rank,
            **{k: getattr(self, k) for k in self._LAYOUT_KEYS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()`` (of any rank: they are equal but for ``rank``).

        The dataset must be the same (shard and sample counts). The batch size may
        differ (positions count samples). A different world_size, streams, chunk_size or
        shuffle_buffer continues at the same fraction of the saved epoch in this layout's
        order (some samples of that epoch are then seen twice, others not), with a warning.
        """
        if state.get("kind") != "shards":
            raise UserError("loader state is not a ShardLoader state (in-memory data?)")
        self._check_state(state, ("num_samples", "num_shards"), " the data")
        self.close()
        self.seed = int(state["seed"])
        self._plan = None
        epoch, position = int(state["epoch"]), int(state["position"])
        changed = [k for k in self._LAYOUT_KEYS if k in state and state[k] != getattr(self, k)]
        self._epoch = epoch
        if changed:
            warnings.warn(
                f"resuming with a different {', '.join(changed)}: epoch {epoch} continues at "
                "the same fraction in this layout's order, not exactly as before",
                stacklevel=2,
            )
            saved = int(state.get("world_size", self.world_size))
            position = position * saved // self.world_size
        if epoch < 0 or position < 0:
            raise UserError(f"invalid loader state: epoch={epoch}, position={position}")
        self._position = position

    # -- summaries -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """``ImageData.describe()``-style summary plus shards, streams and epoch size."""
        return {
            **self.data.describe(),
            "shape": [self.channels, *self.hw],
            "world_size": self.world_size,
            "streams": self.streams,
            "epoch_images_per_rank": self.epoch_samples,
        }

    def estimate_variance(self, num_samples: int = 10000) -> float:
        """``data_variance`` (population variance of ``x / 255 - 0.5``) of a sample.

        The sample is the first ``num_samples / min(num_shards, 32)`` images of shards in a
        seeded order (more shards if they are small), centre-cropped: it depends only on
        the data, seed and transforms, so every rank, worker count and resume gets the same
        value; ``num_samples >= num_images`` gives the exact value. Decoded in the workers.
        """
        if num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {num_samples}")
        c = self.data.counts
        order = list(range(len(c)))
        random.Random(mix_seed(self.seed, "variance")).shuffle(order)
        per = -(-num_samples // min(len(c), 32)) if num_samples < sum(c) else max(c)
        left, jobs = num_samples, []
        for i in order:
            if left <= 0:
                break
            take = min(c[i], per, left)
            if take:
                jobs.append((self.data.shards[i], take))
                left -= take
        k = max(1, min(self.num_workers, len(jobs)))
        streams = [
            Stream(tuple(p for p, _ in jobs[j::k]), tuple(t for _, t in jobs[j::k]), 0)
            for j in range(k)
        ]
        job = HistogramJob(self._decode(0, crop="center"))
        return variance_from_histogram(sum(self._loader(streams, job)))
