"""Write any dataset vqkit reads as WebDataset-layout tar shards (``vqkit pack``).

Output, in ``out_dir``: ``{split}-000000.tar``, ``{split}-000001.tar``, ... each holding
``shard_size`` samples (the last one fewer), and ``manifest.json`` (per-shard counts,
channels, size, classes; one entry per split, merged with an existing manifest), which
:func:`vqkit.data.shards.open_shards` reads instead of scanning the shards.

A sample is ``{key}.png`` or ``{key}.jpg`` plus ``{key}.cls`` (label, ASCII digits). The
key numbers the image in the source's own order (image folders: sorted paths), zero-padded,
so sorting by key restores that order; the samples are written in a seeded shuffled order
by default, so that every shard holds a mix of classes (streaming shuffles only within a
buffer and across shards).

Encoding: image files (folders or tars of them) are read one at a time and, when no
``image_size`` is asked for, JPEG and PNG files are stored with their original bytes (no
second lossy encoding; readers convert the mode exactly as the image-folder loader does).
Other files, resized images, ``encoding="png"`` and decoded in-memory sources (CIFAR-10
python, idx, builtin) are stored as lossless PNG. Every image is decoded once while packing;
unreadable ones are skipped with a warning, as the image-folder loader skips them.

One pack at a time writes a folder: ``pack`` holds the folder's lock (``out/.lock``,
:class:`~vqkit.storage.dirlock.DirLock`, as a run directory does) from its last check of
the existing shards to the manifest, and a second pack into the folder meanwhile is
refused at once, naming the first one's pid and host.

A pack is all-or-nothing for a reader. The new shards are written into a hidden staging
folder ``.pack-{split}.{host}.{pid}.{random}.tmp`` beside the old ones, which stay
readable meanwhile; a kill there leaves the old pack intact (the staging folder is
removed by the next pack). Then the switch: a marker ``.{split}.packing`` is written, the
staged shards are renamed into place, shards left over from a larger old pack removed,
the manifest written, and the marker removed. :func:`vqkit.data.shards.open_shards`
refuses a split whose marker is present (a pack killed during the switch) with a message
saying to pack it again with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import UserError
from ..storage.dirlock import DirLock
from ..storage.fileio import atomic_write, clean_stale_temps, loads_json, temp_path
from ._core import ImageData, channels_to_mode
from ._stream import MANIFEST_NAME, packing_marker
from .decode import GRAY_MODES, decode_image
from .shards import MANIFEST_FORMAT
from .transforms import crop_resize

__all__ = ["add_pack_arguments", "pack", "run_pack"]

_KEEP = {"JPEG": "jpg", "PNG": "png"}  # Pillow format -> member extension kept as is
_MAX_LISTED = 5


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _encode_file(
    data: bytes, channels: int, image_size: int | None, encoding: str
) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes to store, (H, W) as read back) for one image file."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decode fully: a corrupt file fails here, not in training
        fmt, size = im.format, (im.height, im.width)
    if encoding == "auto" and image_size is None and fmt in _KEEP:
        return _KEEP[fmt], data, size
    img = crop_resize(decode_image(data, channels_to_mode(channels))[0], image_size)
    return "png", _png(img), (img.height, img.width)


def _from_folder(
    path: Path, split: str, channels: int | None, image_size: int | None, encoding: str
) -> tuple[int, list[int], tuple[str, ...], int, Any]:
    """(count, labels, classes, channels, encoder(i) -> (ext, bytes, hw) | error)."""
    # The image-folder loader's own layout rules, so labels and order agree with it.
    from .imagefolder import folder_items

    items, display, labels, classes = folder_items(path, split)
    c = channels or _channels_of(items, path)

    def encode(i: int) -> tuple[str, bytes, tuple[int, int]] | str:
        item = items[i]
        try:
            data = item if isinstance(item, bytes) else Path(item).read_bytes()
            return _encode_file(data, c, image_size, encoding)
        except Exception as e:  # reported by path, like the image-folder loader
            return f"{display[i]}: {type(e).__name__}: {e}"

    return len(items), labels, classes, c, encode


def _from_arrays(data: ImageData) -> tuple[int, list[int], tuple[str, ...], int, Any]:
    from PIL import Image

    images, mode = data.images.numpy(), channels_to_mode(data.channels)

    def encode(i: int) -> tuple[str, bytes, tuple[int, int]]:
        a = images[i, 0] if data.channels == 1 else images[i].transpose(1, 2, 0)
        return "png", _png(Image.fromarray(np.ascontiguousarray(a), mode=mode)), data.hw

    return len(data), data.labels.tolist(), data.classes, data.channels, encode


def _atomic_write(path: Path, write: Any) -> None:
    """The one atomic write (:func:`vqkit.storage.fileio.atomic_write`), fed a binary file."""

    def into(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, into)


def _channels_of(items: Sequence[bytes | str], where: Path) -> int:
    """The image-folder channel rule without decoding pixels: 1 only if every image is
    grayscale, else 3, with a warning counting the grayscale images converted."""
    from PIL import Image

    gray = 0
    for item in items:
        try:
            data = item if isinstance(item, bytes) else Path(item).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                gray += im.mode in GRAY_MODES
        except Exception:  # unreadable files are reported when they are encoded
            continue
    if gray == len(items):
        return 1
    if gray:
        warnings.warn(
            f"{where}: {gray} of {len(items)} images are grayscale and are packed as RGB; "
            "pass channels=1 to pack everything as grayscale",
            stacklevel=3,
        )
    return 3


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    def write(f: Any) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible bytes
                tf.addfile(info, io.BytesIO(data))

    _atomic_write(path, write)


def _existing(out: Path, split: str) -> list[Path]:
    pat = re.compile(re.escape(split) + r"-(\d{6,})\.tar")
    return sorted(p for p in out.glob(f"{split}-*.tar") if pat.fullmatch(p.name))


def pack(
    source: str | os.PathLike[str] | ImageData | None,
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    *,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    format: str = "auto",
    encoding: Literal["auto", "png"] = "auto",
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write one split of ``source`` as shards in ``out_dir``; returns its manifest entry.

    ``source``: anything :func:`vqkit.data.load_dataset` reads (image folders and tars of
    them are streamed file by file; other formats are loaded, then encoded as PNG), or an
    :class:`ImageData`. ``image_size`` / ``channels``: as in ``load_dataset`` (resized
    images are stored as PNG). ``shuffle``/``seed``: the order samples are written in.
    Existing ``{split}-*.tar`` shards are an error unless ``overwrite``.
    """
    from . import detect_format, load_dataset

    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"shard_size must be an int >= 1, got {shard_size!r}")
    if image_size is not None and (isinstance(image_size, bool) or not 1 <= image_size):
        raise UserError(f"image_size must be >= 1 (or None: keep the sizes), got {image_size!r}")
    if encoding not in ("auto", "png"):
        raise UserError(f"encoding must be 'auto' or 'png', not {encoding!r}")
    if channels is not None:
        channels_to_mode(channels)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder for the shards")
    _refuse_existing(out, split, overwrite)
    if out.is_dir():
        _lock(out).check_free()  # before the source is read, and again when locked below
    if isinstance(source, ImageData):
        origin = source.source or "ImageData"
        n, labels, classes, c, encode = _from_arrays(source)
    else:
        origin = str(source) if source is not None else "builtin"
        fmt = format
        if fmt == "auto" and source is not None and Path(source).exists():
            fmt = detect_format(source)
        if fmt == "imagefolder":
            n, labels, classes, c, encode = _from_folder(
                Path(source),
                split,
                channels,
                image_size,
                encoding,  # type: ignore[arg-type]
            )
        else:
            data = load_dataset(
                source,
                split,
                image_size=image_size,
                channels=channels,
                format=fmt,  # type: ignore[arg-type]
                cache_dir=cache_dir,
            )
            n, labels, classes, c, encode = _from_arrays(data)
    # one pack at a time per folder: two would interleave their switches (and the
    # manifest's read-merge-write), leaving shards of both or a crash on a moved file
    with _lock(out):
        _refuse_existing(out, split, overwrite)  # again, now that no other pack runs
        clean_stale_temps(out)  # shard temps and staging folders of killed packs
        stage = _staging_folder(out, split)
        try:
            return _pack_into(out, stage, split, n, labels, classes, c, encode, origin,
                              shard_size, image_size, shuffle, seed)  # fmt: skip
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _lock(out: Path) -> DirLock:
    """The folder's lock (``out/.lock``, the run directory's kind): a second pack into
    ``out`` while this one runs is refused at once, naming this one's pid and host."""

    def busy(who: str) -> str:
        return (
            f"{out} is in use by {who} (another vqkit pack); wait for it to end, or choose "
            "another --out"
        )

    return DirLock(out, busy)


