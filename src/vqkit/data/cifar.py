"""The official CIFAR-10 python format (``cifar-10-python.tar.gz`` / ``cifar-10-batches-py/``).

Each batch file is a pickled dict (bytes keys in the official Python 2 pickles) with
``data``: uint8 (10000, 3072), each row the R, G and B 32x32 planes in turn, and ``labels``:
a list of ints. ``batches.meta`` holds ``label_names``.
"""

from __future__ import annotations

import http.client
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..storage.fileio import atomic_write, clean_stale_temps, file_hexdigest, is_disk_full
from ._cache import cache_file, load_cached, resolve_cache_dir, save_cached
from ._core import ImageData, archive_error, transform_array

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DatasetDownloadError",
    "download_cifar10",
    "load_cifar10",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
BATCH_NAMES = frozenset(_SPLIT_FILES["train"] + _SPLIT_FILES["test"] + ("batches.meta",))


class DatasetDownloadError(FileNotFoundError):
    """A dataset is not on disk and could not be downloaded; the one-line message says which
    file to put where. A FileNotFoundError (an OSError), so callers that report a missing
    dataset report this the same way."""


def file_md5(path: str | os.PathLike[str]) -> str:
    return file_hexdigest(path, "md5")


def verify_cifar10_archive(path: str | os.PathLike[str], md5: str = CIFAR10_MD5) -> None:
    """Raise ValueError naming ``path`` if its md5 is not the official one."""
    actual = file_md5(path)
    if actual != md5:
        raise UserError(
            f"checksum mismatch for {path}: md5 {actual}, expected {md5} (the official "
            f"{CIFAR10_ARCHIVE}). The file is corrupt, incomplete or a different file; "
            f"download it again from {CIFAR10_URL}"
        )


def download_cifar10(
    cache_dir: str | os.PathLike[str] | None = None, *, timeout: float = 15.0
) -> Path:
    """Path of a verified ``cifar-10-python.tar.gz`` in ``cache_dir``, downloading it if absent.

    ``cache_dir`` defaults to ``$VQKIT_CACHE`` or ``~/.cache/vqkit``. An existing file is
    checked against the official md5. When the network is unreachable this raises
    DatasetDownloadError saying where to put a manually downloaded copy.
    """
    target = resolve_cache_dir(cache_dir) / CIFAR10_ARCHIVE
    if target.is_file():
        verify_cifar10_archive(target)
        return target
    clean_stale_temps(target.parent)  # e.g. a download killed half-way

    def fetch(tmp: str) -> None:
        try:
            with (
                open(tmp, "wb") as out,
                urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as resp,
            ):
                while block := resp.read(1 << 20):
                    out.write(block)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if is_disk_full(e):
                raise  # atomic_write reports it as a DiskFullError naming the target
            raise DatasetDownloadError(
                f"could not download {CIFAR10_URL} ({e}). Without network access, download "
                f"{CIFAR10_ARCHIVE} elsewhere and put it at {target} (md5 {CIFAR10_MD5}), "
                f"or pass the path of the archive or of its extracted {CIFAR10_FOLDER}/ "
                "folder as the dataset source."
            ) from e
        verify_cifar10_archive(tmp)

    # the archive appears under its name only once complete and verified
    atomic_write(target, fetch)
    return target


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtins: a downloaded pickle must not
    be able to run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
        ("builtins", "bytes"),
        ("__builtin__", "bytes"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core") :]  # avoid the numpy 2 shim
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise UserError(f"{where}: not a readable CIFAR-10 batch pickle ({e})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Official pickles have bytes keys; files re-saved under Python 3 may have str keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(d: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in d or ("labels" not in d and "fine_labels" not in d):
        raise UserError(f"{where}: batch dict lacks 'data'/'labels' (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"] if "labels" in d else d["fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{where}: 'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise UserError(f"{where}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels  # rows are R, G, B planes -> (n, 3, 32, 32)


def _find_batch_folder(path: Path) -> Path | None:
    for cand in (path, path / CIFAR10_FOLDER):
        if (cand / "data_batch_1").is_file() or (cand / "test_batch").is_file():
            return cand
    return None


def _read_from_folder(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    out = {}
    for name in names:
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch file missing: {p}")
        out[name] = p.read_bytes()
    return out


def _read_from_archive(archive: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:  # stream in archive order; stop once everything needed is read
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in names and base not in out:
                    f = tf.extractfile(m)
                    assert f is not None
                    out[base] = f.read()
                    if len(out) == len(names):
                        break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise archive_error(archive, e) from e
    missing = [n for n in names if n not in out]
    if missing:
        raise UserError(f"{archive}: not a CIFAR-10 python archive, missing {', '.join(missing)}")
    return out


def load_cifar10(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    verify: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> ImageData:
    """Load CIFAR-10 from the official archive, its extracted folder, or a parent of that folder.

    Returns ImageData with images (N, C, 32, 32) uint8 (N = 50000 for "train", 10000 for
    "test"; C = 3 unless ``channels=1``; other sizes with ``image_size``) and labels (N,).
    ``verify``: check the archive md5; None checks when the file has the official name.
    Archives are decoded once into the cache (see :func:`vqkit.data.default_cache_dir`);
    the extracted folder is read directly.
    """
    path = Path(source)
    if split not in _SPLIT_FILES:
        raise UserError(f"CIFAR-10 has splits 'train' and 'test', not {split!r}")
    names = _SPLIT_FILES[split]
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 source not found: {path}")
    folder = _find_batch_folder(path) if path.is_dir() else None
    archive: Path | None = None
    if path.is_dir() and folder is None:
        if (path / CIFAR10_ARCHIVE).is_file():
            archive = path / CIFAR10_ARCHIVE
        else:
            raise FileNotFoundError(
                f"no CIFAR-10 data in {path}: expected data_batch_1..5/test_batch, a "
                f"{CIFAR10_FOLDER}/ folder or {CIFAR10_ARCHIVE}"
            )
    elif path.is_file():
        archive = path
    if archive is not None and (verify or (verify is None and archive.name == CIFAR10_ARCHIVE)):
        verify_cifar10_archive(archive)

    cache_path = None
    if archive is not None and cache:
        options = {"split": split, "image_size": image_size, "channels": channels}
        cache_path = cache_file(resolve_cache_dir(cache_dir), "cifar10", archive, options)
        hit = load_cached(cache_path)
        if hit is not None:
            return ImageData(
                torch.from_numpy(hit["images"]),
                torch.from_numpy(hit["labels"]),
                CIFAR10_CLASSES,
                str(path),
                split,
                converted=len(hit["labels"]) if channels == 1 else 0,
            )

    if folder is not None:
        raw = _read_from_folder(folder, names)
    else:
        assert archive is not None
        raw = _read_from_archive(archive, names)
    parts = [_parse_batch(_unpickle(raw[n], f"{path}:{n}"), f"{path}:{n}") for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = np.ascontiguousarray(transform_array(images, channels, image_size))
    if cache_path is not None:
        save_cached(cache_path, {"images": images, "labels": labels})
    return ImageData(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        CIFAR10_CLASSES,
        str(path),
        split,
        converted=len(labels) if channels == 1 else 0,  # CIFAR-10 images are RGB
    )
