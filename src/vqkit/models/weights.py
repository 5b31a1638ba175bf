"""Model weights as safetensors, for any vqkit model with a ``config`` (``to_dict()``):
the one writer and reader behind :func:`vqkit.models.io.export_safetensors` /
:func:`~vqkit.models.io.load_model` and ``save_pretrained`` / ``from_pretrained``.

A file holds the model's state dict; its metadata holds ``format``, the model config as
JSON (``model_config``), a module's extra state as JSON (``extra_state``, e.g. FSQ's
levels) and ``aliases``: names of tied tensors (a prior's output head shares the token
embedding) stored once, under the first name, and restored on load. Loading is strict:
a missing or unexpected key, or a tensor of another shape, is a one-line
:class:`~vqkit.storage.checkpoint.CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..storage.checkpoint import (
    FORMAT,
    CheckpointError,
    check_finite_state,
    save_file_atomically,
)

__all__ = ["export_safetensors", "load_state_strict", "read_safetensors"]


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(tensors stored once, extra states, aliases {name: stored name})."""
    state, extra, aliases = {}, {}, {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):  # a module's extra state: JSON in the metadata
            extra[k] = v
            continue
        ident = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and ident in seen:  # the same tensor under a second name (tied)
            aliases[k] = seen[ident]
            continue
        seen[ident] = k
        state[k] = v.detach().contiguous().cpu()
    return state, extra, aliases


def export_safetensors(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's weights and buffers as safetensors, config and extra state in
    the metadata, tied tensors once; atomic, with the usual file mode (umask), a full
    disk a CheckpointError."""
    from safetensors.torch import save_file

    state, extra, aliases = _split_state(model)
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict())}
    if extra:
        meta["extra_state"] = json.dumps(extra)
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    save_file_atomically(path, lambda tmp: save_file(state, tmp, metadata=meta), "weights")


def read_safetensors(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, full state dict: tensors, aliases and extra state) of a file
    written by :func:`export_safetensors`; CheckpointError on a missing, damaged or
    foreign file, or (``check_finite``) a NaN/Inf tensor."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            state: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated ({e})") from e
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{path} has no vqkit model config in its metadata")
    if check_finite:
        check_finite_state(state, path)
    try:
        config = json.loads(meta["model_config"])
        extra = json.loads(meta.get("extra_state", "{}"))
        aliases = json.loads(meta.get("aliases", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from e
    for name, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{path}: tied tensor {name!r} names missing {target!r}")
        state[name] = state[target]
    return config, {**state, **extra}


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(model: nn.Module, state: Mapping[str, Any], where: Any) -> None:
    """``model.load_state_dict(state)`` that refuses, in one line naming them, missing
    keys (a buffer left freshly initialised would be a silent wrong model), unexpected
    keys and tensors of another shape."""
    own = model.state_dict()
    bad = f"{where}: weights do not match the model config:"
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{bad} missing {_names(missing)}")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{bad} unexpected {_names(unexpected)}")
    shapes = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise CheckpointError(f"{bad} other shapes: {_names(shapes, 3)}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:  # ValueError: an extra state that disagrees
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{bad} {msg}") from e
