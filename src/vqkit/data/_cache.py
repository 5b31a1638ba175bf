"""Decoded-dataset cache: one uncompressed .npz per (source, options), written atomically.

The key hashes the resolved source path, its size and mtime (for a directory: the size and
mtime of every file under it) and the decode options, so editing or replacing the source
invalidates the entry. Writes go through :func:`vqkit.storage.fileio.atomic_write`, so a crash or a
concurrent reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..storage.fileio import atomic_write, clean_stale_temps

__all__ = ["CACHE_ENV", "default_cache_dir"]

CACHE_ENV = "VQKIT_CACHE"
# Bump when the decoded output for the same options changes (resampling, channel rules...).
CACHE_FORMAT_VERSION = 2  # 2: channels=None means RGB unless every image is gray


def default_cache_dir() -> Path:
    """``$VQKIT_CACHE`` if set, else ``~/.cache/vqkit``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/vqkit").expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def source_fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a file or directory tree: resolved path plus sizes and mtimes."""
    path = path.resolve()
    st = path.stat()
    if path.is_file():
        return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            try:
                s = os.stat(p)
            except OSError:
                continue
            h.update(f"{os.path.relpath(p, path)}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
            count += 1
    return {"path": str(path), "files": count, "tree": h.hexdigest()}


def cache_file(cache_dir: Path, kind: str, source: Path, options: dict[str, Any]) -> Path:
    key = {
        "version": CACHE_FORMAT_VERSION,
        "kind": kind,
        "source": source_fingerprint(source),
        "options": options,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name)[:40] or "data"
    split = re.sub(r"[^A-Za-z0-9._-]+", "_", str(options.get("split")))
    return cache_dir / f"{kind}-{stem}-{split}-{digest}.npz"


def load_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays stored at ``path``, or None if absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # a damaged cache entry must never block loading the real data
        warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=3)
        return None


def save_cached(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` atomically; warn and return False if that fails (a full
    disk included: the data is still returned, only not cached). Also removes temp files
    that killed writers left in the cache folder."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)  # uncompressed: loading is then a plain read

    try:
        clean_stale_temps(path.parent)
        atomic_write(path, write)
        return True
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path}: {e}", stacklevel=3)
        return False
