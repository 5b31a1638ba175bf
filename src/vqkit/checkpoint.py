"""Checkpoints: atomic writes, safe loading, clear errors.

A training checkpoint (``.pt``) is a ``torch.save`` dict of tensors and plain
Python values only, read back with ``weights_only=True`` (no pickled code):

    {"format": "vqkit-checkpoint", "version": 1, "model_config": {...},
     "model": state_dict, "optimizer": state_dict, "step": int,
     "loader": {...}, "rng": {"torch": ByteTensor}, "train_config": {...},
     "metrics": {...}}

Exported weights (``.safetensors``) hold the model's state dict, with the model
config as JSON in the file's metadata; they load without torch's unpickler.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .models import VQVAE

__all__ = [
    "CheckpointError",
    "atomic_write",
    "save_checkpoint",
    "load_checkpoint",
    "export_safetensors",
    "load_model",
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


def export_safetensors(model: VQVAE, path: str | os.PathLike[str]) -> None:
    """Write the model's weights and buffers as safetensors, config in metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict())}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def _build(config: dict[str, Any], state: dict[str, torch.Tensor], where: Path) -> VQVAE:
    from .models import VQVAE, VQVAEConfig

    try:
        model = VQVAE(VQVAEConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config in checkpoint: {e}") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: weights do not match the model config: {e}") from e
    return model


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> VQVAE:
    """A :class:`~vqkit.models.VQVAE` from a ``.pt`` checkpoint or ``.safetensors`` export."""
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
        return _build(json.loads(meta["model_config"]), state, path)
    ckpt = load_checkpoint(path, map_location)
    return _build(ckpt["model_config"], ckpt["model"], path)
