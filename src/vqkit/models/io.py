"""Model I/O: a :class:`VQVAE` from a training checkpoint or a safetensors export.

Exported weights (``.safetensors``) hold the model's state dict, with the model
config as JSON in the file's metadata; they load without torch's unpickler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..storage.checkpoint import (
    FORMAT,
    CheckpointError,
    check_finite_state,
    load_checkpoint,
    save_file_atomically,
)
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["export_safetensors", "load_model"]


def export_safetensors(model: VQVAE, path: str | os.PathLike[str]) -> None:
    """Write the model's weights and buffers as safetensors, config in metadata; atomic,
    with the usual file mode (umask), a full disk a CheckpointError."""
    from safetensors.torch import save_file

    state, extra = {}, {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            state[k] = v.detach().contiguous().cpu()
        else:  # a module's extra state (e.g. FSQ's levels): JSON in the metadata
            extra[k] = v
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict())}
    if extra:
        meta["extra_state"] = json.dumps(extra)
    save_file_atomically(path, lambda tmp: save_file(state, tmp, metadata=meta), "weights")


def _build(config: dict[str, Any], state: dict[str, Any], where: Path) -> VQVAE:
    try:
        model = VQVAE(VQVAEConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config in checkpoint: {e}") from e
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:  # ValueError: an extra state that disagrees
        raise CheckpointError(f"{where}: weights do not match the model config: {e}") from e
    return model


def load_model(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> VQVAE:
    """A :class:`~vqkit.models.VQVAE` from a ``.pt`` checkpoint or ``.safetensors`` export;
    CheckpointError on a damaged file or (``check_finite``) a NaN/Inf weight."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weights file not found: {path}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: corrupt or truncated ({e})") from e
        if meta.get("format") != FORMAT or "model_config" not in meta:
            raise CheckpointError(f"{path} has no vqkit model config in its metadata")
        if check_finite:
            check_finite_state(state, path)
        try:
            extra = json.loads(meta.get("extra_state", "{}"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: unreadable extra state in its metadata ({e})") from e
        return _build(json.loads(meta["model_config"]), {**state, **extra}, path)
    ckpt = load_checkpoint(path, map_location, check_finite=check_finite)
    return _build(ckpt["model_config"], ckpt["model"], path)
