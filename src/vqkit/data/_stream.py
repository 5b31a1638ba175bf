"""The worker side of :mod:`vqkit.data.shards`: reading shards, the shuffle buffer,
decoding, chunking, and the epoch plan (which shards each rank and stream reads).

Everything here is a pure function of its arguments (seeds included) and picklable, so
DataLoader workers, started fresh each epoch, rebuild the same stream from a description.
"""

from __future__ import annotations

import hashlib
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ._core import channels_to_mode
from .decode import decode_image
from .transforms import IMAGE_KEYS, crop_resize, sample_rng, to_array

MANIFEST_NAME = "manifest.json"


def packing_marker(folder: str | os.PathLike[str], split: str) -> Path:
    """``folder/.{split}.packing``: present while ``vqkit pack`` switches a split's shards
    (a pack killed then leaves it, and readers refuse the split)."""
    return Path(folder) / f".{split}.packing"


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed from a hash of ``parts`` ((seed, 1) and (1, seed) differ)."""
    digest = hashlib.sha256(("vqkit-shards:" + ":".join(map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def short_error(e: BaseException) -> str:
    msg = str(e.args[0]) if e.args else ""
    return f"{type(e).__name__}: {msg.split(' @ <')[0]}" if msg else type(e).__name__


def count_samples(path: str | os.PathLike[str]) -> int:
    """Samples (runs of members sharing a key) in one shard, from its tar headers."""
    from webdataset.tariterators import base_plus_ext

    n, last = 0, None

    def visit(tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        nonlocal n, last
        key = base_plus_ext(m.name)[0] if m.isreg() else None
        if key is not None and key != last:
            n, last = n + 1, key

    scan_tar(
        path, visit, lambda e: UserError(f"{path}: corrupt or truncated shard ({short_error(e)})")
    )
    return n


def scan_tar(
    path: str | os.PathLike[str],
    visit: Callable[[tarfile.TarFile, tarfile.TarInfo], None],
    error: Callable[[BaseException], Exception],
) -> None:
    """``visit(tar, member)`` for every member of the tar archive ``path`` in one
    sequential pass; a corrupt or truncated archive raises ``error(cause)`` (a one-line
    UserError), also when it was cut exactly at a member boundary."""
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                visit(tf, m)
            # tarfile stops silently when the archive ends exactly at a member boundary;
            # a complete archive ends with a zero block, so fewer than 512 bytes read past
            # the last member means the file was cut short.
            fileobj, offset = getattr(tf, "fileobj", None), getattr(tf, "offset", None)
            if fileobj is not None and offset is not None and fileobj.tell() - offset < 512:
                raise tarfile.ReadError("archive ends without an end-of-archive block")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise error(e) from e


def iter_shard(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (``{"__key__", "__url__", ext: bytes, ...}``), read with
    webdataset's tar iterators; a corrupt or truncated shard is a ValueError naming it."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    url = str(path)
    try:
        with open(url, "rb") as f:
            yield from group_by_keys({**d, "__url__": url} for d in tar_file_iterator(f))
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        raise UserError(f"{url}: corrupt or truncated shard ({short_error(e)})") from e


def checked(path: str, count: int, skip: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of a shard from index ``skip`` on, checking it holds ``count``."""
    seen = 0
    for raw in iter_shard(path):
        seen += 1
        if seen > count:
            break
        if seen > skip:
            yield raw
    if seen != count:
        found = f"more than {count}" if seen > count else str(seen)
        raise UserError(
            f"{path}: corrupt or truncated shard: {found} samples where {count} were expected "
            f"(rewrite it, or update its {MANIFEST_NAME})"
        )


# ------------------------------------------------------------------- worker-side stream


@dataclass(frozen=True)
class Decode:
    """Raw sample -> (uint8 (C, H, W) array, label); picklable for the workers."""

    channels: int
    image_size: int | None
    crop: str
    crop_scale: float
    hw: tuple[int, int]
    seed: int
    epoch: int

    def __call__(self, raw: dict[str, Any]) -> tuple[np.ndarray, int]:
        url, key = raw["__url__"], raw["__key__"]
        ext = next((e for e in IMAGE_KEYS if e in raw), None)
        if ext is None:
            raise UserError(f"{url}: sample {key!r} has no image member ({', '.join(IMAGE_KEYS)})")
        try:
            img, _ = decode_image(raw[ext], channels_to_mode(self.channels))
        except Exception as e:
            raise UserError(f"{url}: cannot decode {key}.{ext} ({short_error(e)})") from e
        rng = None
        if self.crop == "random" and self.image_size:
            rng = sample_rng(self.seed, self.epoch, os.path.basename(url), key)
        a = to_array(crop_resize(img, self.image_size, self.crop, rng, self.crop_scale))
        if a.shape[1:] != self.hw:
            raise UserError(
                f"{url}: {key}.{ext} is {a.shape[2]}x{a.shape[1]}, not {self.hw[1]}x{self.hw[0]}"
                " like the rest; pass image_size to resize and crop"
            )
        return a, _label(raw, url, key)


