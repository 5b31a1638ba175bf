"""The data a tokenizer was trained on, as a record its model files carry.

A model file forgets nothing it needs: ``vqkit eval MODEL`` and ``vqkit prior
--tokenizer DIR`` without ``--data`` use the data the model was trained on, read from
this record, and refuse (one line) when there is none or it cannot be read, rather
than fall back on the built-in set.

The record is a JSON dict (:data:`KEYS`)::

    {"source": "builtin" or a path (made absolute when it existed) or a name,
     "format": "auto" | "builtin" | "cifar10" | "idx" | "imagefolder" | "shards",
     "image_size": the model's input side, "channels": 1 or 3,
     "eval_split": the run's evaluation split ("test", "holdout", ...)}

``vqkit train`` writes it into ``RUN/model.safetensors`` (the metadata's ``info``),
``vqkit export`` into the pretrained directory's ``config.json`` (``info``) and weights;
a ``.pt`` checkpoint's record is made from its stored training options
(:func:`reference_from_train_config`). ``holdout`` is the last 5% of the train split (a
shard source: its last train shard), as ``vqkit train`` holds it out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ._core import ImageData
from ._shardset import is_shard_source, open_shards
from .sources import load_dataset

__all__ = [
    "KEYS",
    "check_reference",
    "data_reference",
    "describe_use",
    "load_reference",
    "reference_from_train_config",
]

KEYS = ("source", "format", "image_size", "channels", "eval_split")


def data_reference(
    source: str | os.PathLike[str] | None,
    *,
    format: str = "auto",
    image_size: int,
    channels: int,
    eval_split: str = "test",
) -> dict[str, Any]:
    """The record of :data:`KEYS`; a ``source`` path that exists is made absolute (the
    record is read from other working directories)."""
    text = "builtin" if source is None else str(source)
    if text != "builtin" and Path(text).exists():
        text = str(Path(text).resolve())
    return {
        "source": text,
        "format": str(format),
        "image_size": int(image_size),
        "channels": int(channels),
        "eval_split": str(eval_split),
    }


def reference_from_train_config(
    train: Mapping[str, Any], *, image_size: int, channels: int
) -> dict[str, Any] | None:
    """The record of a run from its training options (a checkpoint's ``train_config``,
    a run's ``config.json`` ``"train"``) and the model's input shape; None for no options."""
    if not train:
        return None
    return data_reference(
        train.get("data"),
        format=train.get("data_format") or "auto",
        image_size=image_size,
        channels=channels,
        eval_split=train.get("eval_split") or "test",
    )


def check_reference(ref: Any, where: str) -> dict[str, Any]:
    """``ref`` if it is a whole record; else a one-line UserError saying ``where`` does
    not record its data and how to name it (``--data``)."""
    if ref is None:
        raise UserError(f"{where} records no training data; name the data with --data")
    if not isinstance(ref, Mapping) or any(k not in ref for k in KEYS):
        raise UserError(f"{where}: its record of the training data is incomplete; pass --data")
    return dict(ref)


def _holdout(ref: Mapping[str, Any], cache_dir: Any) -> tuple[ImageData, ImageData]:
    """(train without the held-out part, held-out part), as ``vqkit train`` splits them."""
    source, fmt = ref["source"], ref["format"]
    size, channels = ref["image_size"], ref["channels"]
    if fmt == "shards" or (fmt == "auto" and source != "builtin" and is_shard_source(source)):
        shards = open_shards(source, "train")
        if shards.num_shards < 2:
            raise UserError(f"{source}: one train shard, so nothing was held out")
        return (
            shards.select(slice(0, -1)).load(image_size=size, channels=channels),
            shards.select(slice(-1, None)).load(image_size=size, channels=channels),
        )
    train = load_dataset(
        source, "train", image_size=size, channels=channels, cache_dir=cache_dir, format=fmt
    )
    cut = len(train) - max(1, len(train) // 20)
    return train.subset(slice(0, cut)), train.subset(slice(cut, None))


def load_reference(
    ref: Mapping[str, Any],
    split: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    where: str = "the model",
    given: bool = False,
) -> tuple[ImageData, str]:
    """(images, split name) of a record: ``split`` None is its evaluation split, "train"
    its train split without the held-out part when that is ``holdout``, anything else
    that split of the source. A recorded ``"test"`` that the source lacks is the holdout
    (``vqkit train``'s rule). A source that cannot be read is a one-line UserError naming
    it and ``--data`` (``given``: the user named the source; its own error is raised)."""
    ref = check_reference(ref, where)
    want = ref["eval_split"] if split is None else split
    opts = {"image_size": ref["image_size"], "channels": ref["channels"], "cache_dir": cache_dir}
    try:
        if want == "holdout" or (want == "train" and ref["eval_split"] == "holdout"):
            train, held = _holdout(ref, cache_dir)
            return (held, "holdout") if want == "holdout" else (train, "train")
        try:
            return load_dataset(ref["source"], want, format=ref["format"], **opts), want
        except (FileNotFoundError, ValueError):
            if split is not None or want != "test" or not Path(ref["source"]).exists():
                raise
            return _holdout(ref, cache_dir)[1], "holdout"  # a source without a test split
    except (OSError, ValueError) as e:
        if given:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{where} was trained on {ref['source']} ({ref['format']}), which cannot be read "
            f"now ({first}); pass --data to name the data"
        ) from e


def describe_use(ref: Mapping[str, Any], split: str, num_images: int) -> dict[str, Any]:
    """What an ``eval.json`` records of the data it measured: the source, format, split,
    image count and shape."""
    return {
        "source": ref["source"],
        "format": ref["format"],
        "split": split,
        "num_images": int(num_images),
        "image_size": ref["image_size"],
        "channels": ref["channels"],
    }
