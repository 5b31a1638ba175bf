"""Checkpoints: atomic writes, safe loading, clear errors.

A training checkpoint (``.pt``) is a ``torch.save`` dict of tensors and plain
Python values only, read back with ``weights_only=True`` (no pickled code):

    {"format": "vqkit-checkpoint", "version": 1, "model_config": {...},
     "model": state_dict, "optimizer": state_dict, "step": int,
     "loader": {...}, "rng": {"torch": ByteTensor}, "train_config": {...},
     "metrics": {...}}

Model weights (``.safetensors`` exports) and other networks' weights files are read
and written by :mod:`.weights`; :mod:`vqkit.models.io` rebuilds a model from either file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .fileio import DiskFullError, atomic_write

__all__ = [
    "CheckpointError",
    "atomic_write",
    "check_finite_state",
    "nonfinite_tensors",
    "save_file_atomically",
    "save_checkpoint",
    "load_checkpoint",
]

FORMAT = "vqkit-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, truncated, or does not fit the model."""


def save_file_atomically(path: str | os.PathLike[str], write: Any, what: str) -> None:
    """atomic_write, with a full disk as a CheckpointError (one line, which the CLI prints):
    the previous file is kept and the temp file removed."""
    try:
        atomic_write(path, write)
    except DiskFullError as e:
        raise CheckpointError(f"cannot save {what}: {e}") from e


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write a training checkpoint atomically. A full disk is a CheckpointError naming
    ``path``; the previous checkpoint at ``path`` is then unchanged."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    save_file_atomically(path, lambda tmp: torch.save(payload, tmp), "checkpoint")


def _float_tensors(obj: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every floating/complex tensor in nested dicts/lists."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)] if obj.is_floating_point() or obj.is_complex() else []
    items: Any = ()
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    out = []
    for k, v in items:
        out += _float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Dotted names of the tensors of ``state`` (a state dict, possibly nested like an
    optimizer's) that hold NaN or Inf. One host sync per device."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for n, t in _float_tensors(state, ""):
        if t.numel() > 0:
            by_device.setdefault(t.device, []).append((n, t))
    bad = []
    for tensors in by_device.values():
        ok = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
        bad += [n for (n, _), good in zip(tensors, ok, strict=True) if not good]
    return bad


def check_finite_state(state: Mapping[str, Any], where: str | os.PathLike[str]) -> None:
    """Raise CheckpointError naming every tensor of ``state`` that holds NaN or Inf
    (:func:`nonfinite_tensors`)."""
    bad = nonfinite_tensors(state)
    if not bad:
        return
    listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise CheckpointError(
        f"{where}: non-finite values (NaN or Inf) in {listed}; the run had diverged when "
        "this was saved, so use an earlier checkpoint"
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> dict[str, Any]:
    """Read a training checkpoint; raise :class:`CheckpointError` with the path on
    any problem (missing, truncated, not a vqkit checkpoint, and with ``check_finite``
    a NaN/Inf in a model or optimizer tensor, named in the message)."""
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
    if check_finite:
        check_finite_state(ckpt["model"], path)
        if isinstance(ckpt.get("optimizer"), Mapping):
            check_finite_state({"optimizer": ckpt["optimizer"]}, path)
    return ckpt
