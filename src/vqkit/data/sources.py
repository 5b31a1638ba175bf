"""Which format a dataset source is, which splits it has, and loading it:
:func:`detect_format`, :func:`available_splits`, :func:`load_dataset`, the built-in set."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Literal

from ..errors import UserError
from ._cache import resolve_cache_dir
from ._core import ImageData, archive_error
from .audiofolder import audio_splits, detect_modality
from .cifar import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR10_MD5,
    CIFAR10_URL,
    download_cifar10,
    load_cifar10,
)
from .idx import FASHION_MNIST_CLASSES, find_idx_files, load_idx
from .imagefolder import image_folder_splits, is_tar_path, load_image_folder
from .shards import is_shard_source, open_shards

DatasetFormat = Literal["auto", "builtin", "cifar10", "idx", "imagefolder", "shards"]

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist

_FORMATS_HELP = (
    "expected one of: 'builtin' (or None); a CIFAR-10 python archive (cifar-10-python.tar.gz) "
    "or its cifar-10-batches-py/ folder; a directory of idx files (train-images-idx3-ubyte"
    "[.gz], ...); a folder of PNG/JPEG images (optionally in class and split subfolders) or "
    "a .tar/.tar.gz/.tgz of one; shards (a brace pattern like train-{000000..000009}.tar, "
    "or a directory of train-NNNNNN.tar files); or the names 'cifar10' / 'fashion-mnist'"
)


def load_builtin(
    split: str = "train", *, image_size: int | None = None, channels: int | None = None
) -> ImageData:
    """The built-in dataset: 5000 train / 1000 test Fashion-MNIST images, 1 x 28 x 28.

    Returns images (N, 1, 28, 28) uint8 unless ``channels``/``image_size`` say otherwise.
    See ``vqkit/assets/README.md`` for provenance and licence (MIT).
    """
    data = load_idx(
        BUILTIN_DIR, split, image_size=image_size, channels=channels, classes=FASHION_MNIST_CLASSES
    )
    return ImageData(
        data.images, data.labels, data.classes, "builtin", data.split, converted=data.converted
    )


def _tar_looks_like_cifar(path: Path) -> bool:
    names = {"data_batch_1", "test_batch", "batches.meta"}
    try:
        with tarfile.open(path, "r:*") as tf:
            for i, m in enumerate(tf):
                if m.name.rsplit("/", 1)[-1] in names:
                    return True
                if i >= 20:  # the batches come first in the official archive
                    return False
    except (tarfile.TarError, EOFError, OSError) as e:
        raise archive_error(path, e) from e
    return False


def detect_format(source: str | os.PathLike[str]) -> str:
    """The format :func:`load_dataset` would use for an existing path (no decoding), or
    "audio" for a folder or tar of WAV files (:func:`~vqkit.data.load_audio` reads it; a
    source with both images and audio is one-line error).

    Raises FileNotFoundError if the path does not exist and ValueError if it matches no
    known format; both messages name the path.
    """
    if is_shard_source(source):
        return "shards"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset source not found: {path}; {_FORMATS_HELP}")
    if path.is_dir():
        if any(
            (path / d / n).is_file()
            for d in (".", CIFAR10_FOLDER)
            for n in ("data_batch_1", "test_batch")
        ):
            return "cifar10"
        if (path / CIFAR10_ARCHIVE).is_file():
            return "cifar10"
        if any(p.name.startswith(("train-images", "t10k-images")) for p in path.iterdir()):
            return "idx"
        return _folder_kind(path)
    name = path.name.lower()
    if name == CIFAR10_ARCHIVE:
        return "cifar10"
    if is_tar_path(path):
        return "cifar10" if _tar_looks_like_cifar(path) else _folder_kind(path)
    if "idx3-ubyte" in name or "idx1-ubyte" in name:
        return "idx"
    raise UserError(f"{path}: unrecognised dataset file; {_FORMATS_HELP}")


def _folder_kind(path: Path) -> str:
    # "audio" (vqkit.data.audiofolder) for WAV files alone; both kinds in one source: error
    return "audio" if detect_modality(path) == "audio" else "imagefolder"


_TRAIN_TEST = ["test", "train"]


def _named_source(source: str | os.PathLike[str], format: str) -> str | None:
    """The dataset name ("cifar10" or "fashion-mnist") ``source`` stands for, or None (a
    path, or an existing file of that name)."""
    if Path(source).exists():
        return None
    name = str(source).lower().replace("_", "-")
    if name in ("cifar10", "cifar-10") and format in ("auto", "cifar10"):
        return "cifar10"
    if name in ("fashion-mnist", "fashionmnist") and format in ("auto", "idx"):
        return "fashion-mnist"
    return None


def available_splits(
    source: str | os.PathLike[str] | None = None, *, format: DatasetFormat = "auto"
) -> list[str]:
    """The split names :func:`load_dataset` accepts for ``source``, sorted, without decoding
    anything (a tar archive's member list is read). E.g. ``["test", "train"]``; an image
    tree without split folders gives ``["train"]``. Raises like :func:`load_dataset` for a
    missing or unrecognised source. Lets a caller choose an evaluation split explicitly
    instead of catching a failed load."""
    if (
        source is None
        or format == "builtin"
        or (str(source) == "builtin" and not Path(source).exists())
    ):
        return list(_TRAIN_TEST)
    if _named_source(source, format) is not None:
        return list(_TRAIN_TEST)
    path = Path(source)
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "cifar10":
        if path.is_file() or (path / CIFAR10_ARCHIVE).is_file():
            return list(_TRAIN_TEST)  # the official archive holds both
        folder = path / CIFAR10_FOLDER if (path / CIFAR10_FOLDER).is_dir() else path
        files = {"test": "test_batch", "train": "data_batch_1"}
        return [s for s in _TRAIN_TEST if (folder / files[s]).is_file()]
    if fmt == "idx":
        found = []
        for split in _TRAIN_TEST:
            try:
                find_idx_files(path if path.is_dir() else path.parent, split)
                found.append(split)
            except (FileNotFoundError, ValueError):
                pass
        return found
    if fmt == "audio":
        return audio_splits(path)
    return image_folder_splits(path)


def _check_named_split(name: str, split: str) -> None:
    # before any download: a bad split name must not cost a 163 MB fetch first
    if split not in ("train", "test") and not (name == "fashion-mnist" and split == "t10k"):
        raise UserError(f"{name} has splits 'train' and 'test', not {split!r}")


def load_dataset(
    source: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    format: DatasetFormat = "auto",
    download: bool = True,
    num_workers: int | None = None,
    cache: bool = True,
) -> ImageData:
    """Load one split of a dataset as ImageData: uint8 images (N, C, H, W), int64 labels (N,).

    ``source``: None or "builtin" (the shipped Fashion-MNIST subset), a path (CIFAR-10
    python archive/folder, idx directory, image folder or tar of one; detected
    automatically, or fixed with ``format``), or the name "cifar10" (looked up in the cache
    directory, downloaded there if ``download``) or "fashion-mnist" (the Debian
    dataset-fashion-mnist files). An existing path always wins over a name.

    ``image_size``: shorter side resized to it, then centre-cropped square (Pillow bicubic).
    ``channels``: 1 or 3 (None: the source's own). ``cache_dir``: decoded-data cache,
    default ``$VQKIT_CACHE`` or ``~/.cache/vqkit``; ``cache=False`` neither reads nor writes
    it. ``num_workers``: image-folder decode processes (None: automatic).

    Shards (``format="shards"``, or detected): the split is decoded into memory in shard
    order (centre crop for ``image_size``); stream large splits with :class:`ShardLoader`.
    """
    if format not in ("auto", "builtin", "cifar10", "idx", "imagefolder", "shards"):
        raise UserError(
            f"unknown format {format!r}; use auto, builtin, cifar10, idx, imagefolder or shards"
        )
    if source is not None and (
        format == "shards" or (format == "auto" and is_shard_source(source))
    ):
        return open_shards(source, split).load(image_size=image_size, channels=channels)
    if (
        source is None
        or format == "builtin"
        or (str(source) == "builtin" and not Path(source).exists())
    ):
        return load_builtin(split, image_size=image_size, channels=channels)
    path = Path(source)
    if not path.exists():
        named = _named_source(source, format)
        if named is not None:
            _check_named_split(named, split)
        if named == "cifar10":
            cached = resolve_cache_dir(cache_dir)
            for cand in (cached / CIFAR10_FOLDER, cached / CIFAR10_ARCHIVE):
                if cand.exists():
                    path = cand
                    break
            else:
                if not download:
                    raise FileNotFoundError(
                        f"CIFAR-10 not found in {cached}: put {CIFAR10_ARCHIVE} (md5 "
                        f"{CIFAR10_MD5}, from {CIFAR10_URL}) there, or pass its path"
                    )
                path = download_cifar10(cached)
            format = "cifar10"
        elif named == "fashion-mnist":
            if not FASHION_MNIST_DIR.is_dir():
                raise FileNotFoundError(
                    f"Fashion-MNIST not found at {FASHION_MNIST_DIR}; install it with "
                    "'apt-get install dataset-fashion-mnist' or pass a directory of idx files"
                )
            path, format = FASHION_MNIST_DIR, "idx"
        else:
            raise FileNotFoundError(f"dataset source not found: {path}; {_FORMATS_HELP}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "audio":
        raise UserError(f"{path}: an audio dataset (WAV files); load it with vqkit.data.load_audio")
    if fmt == "cifar10":
        return load_cifar10(
            path,
            split,
            image_size=image_size,
            channels=channels,
            cache_dir=cache_dir,
            cache=cache,
        )
    if fmt == "idx":
        return load_idx(path, split, image_size=image_size, channels=channels)
    return load_image_folder(
        path,
        split,
        image_size=image_size,
        channels=channels,
        cache_dir=cache_dir,
        num_workers=num_workers,
        cache=cache,
    )
