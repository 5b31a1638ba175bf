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

import multiprocessing
import os
import sys
import tarfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..errors import UserError
from ._cache import cache_file, load_cached, resolve_cache_dir, save_cached
from ._core import ImageData, archive_error, channels_to_mode
from ._stream import scan_tar
from .decode import decode_pixels, too_large_message

__all__ = [
    "IMAGE_EXTENSIONS",
    "TAR_SUFFIXES",
    "image_folder_splits",
    "is_tar_path",
    "load_image_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")
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


def member_name(name: str) -> str:
    """A tar member's path without a leading ``/`` or ``./`` (as folders give them)."""
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name


def tar_names(path: Path) -> list[str]:
    """Every regular file of a tar archive (member headers only, no data read)."""
    try:
        with tarfile.open(path, "r:*") as tf:
            return [member_name(m.name) for m in tf if m.isfile()]
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise archive_error(path, e) from e


def read_tar(path: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """The members of a tar archive whose name passes ``keep`` (image files here, WAV
    files for :mod:`.audiofolder`), read in one sequential pass (no unpacking)."""
    out: dict[str, bytes] = {}

    def visit(tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = member_name(m.name)
        if m.isfile() and keep(name):
            f = tf.extractfile(m)
            assert f is not None
            out[name] = f.read()

    scan_tar(path, visit, lambda e: archive_error(path, e))
    return out


def folder_items(
    path: Path, split: str | None
) -> tuple[list[bytes | str], list[str], list[int], tuple[str, ...]]:
    """The images of one ``split`` of an image folder or a tar of one, by this module's
    layout rules (split folders, class subfolders, natural order): ``(items, display,
    labels, classes)``, items the member bytes (tar) or file paths, display the names
    errors give. The image-folder loader and ``vqkit pack`` both read folders so."""
    tar = path.is_file()
    blobs = read_tar(path, _is_image_name) if tar else {}  # members stay in memory (compressed)
    names = list(blobs) if tar else _list_directory(path)
    if not names:
        raise UserError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
    root, selected = _select_split(names, split, path)
    selected.sort(key=_path_key)
    labels, classes, _ = _labels_for([p[len(root) :] for p in selected])
    items: list[bytes | str] = (
        [blobs.pop(p) for p in selected] if tar else [str(path / p) for p in selected]
    )
    display = [f"{path}:{p}" if tar else str(path / p) for p in selected]
    return items, display, labels, classes


def image_folder_splits(source: str | os.PathLike[str]) -> list[str]:
    """Split folder names (train, test, val, valid, validation) present in an image tree or
    tar of one, sorted; ``["train"]`` when it has none (the whole tree is "train")."""
    path = Path(source)
    if path.is_file():
        names = [n for n in tar_names(path) if _is_image_name(n)]
    else:
        names = _list_directory(path)
    present = {part for n in names for part in n.split("/")[:-1]} & set(SPLIT_NAMES)
    return sorted(present) or ["train"]


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
                raise UserError(
                    f"{where}: ambiguous split {split!r}: several folders match ({', '.join(top)})"
                )
            root = top[0]
            return root, [p for p in paths if p.startswith(root)]
        present = sorted({part for p in paths for part in p.split("/")[:-1]} & set(SPLIT_NAMES))
        if present:
            raise UserError(
                f"{where}: no {split!r} split folder; split folders found: {', '.join(present)}"
            )
        if split != "train":
            raise UserError(
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


# per image: (height, width, channels, was gray) or an error "Type: message"
_Meta = tuple[int, int, int, bool] | str
_Decoded = tuple[bytes, list[_Meta]]
_TOO_LARGE = "DecompressionBombError"


def _decode_chunk(args: tuple[list[bytes | str], str | None, int | None]) -> _Decoded:
    """Decode a chunk; returns (all pixels concatenated, per image its meta or an error)."""
    items, mode, size = args
    parts: list[bytes] = []
    meta: list[_Meta] = []
    for item in items:
        try:
            pixels, h, w, c, gray = decode_pixels(item, mode, size)
        except Exception as e:  # reported by path by the caller
            meta.append(f"{type(e).__name__}: {e}")
        else:
            parts.append(pixels)
            meta.append((h, w, c, gray))
    # One bytes object per chunk: far cheaper to send back from a worker than many arrays.
    return b"".join(parts), meta


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _decode_all(
    items: list[bytes | str], mode: str | None, size: int | None, num_workers: int | None
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
    (RGB); None gives grayscale only if every image is grayscale, else RGB, with a warning
    giving the number of grayscale images converted (``ImageData.converted`` counts the
    images whose channel count was changed, either way). ``split=None`` takes the whole
    tree. Unreadable images are skipped with a warning giving their count and first paths
    (``on_error="raise"`` makes them an error); an image over Pillow's decompression-bomb
    limit is always an error naming the file. ``num_workers``: decode
    processes; None = up to 8 when there are >= 4 cores and >= 2000 images, else 0 (decode in
    this process).
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image folder or archive not found: {path}")
    tar = path.is_file()
    if tar and not is_tar_path(path):
        raise UserError(f"{path}: not a directory or a tar archive ({', '.join(TAR_SUFFIXES)})")
    if on_error not in ("skip", "raise"):
        raise UserError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    if channels is not None:
        channels_to_mode(channels)  # validate early
    if image_size is not None and image_size < 1:
        raise UserError(f"image_size must be positive, got {image_size}")

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
            converted = int(hit["converted"]) if "converted" in hit else 0
            if channels is None and converted:
                _warn_converted(path, converted, len(hit["labels"]))
            return ImageData(
                torch.from_numpy(hit["images"]),
                torch.from_numpy(hit["labels"]),
                tuple(str(c) for c in hit["classes"]),
                str(path),
                split or "all",
                tuple(s.split(": ", 1)[0] for s in skipped),
                converted,
            )

    items, display, labels, classes = folder_items(path, split)

    requested = channels
    # channels=None: each image decodes as its own kind; the set's count is decided below
    decoded = _decode_all(
        items, None if channels is None else channels_to_mode(channels), image_size, num_workers
    )
    del items

    meta = [m for _, part in decoded for m in part]
    good = [i for i, m in enumerate(meta) if not isinstance(m, str)]
    bad = [f"{display[i]}: {m}" for i, m in enumerate(meta) if isinstance(m, str)]
    too_large = [i for i, m in enumerate(meta) if isinstance(m, str) and m.startswith(_TOO_LARGE)]
    if too_large:  # never skipped: a huge photo is data the user meant to include
        i = too_large[0]
        raise UserError(too_large_message(display[i], meta[i].split(": ", 1)[1]))  # type: ignore[union-attr]
    if bad and on_error == "raise":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"cannot decode image {bad[0]}{more}")
    if not good:
        raise UserError(
            f"{path}: none of the {len(meta)} images could be decoded: "
            + "; ".join(bad[:_MAX_LISTED])
        )
    h, w = meta[good[0]][:2]
    for i in good:
        if meta[i][:2] != (h, w):
            hi, wi = meta[i][:2]
            raise UserError(
                f"images differ in size: {display[good[0]]} is {w}x{h} but {display[i]} is "
                f"{wi}x{hi}; pass image_size to resize and crop them all"
            )
    n_gray = sum(bool(meta[i][3]) for i in good)  # type: ignore[index]
    if channels is None:
        channels = 1 if n_gray == len(good) else 3
    converted = n_gray if channels == 3 else len(good) - n_gray
    pixels = b"".join(buf for buf, _ in decoded)
    del decoded
    images = _assemble(pixels, [meta[i] for i in good], h, w, channels)  # type: ignore[misc]
    del pixels
    label_arr = np.asarray([labels[i] for i in good], dtype=np.int64)
    if bad:
        _warn_skipped(path, tuple(bad), len(display))
    if requested is None and converted:
        _warn_converted(path, converted, len(good))
    if cache_path is not None:
        save_cached(
            cache_path,
            {
                "images": images,
                "labels": label_arr,
                "classes": np.asarray(classes, dtype=np.str_).reshape(-1),
                "skipped": np.asarray(bad, dtype=np.str_).reshape(-1),
                "converted": np.asarray(converted, dtype=np.int64),
            },
        )
    return ImageData(
        torch.from_numpy(images),
        torch.from_numpy(label_arr),
        classes,
        str(path),
        split or "all",
        tuple(b.split(": ", 1)[0] for b in bad),
        converted,
    )


def _assemble(
    pixels: bytes, meta: Sequence[tuple[int, int, int, bool]], h: int, w: int, channels: int
) -> np.ndarray:
    """(N, C, H, W) uint8 from the concatenated (H, W, c_i) pixels of every image; a gray
    image in an RGB set has its one channel repeated (exactly Pillow's L -> RGB)."""
    buf = np.frombuffer(pixels, dtype=np.uint8)
    n = len(meta)
    if all(m[2] == channels for m in meta):
        return buf.reshape(n, h, w, channels).transpose(0, 3, 1, 2).copy()
    out = np.empty((n, channels, h, w), dtype=np.uint8)
    pos = 0
    for j, (_, _, c, _) in enumerate(meta):
        size = h * w * c
        out[j] = buf[pos : pos + size].reshape(h, w, c).transpose(2, 0, 1)  # broadcasts 1 -> 3
        pos += size
    return out


def _warn_converted(where: Path, converted: int, total: int) -> None:
    warnings.warn(
        f"{where}: {converted} of {total} images are grayscale and were converted to RGB "
        "(the set holds RGB images too); pass channels=1 (--channels 1) to load all as "
        "grayscale, or channels=3 to silence this",
        stacklevel=3,
    )


def _warn_skipped(where: Path, bad: Sequence[str], total: int) -> None:
    listed = "; ".join(bad[:_MAX_LISTED]) + ("; ..." if len(bad) > _MAX_LISTED else "")
    warnings.warn(
        f"{where}: skipped {len(bad)} of {total} images that could not be decoded: {listed}",
        stacklevel=3,
    )
