"""Image folders: a tree of PNG/JPEG files, or a tar archive of one, decoded with Pillow.

Layout rules, applied to a directory or to the member names of a tar archive:

* split: the shallowest folder named like ``split`` (e.g. ``train/``, or
  ``cifar10/train/`` under one top-level folder) is the root of that split. A tree with no
  split folders at all is one "train" split.
* classes: when every image of the split sits in a subfolder of the split root, the
  subfolder names, sorted, are the classes (label i = i-th name); otherwise all labels are 0
  and ``classes`` is empty. A chain of single top-level folders is skipped first.
* order: images are sorted by path component-wise, so the order is the same on every run.

The decoded uint8 array is cached (see :mod:`vqkit.data._cache`): later loads read one .npz.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import tarfile
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ._cache import cache_file, load_cached, resolve_cache_dir, save_cached
from ._core import ImageData, channels_to_mode, resize_center_crop

__all__ = ["IMAGE_EXTENSIONS", "TAR_SUFFIXES", "is_tar_path", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_MAX_LISTED = 5  # how many bad paths a warning or error names


def is_tar_path(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def _is_image_name(rel: str) -> bool:
    parts = rel.split("/")
    # Skip hidden files/folders and macOS resource forks (._x.jpg, __MACOSX/).
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return rel.lower().endswith(IMAGE_EXTENSIONS)


def _list_directory(root: Path) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in files:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if _is_image_name(rel):
                out.append(rel)
    return out


def _read_tar(path: Path) -> dict[str, bytes]:
    """All image members of a tar archive, read in one sequential pass (no unpacking)."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name.lstrip("/")
                while name.startswith("./"):
                    name = name[2:]
                if not _is_image_name(name):
                    continue
                f = tf.extractfile(m)
                assert f is not None
                out[name] = f.read()
            # tarfile stops silently when the archive ends exactly at a member boundary;
            # a complete archive ends with a zero block, so fewer than 512 bytes read past
            # the last member means the file was cut short.
            fileobj, offset = getattr(tf, "fileobj", None), getattr(tf, "offset", None)
            if fileobj is not None and offset is not None and fileobj.tell() - offset < 512:
                raise tarfile.ReadError("archive ends without an end-of-archive block")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated archive ({e})") from e
    return out


def _path_key(rel: str) -> list[str]:
    return rel.split("/")


def _select_split(paths: Sequence[str], split: str | None, where: Path) -> tuple[str, list[str]]:
    """(root prefix, selected paths) for ``split``; the root ends with '/' or is ''."""
    if split is not None:
        roots = set()
        for p in paths:
            parts = p.split("/")
            for i, part in enumerate(parts[:-1]):
                if part == split:
                    roots.add("/".join(parts[: i + 1]) + "/")
                    break
        if roots:
            depth = min(r.count("/") for r in roots)
            top = sorted(r for r in roots if r.count("/") == depth)
            if len(top) > 1:
                raise ValueError(
                    f"{where}: ambiguous split {split!r}: several folders match ({', '.join(top)})"
                )
            root = top[0]
            return root, [p for p in paths if p.startswith(root)]
        present = sorted({part for p in paths for part in p.split("/")[:-1]} & set(SPLIT_NAMES))
        if present:
            raise ValueError(
                f"{where}: no {split!r} split folder; split folders found: {', '.join(present)}"
            )
        if split != "train":
            raise ValueError(
                f"{where}: has no split folders (train/, test/, ...), so the whole tree is the "
                f"'train' split; there is no {split!r} split"
            )
    return "", list(paths)


