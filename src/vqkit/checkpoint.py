"""Checkpoints: atomic writes, safe loading, clear errors.

A training checkpoint (``.pt``) is a ``torch.save`` dict of tensors and plain
Python values only, read back with ``weights_only=True`` (no pickled code):

    {"format": "vqkit-checkpoint", "version": 1, "model_config": {...},
     "model": state_dict, "optimizer": state_dict, "step": int,
     "loader": {...}, "rng": {"torch": ByteTensor}, "train_config": {...},
     "metrics": {...}}

Model weights (``.safetensors`` exports, and models rebuilt from either file) are
read and written beside the model, in :mod:`vqkit.models.io`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
]

FORMAT = "vqkit-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or does not fit the model."""


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a
    partial file, and a crash leaves the previous version intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # mkstemp creates 0600; give the file the mode an ordinary open() would (umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write a training checkpoint atomically."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a training checkpoint; raise :class:`CheckpointError` with the path on
    any problem (missing, truncated, not a vqkit checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt or truncated ({e})"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vqkit checkpoint (no '{FORMAT}' marker)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {ckpt.get('version')} is not supported (want {VERSION})"
        )
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return ckpt
