"""Model I/O: a :class:`VQVAE` from a training checkpoint or a safetensors export
(:func:`load_model`); :func:`load_tokenizer_model` also reads a speech codec's
(:class:`~vqkit.models.AudioCodec`: a ``vqkit train`` audio run's checkpoint, or its
``codec/model.safetensors``), told apart by the config the file stores.

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
from .audio_codec import AudioCodec
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["export_safetensors", "is_audio_config", "load_model", "load_tokenizer_model"]


def is_audio_config(config: dict[str, Any]) -> bool:
    """Whether a stored model config is a speech codec's (:class:`AudioCodecConfig`:
    SEANet strides and a sample rate; a VQ-VAE's has neither)."""
    return isinstance(config, dict) and "strides" in config and "sample_rate" in config


def _build(config: dict[str, Any], state: dict[str, Any], where: Path, audio: bool = False) -> Any:
    try:
        if audio and is_audio_config(config):
            model: Any = AudioCodec(AudioCodec.config_class.from_dict(config))
        else:
            model = VQVAE(VQVAEConfig.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config in checkpoint: {e}") from e
    load_state_strict(model, state, where)
    return model


def _load(path: str | os.PathLike[str], map_location: Any, check_finite: bool, audio: bool) -> Any:
    path = Path(path)
    if path.suffix == ".safetensors":
        config, state = read_safetensors(path, map_location, check_finite=check_finite)
        model = _build(config, state, path, audio)
        model.pretrained_info = read_info(path)
        return model
    ckpt = load_checkpoint(path, map_location, check_finite=check_finite)
    return _build(ckpt["model_config"], ckpt["model"], path, audio)


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
    return _load(path, map_location, check_finite, audio=False)


def load_tokenizer_model(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> VQVAE | AudioCodec:
    """As :func:`load_model`, or an :class:`AudioCodec` when the file stores a speech
    codec's config (:func:`is_audio_config`): what a prior's tokenizer may be."""
    return _load(path, map_location, check_finite, audio=True)