def _labels_for(rel_paths: Sequence[str]) -> tuple[list[int], tuple[str, ...], str]:
    """Labels from class subfolders; also returns the skipped single-folder prefix."""
    prefix = ""
    rel = list(rel_paths)
    # Descend through a chain of single folders (e.g. an archive's one top-level folder).
    while rel and all("/" in p for p in rel):
        tops = {p.split("/", 1)[0] for p in rel}
        if len(tops) != 1:
            break
        stripped = [p.split("/", 1)[1] for p in rel]
        if not all("/" in p for p in stripped):
            break  # the single folder is itself the only class folder: keep it as a class
        prefix += tops.pop() + "/"
        rel = stripped
    if rel and all("/" in p for p in rel):
        names = [p.split("/", 1)[0] for p in rel]
        classes = tuple(sorted(set(names)))
        index = {c: i for i, c in enumerate(classes)}
        return [index[n] for n in names], classes, prefix
    return [0] * len(rel), (), prefix


def _decode_one(item: bytes | str, mode: str, size: int | None) -> tuple[bytes, tuple[int, int]]:
    """Decode one image to raw ``mode`` pixels; returns (pixel bytes, (height, width))."""
    from PIL import Image

    data = item if isinstance(item, bytes) else Path(item).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decode now, so a truncated or corrupt file raises here
        img = im
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning
        if img.mode != mode:
            img = img.convert(mode)
        if size is not None:
            img = resize_center_crop(img, size)
        return img.tobytes(), (img.height, img.width)


_Decoded = tuple[bytes, list[tuple[int, int] | str]]


