"""The configuration of ``vqkit train``: its own options, declared once here, composed
with the model's (:mod:`vqkit.models.vqvae`) and every quantizer's (declared in each
quantizer module) into one flat :class:`TrainConfig`; and the named presets.

Precedence, lowest first: the declared defaults, a ``preset``, a config file, the
command-line flags (a preset named on the command line applies over the file).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .models.vqvae import QUANTIZER_GROUPS, ModelOptions, QuantizerChoice, VQVAEConfig
from .options import Options, compose, nonneg_int, option, option_fields, positive, positive_int

__all__ = ["PRESETS", "TrainConfig", "TrainOptions", "resolve_device"]


def _preset_check(name: str | None) -> str | None:
    return None if name is None or name in PRESETS else f"one of {sorted(PRESETS)}"


@dataclass
class TrainOptions(Options):
    """Options of the training job (data, optimisation, codebook health, bookkeeping)."""

    data: str = option(
        None,
        "dataset: 'builtin', a CIFAR-10 python archive/folder, an idx directory, an image "
        "folder or .tar(.gz) of one, or 'cifar10' / 'fashion-mnist'",
        type=str,
    )
    data_format: str = option(
        "auto", "dataset format", choices=("auto", "builtin", "cifar10", "idx", "imagefolder")
    )
    image_size: int = option(
        None, "resize images to this size (default: native)", type=int, check=positive_int
    )
    channels: int = option(
        None, "image channels (default: the data's)", type=int, check=positive_int
    )
    cache_dir: str = option(None, "decoded-dataset cache (default $VQKIT_CACHE)", type=str)
    eval_split: str = option("test", "split used for evaluation (falls back to 5% of train)")
    batch_size: int = option(
        32,
        "images per step and per process (global batch: x number of processes)",
        check=positive_int,
    )
    steps: int = option(1500, "training steps", check=nonneg_int)
    lr: float = option(3e-4, "Adam learning rate", check=positive)
    seed: int = option(0, "random seed (model init, data order, codebook init)")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    codebook_lr_scale: float = option(
        1.0, "learning rate of the codebook parameters = --lr x this", check=positive
    )
    init: str = option(
        "random",
        "codebook init: random (the quantizer's own) or kmeans (k-means++ and --init-iters "
        "Lloyd iterations on the latents of --init-batches batches, all processes)",
        choices=("random", "kmeans"),
    )
    init_iters: int = option(10, "Lloyd iterations of the k-means init", check=nonneg_int)
    init_batches: int = option(
        0,
        "batches per process for --init kmeans; 0: enough for 16 vectors per code",
        check=nonneg_int,
    )
    revive_every: int = option(
        0,
        "every N steps replace dead codes by latents of the current batch (and restart "
        "their optimizer state); 0: never",
        check=nonneg_int,
    )
    dead_threshold: float = option(
        1.0,
        "a code is dead when its EMA count is below this many assignments per global "
        "batch (revival and the logged 'dead' count)",
        check=positive,
    )
    out_dir: str = option("runs/vqkit", "run directory")
    log_every: int = option(50, "log training metrics every N steps", check=positive_int)
    eval_every: int = option(
        500, "evaluate on --eval-images and write checkpoints every N steps", check=positive_int
    )
    eval_images: int = option(1000, "images of the periodic evaluation", check=positive_int)
    progress: bool = option(True, "show a progress bar")
    preset: str = option(
        None,
        "named option set; applies over --config, other flags override it",
        type=str,
        check=_preset_check,
    )


# Named option sets (``--preset``), chosen from the CIFAR-10 runs in docs/results.md.
# dead_threshold is in assignments per global batch: 0.25 is 1/16 of a uniform code's
# share at K = 512 and 32 images of 8 x 8 latents (2048 vectors per batch).
PRESETS: dict[str, dict[str, Any]] = {
    # the gradient-trained codebook that uses its whole codebook: k-means init on the
    # first latents, dead-code revival every 20 steps (often enough to catch the
    # encoder's early growth, when the classic layer collapses) and a 10x codebook
    # learning rate so the codes keep up with the encoder (best of the measured options)
    "vq-healthy": {
        "quantizer": "vq",
        "init": "kmeans",
        "revive_every": 20,
        "dead_threshold": 0.25,
        "codebook_lr_scale": 10.0,
    },
    # the EMA codebook with the same init and revival
    "ema-healthy": {
        "quantizer": "ema",
        "init": "kmeans",
        "revive_every": 20,
        "dead_threshold": 0.25,
    },
}

_TrainConfigBase = compose(
    "TrainConfig", (TrainOptions, ModelOptions, *QUANTIZER_GROUPS), bases=(QuantizerChoice,)
)


class TrainConfig(_TrainConfigBase, Options):  # type: ignore[misc, valid-type]
    """All options of ``vqkit train``, flat: :class:`TrainOptions`, the model's
    :class:`~vqkit.models.vqvae.ModelOptions` and every quantizer kind's options.
    Every value is checked on construction, before any data is read."""

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """Options from a JSON file, then ``overrides`` on top. A ``preset`` among the
        ``overrides`` (named on the command line) applies over the file's values (and under
        the other overrides); a ``preset`` in the file applies under the file's values."""
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        known = {f.name for f in option_fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"config file {path}: unknown keys {sorted(unknown)}")
        preset = overrides.get("preset")
        if preset is not None:
            if _preset_check(preset):
                raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
            return cls(**{**values, **PRESETS[preset], **overrides})
        return cls.build(**{**values, **overrides})

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """A config from ``values`` on top of the named ``preset`` among them (if any),
        on top of the defaults: explicit values always win over the preset's."""
        name = values.get("preset")
        if _preset_check(name):
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(**{**(PRESETS[name] if name else {}), **values})

    def replace(self, **changes: Any) -> TrainConfig:
        return type(self)(**{**asdict(self), **changes})

    def model_config(self, in_channels: int, image_size: int) -> VQVAEConfig:
        names = {f.name for f in option_fields(VQVAEConfig)} - {"in_channels", "image_size"}
        return VQVAEConfig(
            in_channels=in_channels,
            image_size=image_size,
            **{k: getattr(self, k) for k in names},
        )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    return dev
