"""Model I/O: a :class:`VQVAE` or an :class:`AudioCodec` from a training checkpoint, a
safetensors export or a pretrained directory.

Exported weights (``.safetensors``, written by :mod:`vqkit.storage.weights`) hold the
model's state dict, with the model config as JSON in the file's metadata; they load
without torch's unpickler. ``VQVAE.save_pretrained`` / ``from_pretrained``
(:mod:`vqkit.models.hub`) use the same file inside a directory. Which model a file holds
is read from its stored config (a codec's has a ``sample_rate``; :func:`is_codec_config`),
a directory's from its ``config.json`` (``"vqkit": "audio-codec"`` or ``"tokenizer"``):
:func:`load_any` loads either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..storage.checkpoint import CheckpointError, load_checkpoint
from ..storage.fileio import loads_json
from ..storage.weights import (
    export_safetensors,
    load_state_strict,
    read_info,
    read_safetensors,
)
from .audio_codec import AudioCodec, AudioCodecConfig
from .hub import CONFIG_NAME
from .vqvae import VQVAE, VQVAEConfig

__all__ = ["export_safetensors", "is_codec_config", "load_any", "load_model"]


def is_codec_config(config: Mapping[str, Any]) -> bool:
    """Whether a stored model config is an audio codec's (:class:`AudioCodecConfig`, the
    only one with a ``sample_rate``) rather than an image tokenizer's."""
    return "sample_rate" in config


def _build(config: dict[str, Any], state: dict[str, Any], where: Path) -> Any:
    cls, cfg = (AudioCodec, AudioCodecConfig) if is_codec_config(config) else (VQVAE, VQVAEConfig)
    try:
        model = cls(cfg.from_dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid model config in checkpoint: {e}") from e
    load_state_strict(model, state, where)
    return model


def _load_file(path: Path, map_location: str | torch.device, check_finite: bool) -> Any:
    if path.suffix == ".safetensors":
        config, state = read_safetensors(path, map_location, check_finite=check_finite)
        model = _build(config, state, path)
        model.pretrained_info = read_info(path)
        return model
    ckpt = load_checkpoint(path, map_location, check_finite=check_finite)
    return _build(ckpt["model_config"], ckpt["model"], path)


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
    model = _load_file(Path(path), map_location, check_finite)
    if not isinstance(model, VQVAE):
        raise CheckpointError(f"{path} holds an audio codec, not an image tokenizer")
    return model


def load_any(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> VQVAE | AudioCodec:
    """The image tokenizer or audio codec of a ``.pt`` checkpoint, a ``.safetensors``
    export or a pretrained directory (``save_pretrained``; loaded strictly, with its
    ``pretrained_info``); CheckpointError (one line) otherwise."""
    path = Path(path)
    if not path.is_dir():
        return _load_file(path, map_location, check_finite)
    try:
        kind = loads_json((path / CONFIG_NAME).read_text(encoding="utf-8")).get("vqkit")
    except (OSError, ValueError, AttributeError):
        kind = None  # from_pretrained says what is wrong with the directory
    cls = AudioCodec if kind == AudioCodec.pretrained_kind else VQVAE
    return cls.from_pretrained(path, map_location=map_location)