def _decode_chunk(args: tuple[list[bytes | str], str, int | None]) -> _Decoded:
    """Decode a chunk; returns (all pixels concatenated, per image (h, w) or an error)."""
    items, mode, size = args
    parts: list[bytes] = []
    meta: list[tuple[int, int] | str] = []
    for item in items:
        try:
            pixels, hw = _decode_one(item, mode, size)
        except Exception as e:  # reported by path by the caller
            meta.append(f"{type(e).__name__}: {e}")
        else:
            parts.append(pixels)
            meta.append(hw)
    # One bytes object per chunk: far cheaper to send back from a worker than many arrays.
    return b"".join(parts), meta


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _decode_all(
    items: list[bytes | str], mode: str, size: int | None, num_workers: int | None
) -> list[_Decoded]:
    n = len(items)
    if num_workers is None:
        # Measured on a 2-vCPU machine (50k 32x32 JPEGs): a 2-process pool was no faster
        # than one process, and slower when the machine was busy, so only use a pool when
        # there are clearly spare cores and enough images to amortise its start-up.
        cpus = _cpu_count()
        num_workers = min(cpus, 8) if cpus >= 4 and n >= 2000 else 0
    if num_workers <= 1:
        return [_decode_chunk((items, mode, size))]
    chunk = max(64, min(1024, n // (num_workers * 4) + 1))
    jobs = [(items[i : i + chunk], mode, size) for i in range(0, n, chunk)]
    # fork is cheapest on Linux (the worker needs only this module); elsewhere use spawn.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with multiprocessing.get_context(method).Pool(num_workers) as pool:
        return pool.map(_decode_chunk, jobs, chunksize=1)


def load_image_folder(
    source: str | os.PathLike[str],
    split: str | None = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
    num_workers: int | None = None,
    on_error: Literal["skip", "raise"] = "skip",
) -> ImageData:
    """Load an image tree (directory or .tar/.tar.gz/.tgz) as ImageData.

    Returns images (N, C, H, W) uint8 and labels (N,) int64 (see the module docstring for
    the split/class rules). ``image_size``: resize the shorter side to it and centre-crop to
    a square; without it all images must share one size. ``channels``: 1 (grayscale) or 3
    (RGB); None takes grayscale if the first image is grayscale, else RGB. ``split=None``
    takes the whole tree. Unreadable images are skipped with a warning giving their count and
    first paths (``on_error="raise"`` makes them an error). ``num_workers``: decode
    processes; None = up to 8 when there are >= 4 cores and >= 2000 images, else 0 (decode in
    this process).
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image folder or archive not found: {path}")
    tar = path.is_file()
    if tar and not is_tar_path(path):
        raise ValueError(f"{path}: not a directory or a tar archive ({', '.join(TAR_SUFFIXES)})")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    if channels is not None:
        channels_to_mode(channels)  # validate early
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")

    cache_path = None
    if cache:
        options = {
            "split": split,
            "image_size": image_size,
            "channels": channels,
            "on_error": on_error,
        }
        cache_path = cache_file(resolve_cache_dir(cache_dir), "imagefolder", path, options)
        hit = load_cached(cache_path)
        if hit is not None:
            skipped = tuple(str(s) for s in hit["skipped"])
            if skipped:
                _warn_skipped(path, skipped, len(hit["labels"]) + len(skipped))
            return ImageData(
                torch.from_numpy(hit["images"]),
                torch.from_numpy(hit["labels"]),
                tuple(str(c) for c in hit["classes"]),
                str(path),
                split or "all",
                tuple(s.split(": ", 1)[0] for s in skipped),
            )

    blobs: dict[str, bytes] = {}
    if tar:
        blobs = _read_tar(path)
        names = list(blobs)
    else:
        names = _list_directory(path)
    if not names:
        raise ValueError(
            f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files)"
        )
    root, selected = _select_split(names, split, path)
    selected.sort(key=_path_key)
    labels, classes, _ = _labels_for([p[len(root) :] for p in selected])
    items: list[bytes | str] = (
        [blobs[p] for p in selected] if tar else [str(path / p) for p in selected]
    )
    display = [f"{path}:{p}" if tar else str(path / p) for p in selected]
    del blobs

    if channels is None:
        channels = _guess_channels(items, display)
    mode = channels_to_mode(channels)
    decoded = _decode_all(items, mode, image_size, num_workers)
    del items

    meta = [m for _, part in decoded for m in part]
    good = [i for i, m in enumerate(meta) if not isinstance(m, str)]
    bad = [f"{display[i]}: {m}" for i, m in enumerate(meta) if isinstance(m, str)]
    if bad and on_error == "raise":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"cannot decode image {bad[0]}{more}")
    if not good:
        raise ValueError(
            f"{path}: none of the {len(meta)} images could be decoded: "
            + "; ".join(bad[:_MAX_LISTED])
        )
    h, w = meta[good[0]]  # type: ignore[misc]
    for i in good:
        if meta[i] != (h, w):
            hi, wi = meta[i]  # type: ignore[misc]
            raise ValueError(
                f"images differ in size: {display[good[0]]} is {w}x{h} but {display[i]} is "
                f"{wi}x{hi}; pass image_size to resize and crop them all"
            )
    pixels = b"".join(buf for buf, _ in decoded)
    del decoded
    out = np.frombuffer(pixels, dtype=np.uint8).reshape(len(good), h, w, channels)
    images = out.transpose(0, 3, 1, 2).copy()  # writable, (N, C, H, W) contiguous
    label_arr = np.asarray([labels[i] for i in good], dtype=np.int64)
    if bad:
        _warn_skipped(path, tuple(bad), len(selected))
    if cache_path is not None:
        save_cached(
            cache_path,
            {
                "images": images,
                "labels": label_arr,
                "classes": np.asarray(classes, dtype=np.str_).reshape(-1),
                "skipped": np.asarray(bad, dtype=np.str_).reshape(-1),
            },
        )
    return ImageData(
        torch.from_numpy(images),
        torch.from_numpy(label_arr),
        classes,
        str(path),
        split or "all",
        tuple(b.split(": ", 1)[0] for b in bad),
    )


def _guess_channels(items: Sequence[bytes | str], display: Sequence[str]) -> int:
    """1 if the first readable image is grayscale, else 3."""
    from PIL import Image

    for item in items[:20]:
        try:
            data = item if isinstance(item, bytes) else Path(item).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                return 1 if im.mode in _GRAY_MODES else 3
        except Exception:
            continue
    return 3


def _warn_skipped(where: Path, bad: Sequence[str], total: int) -> None:
    listed = "; ".join(bad[:_MAX_LISTED]) + ("; ..." if len(bad) > _MAX_LISTED else "")
    warnings.warn(
        f"{where}: skipped {len(bad)} of {total} images that could not be decoded: {listed}",
        stacklevel=3,
    )