def _label(raw: dict[str, Any], url: str, key: str) -> int:
    """The sample's ``.cls`` member as an int >= 0 (0 without one); ValueError naming the
    shard and member otherwise."""
    if "cls" not in raw:
        return 0
    text = raw["cls"]
    text = text if isinstance(text, bytes) else str(text).encode()
    try:
        label = int(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        label = -1
    if label < 0:
        raise UserError(
            f"{url}: {key}.cls is not a class label (ASCII digits): {text[:20]!r}; "
            "rewrite the shard (vqkit pack writes labels as digits)"
        )
    return label


class BufferOrder:
    """Output order of a shuffle buffer over inputs 0..n-1, by index only.

    The buffer fills to ``size`` items, then emits a uniformly chosen one for each new
    input, and drains at the end. Its choices depend only on counts, so replaying them on
    indices rebuilds the exact buffer of any earlier run at any point.
    """

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size, self.rng = n, max(1, size), random.Random(seed)
        self.buf: list[int] = []
        self.next_input = 0

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        while self.next_input < self.n and len(self.buf) < self.size:
            self.buf.append(self.next_input)
            self.next_input += 1
        if not self.buf:
            raise StopIteration
        if self.size > 1:
            k = self.rng.randrange(len(self.buf))
            self.buf[k], self.buf[-1] = self.buf[-1], self.buf[k]
        return self.buf.pop()


@dataclass(frozen=True)
class Stream:
    """One stream's shards, shuffle-buffer seed and outputs already consumed."""

    shards: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    start: int = 0


def read_from(s: Stream, first: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(input index, raw sample) from input ``first`` on; earlier shards are not opened."""
    base = 0
    for path, n in zip(s.shards, s.counts, strict=True):
        if base + n > first:
            skip = max(0, first - base)
            yield from enumerate(checked(path, n, skip), start=base + skip)
        base += n


def stream_samples(s: Stream, buffer: int, decode: Decode) -> Iterator[tuple[np.ndarray, int]]:
    order = BufferOrder(sum(s.counts), buffer, s.seed)
    for _ in range(s.start):  # replay the buffer's choices on indices: no I/O
        next(order)
    pending, frontier = set(order.buf), order.next_input
    reader = read_from(s, min(pending, default=frontier))
    store: dict[int, dict[str, Any]] = {}  # read but not yet emitted: the real buffer
    for idx in order:
        while idx not in store:
            i, raw = next(reader)
            if i >= frontier or i in pending:  # the rest was emitted before `start`
                store[i] = raw
        pending.discard(idx)
        yield decode(store.pop(idx))


def chunks(samples: Iterator[tuple[np.ndarray, int]], size: int) -> Iterator[tuple[Any, Any]]:
    imgs: list[np.ndarray] = []
    labels: list[int] = []
    for a, y in samples:
        imgs.append(a)
        labels.append(y)
        if len(imgs) == size:
            yield torch.from_numpy(np.stack(imgs)), torch.tensor(labels, dtype=torch.int64)
            imgs, labels = [], []
    if imgs:
        yield torch.from_numpy(np.stack(imgs)), torch.tensor(labels, dtype=torch.int64)


def round_robin(iters: list[Iterator[Any]]) -> Iterator[Any]:
    """Interleave like a DataLoader over workers: cyclic, skipping exhausted ones."""
    active = list(iters)
    while active:
        for it in list(active):
            try:
                yield next(it)
            except StopIteration:
                active.remove(it)


class EpochStream(torch.utils.data.IterableDataset):
    """One rank's epoch: DataLoader worker i runs ``streams[i]`` (in-process: all, in turn)."""

    def __init__(self, streams: list[Stream], job: Callable[[Stream], Iterator[Any]]) -> None:
        self.streams, self.job = streams, job

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return round_robin([self.job(s) for s in self.streams])
        return self.job(self.streams[info.id])


@dataclass(frozen=True)
class ChunkJob:
    buffer: int
    chunk: int
    decode: Decode

    def __call__(self, s: Stream) -> Iterator[Any]:
        return chunks(stream_samples(s, self.buffer, self.decode), self.chunk)


@dataclass(frozen=True)
class HistogramJob:
    decode: Decode

    def __call__(self, s: Stream) -> Iterator[np.ndarray]:
        for path, take in zip(s.shards, s.counts, strict=True):
            hist = np.zeros(256, dtype=np.int64)
            for i, raw in enumerate(iter_shard(path)):
                if i >= take:
                    break
                hist += np.bincount(self.decode(raw)[0].reshape(-1), minlength=256)
            yield hist


# ------------------------------------------------------------------------- epoch plan


def assign_shards(
    num_shards: int,
    seed: int,
    epoch: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    streams: int = 1,
    shuffle: bool = True,
) -> list[list[int]]:
    """Shard indices each of this rank's ``streams`` reads in ``epoch`` (see module doc)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(mix_seed(seed, epoch)).shuffle(order)
    per_rank = -(-num_shards // world_size)
    padded = (order * (-(-per_rank * world_size // num_shards)))[: per_rank * world_size]
    mine = padded[rank::world_size]
    return [mine[k::streams] for k in range(streams)]


def resume_point(totals: Sequence[int], chunk: int, position: int) -> tuple[list[int], int, int]:
    """Where ``position`` samples into the round-robin of chunked streams falls:
    (samples each stream has emitted in whole chunks before it, the stream whose chunk
    comes next, how many samples of that chunk were already consumed)."""
    done, k, pos = [0] * len(totals), 0, 0
    if position >= sum(totals):
        raise UserError(f"position {position} is past the epoch's {sum(totals)} samples")
    while True:
        while done[k] >= totals[k]:
            k = (k + 1) % len(totals)
        size = min(chunk, totals[k] - done[k])
        if pos + size > position:
            return done, k, position - pos
        pos, done[k], k = pos + size, done[k] + size, (k + 1) % len(totals)


def variance_from_histogram(counts: np.ndarray) -> float:
    """Population variance of ``v / 255 - 0.5`` from a 256-bin histogram of uint8 values
    (float64, the same arithmetic as :func:`vqkit.data.data_variance`)."""
    c = np.asarray(counts, dtype=np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0 - 0.5
    mean = (c * values).sum() / c.sum()
    return float((c * (values - mean) ** 2).sum() / c.sum())
