"""Sharded dataset sources: which tar shards make up a split, and how many samples each holds.

See :mod:`vqkit.data.shards` for the layout and the streaming loader.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..storage.fileio import loads_json
from ._core import ImageData
from ._stream import (
    MANIFEST_NAME,
    Decode,
    checked,
    count_samples,
    iter_shard,
    packing_marker,
)
from .transforms import IMAGE_KEYS

MANIFEST_FORMAT = "vqkit-shards"
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
_NUMBERED = re.compile(r"(.+)-\d+\.tar")
_GRAY = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


@dataclass(frozen=True)
class ShardSet:
    """One split of a sharded dataset: shard paths with their sample counts.

    ``channels``: the dataset's channels (1 or 3); ``size``: (H, W) when all images share
    it, else None (then readers need ``image_size``); ``classes``: names of labels 0..,
    when known from the manifest.
    """

    shards: tuple[str, ...]
    counts: tuple[int, ...]
    split: str = "train"
    source: str = ""
    classes: tuple[str, ...] = ()
    channels: int = 3
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.shards or len(self.shards) != len(self.counts):
            raise UserError(f"{self.source}: need one count per shard, and at least one shard")
        if any(int(c) < 0 for c in self.counts):
            raise UserError(f"{self.source}: negative shard count")

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_images(self) -> int:
        return int(sum(self.counts))

    def select(self, index: slice | Sequence[int]) -> ShardSet:
        """The shards at ``index`` (e.g. ``select(slice(-1, None))`` to hold one out)."""
        pick = range(self.num_shards)[index] if isinstance(index, slice) else list(index)
        return replace(
            self,
            shards=tuple(self.shards[i] for i in pick),
            counts=tuple(self.counts[i] for i in pick),
        )

    def load(
        self, *, image_size: int | None = None, channels: int | None = None, sort_keys: bool = False
    ) -> ImageData:
        """Decode the whole split into memory: uint8 images (N, C, H, W), labels (N,).

        In shard order, or by sample key with ``sort_keys`` (pack's keys number the
        source's own order). Memory grows with the split: meant for evaluation splits and
        small sets; train with :class:`ShardLoader`.
        """
        c = channels or self.channels
        hw = (image_size, image_size) if image_size else self.size
        if hw is None:
            raise UserError(f"{self.source}: images differ in size; pass image_size")
        decode = Decode(c, image_size, "center", 1.0, hw, 0, 0)
        images = np.empty((self.num_images, c, *hw), dtype=np.uint8)
        labels, keys = np.empty(self.num_images, dtype=np.int64), []
        i = 0
        for path, n in zip(self.shards, self.counts, strict=True):
            for raw in checked(path, n):
                images[i], labels[i] = decode(raw)
                keys.append(raw["__key__"])
                i += 1
        if sort_keys:
            order = np.argsort(np.asarray(keys), kind="stable")
            images, labels = images[order], labels[order]
        return ImageData(
            torch.from_numpy(images),
            torch.from_numpy(labels),
            self.classes,
            self.source,
            self.split,
        )

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary, with the keys of ``ImageData.describe()`` and more."""
        return {
            "source": self.source,
            "split": self.split,
            "format": "shards",
            "num_images": self.num_images,
            "num_shards": self.num_shards,
            "shape": [self.channels, *self.size] if self.size else [self.channels, None, None],
            "classes": list(self.classes),
            "skipped": 0,
        }


def is_shard_source(source: str | os.PathLike[str] | None) -> bool:
    """True for a brace pattern or a directory of shards (``manifest.json`` of pack, or
    ``NAME-NNNNNN.tar`` files)."""
    if source is None:
        return False
    s = str(source)
    if _BRACES.search(s) and not Path(s).exists():
        return True
    p = Path(s)
    if not p.is_dir():
        return False
    if (p / MANIFEST_NAME).is_file() and _read_manifest(p) is not None:
        return True
    return any(_NUMBERED.fullmatch(f.name) for f in p.glob("*.tar"))


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        m = loads_json(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from e
    return m if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT else None


def _list_split(source: str, split: str) -> list[Path]:
    if _BRACES.search(source) and not Path(source).exists():
        from webdataset.shardlists import expand_urls

        paths = [Path(u) for u in expand_urls(source)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: {len(missing)} shard(s) not found: {missing[0]}")
        prefixes = {m.group(1) for p in paths if (m := _NUMBERED.fullmatch(p.name))}
        last = prefixes.pop().rsplit("-", 1)[-1] if len(prefixes) == 1 else ""
        own = last if last in SPLIT_NAMES else "train"
        if split != own:
            raise UserError(f"{source}: this pattern names the {own!r} shards, not {split!r}")
        return paths
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"shard source not found: {source}")
    tars = sorted(folder.glob("*.tar"))
    named = {p: m.group(1) for p in tars if (m := _NUMBERED.fullmatch(p.name))}
    mine = [p for p in tars if named.get(p) == split]
    if mine:
        return mine
    found = sorted(set(named.values()) & set(SPLIT_NAMES))
    if tars and not found and split == "train":
        return tars  # no split prefixes: every shard is train
    raise UserError(
        f"{folder}: no {split!r} shards ({split}-NNNNNN.tar); "
        + (f"splits found: {', '.join(found)}" if found else "no shards found")
    )


def open_shards(source: str | os.PathLike[str], split: str = "train") -> ShardSet:
    """Resolve ``source`` (brace pattern or shard directory) to the shards of ``split``.

    Counts, channels, size and classes come from the ``manifest.json`` beside the shards;
    shards it does not list are counted by scanning their tar headers, and channels/size
    are then read from the first image. FileNotFoundError/ValueError name what is wrong.
    """
    paths = _list_split(str(source), split)
    folders = {p.parent for p in paths}
    for folder in folders:
        if packing_marker(folder, split).exists():
            raise UserError(
                f"{folder}: its {split} shards are half replaced (a vqkit pack was stopped "
                "while switching them in); pack them again with --overwrite"
            )
    manifest = _read_manifest(folders.pop()) if len(folders) == 1 else None
    entry = (manifest or {}).get("splits", {}).get(split, {})
    listed = {s["name"]: int(s["count"]) for s in entry.get("shards", [])}
    missing = sorted(set(listed) - {p.name for p in paths})
    if missing and not _BRACES.search(str(source)):
        raise FileNotFoundError(
            f"{source}: {len(missing)} {split} shard(s) of {MANIFEST_NAME} missing: {missing[0]}"
        )
    counts = tuple(listed[p.name] if p.name in listed else count_samples(p) for p in paths)
    channels, size = entry.get("channels"), entry.get("size")
    if channels is None or (size is None and not entry):
        channels, size = _peek(paths, counts)
    return ShardSet(
        tuple(str(p) for p in paths),
        counts,
        split,
        str(source),
        tuple(entry.get("classes", ())),
        int(channels),
        tuple(size) if size else None,  # type: ignore[arg-type]
    )


def _peek(paths: Sequence[Path], counts: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of the first image of the first non-empty shard."""
    from PIL import Image

    for path, n in zip(paths, counts, strict=True):
        for raw in iter_shard(path) if n else ():
            ext = next((e for e in IMAGE_KEYS if e in raw), None)
            if ext is None:
                raise UserError(f"{path}: sample {raw['__key__']!r} has no image member")
            with Image.open(io.BytesIO(raw[ext])) as im:
                return (1 if im.mode in _GRAY else 3), (im.height, im.width)
    raise UserError(f"{paths[0]}: the shards hold no samples")
