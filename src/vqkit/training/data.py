"""The data of a training run: the train split (in memory, or streamed from shards), the
evaluation split (always in memory), the data variance, and the loaders built on them.

In memory (every format but shards): the train split is decoded once, batches come from
:class:`~vqkit.data.BatchLoader`; ``holdout`` is the last 5% of train; the variance is
exact.

Streamed (``data`` is a shard source, see :func:`vqkit.data.is_shard_source`): the train
split is read by :class:`~vqkit.data.ShardLoader` (ranks and ``num_workers`` worker
streams read disjoint shards; ``image_size``, ``crop`` and ``crop_scale`` apply in the
workers), so it never has to fit in memory; the evaluation split is decoded into memory
(centre crop); ``holdout`` is the last train shard; the variance is estimated from
:data:`VARIANCE_SAMPLES` images of the stream (the same value on every rank and resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import (
    BatchLoader,
    ImageData,
    ShardLoader,
    ShardSet,
    available_splits,
    data_variance,
    is_shard_source,
    load_dataset,
    open_shards,
)
from ..data._shardset import SPLIT_NAMES
from ..errors import UserError

__all__ = ["VARIANCE_SAMPLES", "RunData", "is_streamed", "load_run_data"]

VARIANCE_SAMPLES = 10000  # images of the stream behind a streamed run's data variance


def is_streamed(config: Any) -> bool:
    """Whether the run streams its train split from shards."""
    if config.data is None:
        return False
    if config.data_format == "shards":
        return True
    return config.data_format == "auto" and is_shard_source(config.data)


@dataclass
class RunData:
    """What the trainer needs of the data (see the module doc)."""

    eval_data: ImageData
    channels: int
    image_size: int
    data_variance: float
    train: ImageData | None = None  # in memory
    shards: ShardSet | None = None  # streamed
    describe_train: dict[str, Any] = field(default_factory=dict)
    eval_split: str = "test"  # resolved: "holdout" when held out of train

    def loader(
        self,
        config: Any,
        *,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> BatchLoader | ShardLoader:
        """A fresh loader over the train split: shuffled by ``seed``, this rank's share."""
        if self.train is not None:
            return BatchLoader(
                self.train,
                config.batch_size,
                seed=seed,
                device=device,
                rank=rank,
                world_size=world_size,
            )
        assert self.shards is not None
        return ShardLoader(
            self.shards,
            config.batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=config.num_workers,
            image_size=config.image_size,
            crop=config.crop,
            crop_scale=config.crop_scale,
            channels=self.channels,
            device=device,
        )


def _eval_split(config: Any, known: list[str]) -> str:
    """The evaluation split to use: ``eval_split``, or holdout when the default "test"
    does not exist (an explicit choice must exist)."""
    split = config.eval_split
    if split == "holdout" or split in known:
        return split
    if split != "test":
        raise UserError(
            f"eval_split {split!r} is not a split of {config.data or 'builtin'}; "
            f"choose one of {[*known, 'holdout']}"
        )
    return "holdout"


def _in_memory(config: Any) -> RunData:
    train = load_dataset(
        config.data,
        "train",
        image_size=config.image_size,
        channels=config.channels,
        cache_dir=config.cache_dir,
        format=config.data_format,
    )
    split = config.eval_split
    if split != "holdout":
        split = _eval_split(config, available_splits(config.data, format=config.data_format))
    if split == "holdout":  # the last 5% of train, held out of training
        n_eval = max(1, len(train) // 20)
        eval_data = train.subset(slice(len(train) - n_eval, None))
        train = train.subset(slice(0, len(train) - n_eval))
    else:
        eval_data = load_dataset(
            config.data,
            split,
            image_size=config.image_size,
            channels=train.channels,
            cache_dir=config.cache_dir,
            format=config.data_format,
        )
    return RunData(
        eval_data=eval_data,
        channels=train.channels,
        image_size=int(train.images.shape[-1]),
        data_variance=data_variance(train),
        train=train,
        describe_train=train.describe(),
        eval_split=split,
    )


def shard_splits(source: str) -> list[str]:
    """The split names a shard source holds (only the usual names are looked for)."""
    found = []
    for split in SPLIT_NAMES:
        try:
            open_shards(source, split)
        except (ValueError, FileNotFoundError):
            continue
        found.append(split)
    return found


def _streamed(config: Any, rank: int, world_size: int) -> RunData:
    if config.crop == "random" and config.image_size is None:
        raise UserError("crop='random' needs image_size (the size of the crops)")
    shards = open_shards(config.data, "train")
    split = _eval_split(config, shard_splits(config.data))
    if split == "holdout":  # the last shard, held out of training
        if shards.num_shards < 2:
            raise UserError(
                f"{config.data}: eval_split 'holdout' holds out the last train shard, but "
                "there is only one; pack more shards or a test split"
            )
        held = shards.select(slice(-1, None))
        shards = shards.select(slice(0, -1))
    else:
        held = open_shards(config.data, split)
    channels = int(config.channels or shards.channels)
    run = RunData(
        eval_data=held.load(image_size=config.image_size, channels=channels),
        channels=channels,
        image_size=0,
        data_variance=0.0,
        shards=shards,
        eval_split=split,
    )
    cpu = torch.device("cpu")
    probe = run.loader(config, seed=config.seed, device=cpu, rank=rank, world_size=world_size)
    try:
        run.image_size = probe.image_size
        run.data_variance = probe.estimate_variance(VARIANCE_SAMPLES)
        run.describe_train = {**probe.describe(), "variance_samples": VARIANCE_SAMPLES}
    finally:
        probe.close()
    return run


def load_run_data(config: Any, rank: int = 0, world_size: int = 1) -> RunData:
    """The run's data (see the module doc); the checks come before any decoding."""
    if (config.crop != "center" or config.crop_scale != 1.0) and not is_streamed(config):
        raise UserError(
            "crop='random' and crop_scale apply to shard data (streamed); pack the dataset "
            "with 'vqkit pack', or keep crop='center'"
        )
    if is_streamed(config):
        return _streamed(config, rank, world_size)
    return _in_memory(config)
