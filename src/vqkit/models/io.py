"""Model I/O: a :class:`VQVAE` from a training checkpoint or a safetensors export.

Exported weights (``.safetensors``, written by :mod:`vqkit.storage.weights`) hold the
model's state dict, with the model config as JSON in the file's metadata; they load
without torch's unpickler. ``VQVAE.save_pretrained`` / ``from_pretrained``
(:mod:`vqkit.models.hub`) use the same file inside a directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..storage.checkpoint import CheckpointError, load_checkpoint
from ..storage.weights import (
    export_safetensors,
    load_state_strict,
    read_info,
    read_safetensors,
)
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["export_safetensors", "load_model"]


def _build(config: dict[str, Any], state: dict[str, Any], where: Path) -> VQVAE:
    try:
        model = VQVAE(VQVAEConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config in checkpoint: {e}") from e
    load_state_strict(model, state, where)
    return model


def load_model(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> VQVAE:
    """A :class:`~vqkit.models.VQVAE` from a ``.pt`` checkpoint or ``.safetensors`` export;
    CheckpointError on a damaged file, a missing or unexpected weight, or
    (``check_finite``) a NaN/Inf weight. An export's ``info`` (its record of the training
    data, :mod:`vqkit.data.reference`) becomes the model's ``pretrained_info``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        config, state = read_safetensors(path, map_location, check_finite=check_finite)
        model = _build(config, state, path)
        model.pretrained_info = read_info(path)
        return model
    ckpt = load_checkpoint(path, map_location, check_finite=check_finite)
    return _build(ckpt["model_config"], ckpt["model"], path)
