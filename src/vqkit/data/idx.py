"""The idx format of MNIST / Fashion-MNIST, raw or gzip-compressed.

Header: two zero bytes, a dtype code, the number of dimensions d, then d big-endian uint32
sizes; the data follows in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ._core import ImageData, transform_array

__all__ = ["find_idx_files", "load_idx", "read_idx"]

# dtype code -> big-endian numpy dtype
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":  # gzip magic; decide by content, not by file name
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        raise UserError(f"{path}: corrupt or truncated gzip file ({e})") from e


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one idx file (``.gz`` or raw) into a numpy array of its declared dtype and dims.

    Raises ValueError naming the file on a bad magic number, an unknown dtype code, or a
    size that does not match the header (truncated or trailing data).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise UserError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise UserError(
            f"{path}: bad idx magic {raw[:4].hex()} (expected 0000 followed by a dtype code "
            "and the number of dimensions); not an idx file"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise UserError(f"{path}: unknown idx dtype code 0x{code:02x} (magic {raw[:4].hex()})")
    if ndim == 0:
        raise UserError(f"{path}: idx header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise UserError(f"{path}: truncated idx header ({len(raw)} of {header_len} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got < expected:
        raise UserError(
            f"{path}: truncated idx data: header says {dims} of {dtype} ({expected} bytes), "
            f"file has {got} bytes of data"
        )
    if got > expected:
        raise UserError(f"{path}: {got - expected} unexpected trailing bytes after idx data {dims}")
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


def find_idx_files(directory: str | os.PathLike[str], split: str) -> tuple[Path, Path]:
    """(images, labels) idx files of ``split`` in ``directory``.

    Accepts the MNIST names ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (also with
    ``.`` instead of the second ``-`` and with a ``.gz`` suffix); "test" also matches
    ``test-...``.
    """
    directory = Path(directory)
    key = "test" if split in ("test", "t10k") else split
    if key not in _SPLIT_PREFIXES:
        raise UserError(f"idx datasets have splits 'train' and 'test', not {split!r}")

    def find(kind: str, ndim: int) -> Path:
        tried = []
        for prefix in _SPLIT_PREFIXES[key]:
            for sep in ("-", "."):
                for suffix in (".gz", ""):
                    name = f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
                    tried.append(name)
                    if (directory / name).is_file():
                        return directory / name
        raise FileNotFoundError(
            f"no {split} {kind} idx file in {directory} (looked for {', '.join(tried[:2])}, ...)"
        )

    return find("images", 3), find("labels", 1)


def load_idx(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    classes: tuple[str, ...] | None = None,
) -> ImageData:
    """Load an MNIST-style idx dataset: a directory with the four files, or an images file.

    Returns ImageData with images (N, C, H, W) uint8 (C = 1 unless ``channels=3``) and labels
    (N,) int64. ``classes`` defaults to the Fashion-MNIST names when the directory looks like
    Fashion-MNIST, else to "0".."9"-style names from the label range.
    """
    source = Path(source)
    if source.is_dir():
        images_path, labels_path = find_idx_files(source, split)
    elif source.is_file():
        images_path = source
        name = source.name.replace("images", "labels").replace("idx3", "idx1")
        labels_path = source.with_name(name)
        if name == source.name or not labels_path.is_file():
            raise FileNotFoundError(f"no labels file next to {source} (expected {labels_path})")
    else:
        raise FileNotFoundError(f"idx dataset not found: {source}")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(
            f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise UserError(
            f"{labels_path}: expected {images.shape[0]} labels, got array of shape {labels.shape}"
        )
    arr = transform_array(images[:, None], channels, image_size)
    if classes is None:
        if "fashion" in str(source.resolve()).lower():
            classes = FASHION_MNIST_CLASSES
        else:
            classes = tuple(str(i) for i in range(int(labels.max()) + 1)) if len(labels) else ()
    return ImageData(
        images=torch.from_numpy(np.ascontiguousarray(arr)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=tuple(classes),
        source=str(source),
        split="test" if split == "t10k" else split,
        converted=len(labels) if channels == 3 else 0,  # idx images are gray
    )