def _refuse_existing(out: Path, split: str, overwrite: bool) -> None:
    old = _existing(out, split) if out.is_dir() else []
    if (old or packing_marker(out, split).exists()) and not overwrite:
        raise FileExistsError(
            f"{out} already holds {split} shards; pass --overwrite (overwrite=True) to "
            "replace them, or choose another --out"
        )


def _staging_folder(out: Path, split: str) -> Path:
    """A new hidden folder in ``out`` named like a temp file of this process (so that
    :func:`~vqkit.storage.fileio.clean_stale_temps` removes it once this process is gone)."""
    stage = temp_path(out / f"pack-{split}")
    stage.mkdir()
    return stage


def _pack_into(
    out: Path,
    stage: Path,
    split: str,
    n: int,
    labels: list[int],
    classes: tuple[str, ...],
    c: int,
    encode: Any,
    origin: str,
    shard_size: int,
    image_size: int | None,
    shuffle: bool,
    seed: int,
) -> dict[str, Any]:
    """Write the shards into ``stage``, then switch them into ``out`` (module docstring)."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    width = max(6, len(str(n - 1)))
    shards: list[dict[str, Any]] = []
    members: list[tuple[str, bytes]] = []
    sizes: set[tuple[int, int]] = set()
    exts: set[str] = set()
    bad: list[str] = []

    def flush() -> None:
        name = f"{split}-{len(shards):06d}.tar"
        _write_shard(stage / name, members)
        shards.append({"name": name, "count": len(members) // 2})
        members.clear()

    for i in order.tolist():
        got = encode(i)
        if isinstance(got, str):
            bad.append(got)
            continue
        ext, data, hw = got
        key = f"{i:0{width}d}"
        members += [(f"{key}.{ext}", data), (f"{key}.cls", str(labels[i]).encode())]
        sizes.add(tuple(hw))
        exts.add(ext)
        if len(members) == 2 * shard_size:
            flush()
    if members:
        flush()
    if not shards:
        raise UserError(f"{origin}: none of the {n} images could be read: " + "; ".join(bad[:5]))
    if bad:
        listed = "; ".join(bad[:_MAX_LISTED]) + ("; ..." if len(bad) > _MAX_LISTED else "")
        warnings.warn(
            f"{origin}: skipped {len(bad)} of {n} unreadable images: {listed}", stacklevel=2
        )
    entry = {
        "shards": shards,
        "num_images": sum(s["count"] for s in shards),
        "channels": c,
        "size": list(sizes.pop()) if len(sizes) == 1 else None,
        "classes": list(classes),
        "encoding": "+".join(sorted(exts)),
        "source": origin,
        "image_size": image_size,
        "shuffled": shuffle,
        "seed": seed,
        "skipped": bad[:100],
    }
    manifest_path = out / MANIFEST_NAME
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": 1, "splits": {}}
    if manifest_path.is_file():
        try:
            prev = loads_json(manifest_path.read_text())
            if isinstance(prev, dict) and prev.get("format") == MANIFEST_FORMAT:
                manifest = prev
        except (OSError, ValueError):
            pass  # replaced below
    manifest.setdefault("splits", {})[split] = entry
    text = json.dumps(manifest, indent=1).encode()
    # the switch: readers refuse the split while the marker exists
    marker = packing_marker(out, split)
    _atomic_write(marker, lambda f: f.write(f"{os.getpid()} {socket.gethostname()}\n".encode()))
    for s in shards:
        os.replace(stage / s["name"], out / s["name"])
    for p in _existing(out, split)[len(shards) :]:
        p.unlink()  # left over from an earlier, larger pack of this split
    _atomic_write(manifest_path, lambda f: f.write(text))
    marker.unlink()
    return entry


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``vqkit pack IMAGES --out SHARDS [--shard-size N] ...``."""
    parser.add_argument(
        "source",
        metavar="IMAGES",
        help="dataset to pack: an image folder or .tar(.gz) of one, a CIFAR-10 archive/folder, "
        "an idx directory, 'builtin', 'cifar10', 'fashion-mnist'",
    )
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to pack (default train,test: test skipped if absent)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="resize + centre crop")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None)
    parser.add_argument("--format", default="auto", help="source format (as vqkit train)")
    parser.add_argument(
        "--encoding",
        choices=("auto", "png"),
        default="auto",
        help="auto: keep JPEG/PNG file bytes when not resizing, else PNG; png: always PNG",
    )
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards")
    parser.add_argument("--cache-dir", default=None, help="decoded-data cache directory")


def run_pack(args: argparse.Namespace) -> int:
    """Run ``vqkit pack`` with parsed :func:`add_pack_arguments` arguments; returns 0.

    Errors are raised (ValueError, FileNotFoundError, FileExistsError) for the CLI to print.
    """
    explicit = args.splits is not None
    splits = [s.strip() for s in (args.splits or "train,test").split(",") if s.strip()]
    for i, split in enumerate(splits):
        try:
            entry = pack(
                args.source,
                args.out,
                args.shard_size,
                split=split,
                image_size=args.image_size,
                channels=args.channels,
                format=args.format,
                encoding=args.encoding,
                shuffle=not args.no_shuffle,
                seed=args.seed,
                overwrite=args.overwrite,
                cache_dir=args.cache_dir,
            )
        except (ValueError, FileNotFoundError) as e:
            if explicit or i == 0:
                raise
            print(f"{split}: not packed ({e})")
            continue
        print(
            f"{split}: {entry['num_images']} images in {len(entry['shards'])} shards "
            f"-> {Path(args.out) / f'{split}-*.tar'}"
        )
    return 0
