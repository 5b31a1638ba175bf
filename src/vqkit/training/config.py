"""The configuration of ``vqkit train``: its own options, declared once here, composed
with the loss terms' (:mod:`vqkit.losses.objective`), the discriminator's optimizer's
(:mod:`.adversarial_step`), the model's (:mod:`vqkit.models.vqvae`) and every quantizer's
(declared in each quantizer module) into one flat :class:`TrainConfig`; and the named
presets.

Precedence, lowest first: the declared defaults, a ``preset``, a config file, the
command-line flags (a preset named on the command line applies over the file).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..data.transforms import CROPS
from ..distributed import resolve_device
from ..errors import UserError
from ..losses import LossOptions
from ..losses.adversarial import check_discriminator_fits
from ..models.vqvae import (
    QUANTIZER_GROUPS,
    ModelOptions,
    QuantizerChoice,
    VQVAEConfig,
    check_size_fits,
    upgrade_options,
)
from ..options import (
    Options,
    compose,
    nonneg_int,
    option,
    option_fields,
    positive,
    positive_int,
    unit_interval_excl_zero,
)
from ..runtime.options import JobOptions, check_resume_steps, resume_changes
from ..storage.fileio import loads_json
from .adversarial_step import DiscriminatorOptimOptions
from .health import HealthOptions
from .step import StepOptions

__all__ = [
    "MODALITIES",
    "PRESETS",
    "TrainConfig",
    "TrainJobOptions",
    "TrainOptions",
    "resolve_device",
]


def _preset_check(name: str | None) -> str | None:
    return None if name is None or name in PRESETS else f"one of {sorted(PRESETS)}"


MODALITIES = ("auto", "image", "audio")


@dataclass
class TrainJobOptions(JobOptions):
    """The options both jobs of ``vqkit train`` have, the image tokenizer's
    (:class:`TrainOptions`) and the speech codec's
    (:class:`vqkit.training.audio_config.AudioTrainOptions`): the data, which of the two
    it is, and the run directory."""

    data: str = option(
        None,
        "dataset: 'builtin', a CIFAR-10 python archive/folder, an idx directory, an image "
        "folder or .tar(.gz) of one, 'cifar10' / 'fashion-mnist', or shards (a directory "
        "written by 'vqkit pack', or a brace pattern): streamed, never held in memory; "
        "audio: a folder or .tar(.gz) of WAV files, or the FSDD archive",
        type=str,
        on_resume="fixed",
    )
    modality: str = option(
        "auto",
        "what --data holds: image or audio (WAV files: the speech codec is trained); auto "
        "tells them apart by the files (both kinds in one source are refused)",
        choices=MODALITIES,
        on_resume="fixed",
    )
    out_dir: str = option("runs/vqkit", "run directory")


@dataclass
class TrainOptions(TrainJobOptions):
    """Options of the training job (data, optimisation, codebook health, bookkeeping);
    the options every job has (steps, batch, learning rate, seed, ...) are inherited from
    their one declaration, :class:`vqkit.runtime.options.JobOptions`.

    ``on_resume="fixed"`` marks the options a resumed run cannot change (they shaped the
    state in the checkpoint); the others are applied and reported when changed."""

    data_format: str = option(
        "auto",
        "dataset format",
        choices=("auto", "builtin", "cifar10", "idx", "imagefolder", "shards"),
        on_resume="fixed",
    )
    image_size: int = option(
        None,
        "resize images to this size (default: native)",
        type=int,
        check=positive_int,
        on_resume="fixed",
    )
    channels: int = option(
        None,
        "image channels, 1 or 3 (default: 3 unless every image is grayscale; conversions "
        "are counted and reported)",
        type=int,
        choices=(1, 3),
        on_resume="fixed",
    )
    crop: str = option(
        "center",
        "shards: how --image-size is reached: centre crop of the resized image, or a random "
        "square (seeded per sample and epoch) resized to it",
        choices=CROPS,
        on_resume="fixed",
    )
    crop_scale: float = option(
        1.0,
        "shards, --crop random: the square's side is U(this, 1) x the shorter side",
        check=unit_interval_excl_zero,
        on_resume="fixed",
    )
    num_workers: int = option(
        2,
        "shards: worker processes that read and decode (0: the training process); one "
        "stream of shards per worker, so it fixes the order of the batches",
        check=nonneg_int,
        on_resume="fixed",
    )
    prefetch: bool = option(
        False,
        "draw the next batch in a background thread during the step (same batches); off "
        "by default: it measured within noise of the plain loader here",
    )
    cache_dir: str = option(None, "decoded-dataset cache (default $VQKIT_CACHE)", type=str)
    eval_split: str = option(
        "test",
        "split used for evaluation; 'holdout' is the last 5% of train (also used when the "
        "data has no test split and the default is kept)",
        on_resume="fixed",
    )
    codebook_lr_scale: float = option(
        1.0,
        "learning rate of the codebook parameters = --lr x this",
        check=positive,
        on_resume="fixed",  # 1 vs other values: a different optimizer-state layout
    )
    eval_images: int = option(1000, "images of the periodic evaluation", check=positive_int)
    preset: str = option(
        None,
        "named option set; applies over --config, other flags override it",
        type=str,
        check=_preset_check,
    )
    eval_ssim: bool = option(
        True,
        "the periodic and final evaluations also report SSIM (both conventions: "
        "pytorch-msssim's Gaussian window and scikit-image's, the papers') and MS-SSIM",
    )
    eval_features: str = option(
        "",
        "a vqkit features network (vqkit features --out DIR): the periodic and final "
        "evaluations also report FD and KID in its space (not comparable with papers' rFID)",
    )


# Named option sets (``--preset``), chosen from the CIFAR-10 runs in docs/results.md.
# Their dead threshold is the default 1/16 of a uniform code's share (--dead-fraction):
# 0.25 assignments per batch at K = 512 and 32 images of 8 x 8 latents, as measured.
PRESETS: dict[str, dict[str, Any]] = {
    # the gradient-trained codebook that uses its whole codebook: k-means init on the
    # first latents, dead-code revival every 20 steps (often enough to catch the
    # encoder's early growth, when the classic layer collapses) and a 10x codebook
    # learning rate so the codes keep up with the encoder (best of the measured options)
    "vq-healthy": {
        "quantizer": "vq",
        "init": "kmeans",
        "revive_every": 20,
        "codebook_lr_scale": 10.0,
    },
    # the EMA codebook with the same init and revival (today's defaults, made explicit)
    "ema-healthy": {"quantizer": "ema", "init": "kmeans", "revive_every": 20},
    # the classic layers as published: the quantizer's own init, no revival
    "classic": {"init": "random", "revive_every": 0},
    # taming-transformers' VQGAN recipe, sized for a CPU: the VQGAN-class network (64
    # channels, one ResNet block per level, factor 4: 8 x 8 codes of a CIFAR image), L1
    # reconstruction, a hinge PatchGAN (2 stride-2 layers of 32 channels: 32 px images
    # give it 3 x 3 logits; taming: 3 layers of 64 at 256 px) weighted 0.8 by the adaptive
    # weight, Adam betas (0.5, 0.9), switched on at step 500 of the default 1500 (taming:
    # after the reconstruction has converged). Add the perceptual term with
    # --perceptual-weight 1 --perceptual-weights vgg16-397923af.pth (the user's file).
    "vqgan": {
        "arch": "vqgan",
        "hidden": 64,
        "res_layers": 1,
        "rec_loss": "l1",
        "disc_weight": 0.8,
        "disc_start": 500,
        "disc_loss": "hinge",
        "disc_layers": 2,
        "disc_channels": 32,
        "disc_beta1": 0.5,
        "disc_beta2": 0.9,
    },
}

_TrainConfigBase = compose(
    "TrainConfig",
    (
        TrainOptions,
        HealthOptions,
        StepOptions,
        LossOptions,
        DiscriminatorOptimOptions,
        ModelOptions,
        *QUANTIZER_GROUPS,
    ),
    bases=(QuantizerChoice,),
)


class TrainConfig(_TrainConfigBase, Options):  # type: ignore[misc, valid-type]
    """All options of ``vqkit train``, flat: :class:`TrainOptions`, the codebook health's
    :class:`~vqkit.training.health.HealthOptions`, the loss terms'
    :class:`~vqkit.losses.LossOptions`, the discriminator's optimizer's, the model's
    :class:`~vqkit.models.vqvae.ModelOptions` and every quantizer kind's options.
    Every value is checked on construction, before any data is read."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.modality == "audio":
            raise UserError(
                "modality 'audio' trains the speech codec (vqkit.training.audio_trainer."
                "AudioTrainer), not this image tokenizer"
            )
        # sizes whose tensors cannot fit are refused before the data is resized to them
        size = self.image_size or 32  # the data's size is not known yet: a lower bound
        sizes = {"res_layers": self.res_layers, "embedding_dim": self.embedding_dim}
        if self.arch != "vqgan":
            sizes["res_hidden"] = self.res_hidden
        check_size_fits(
            size, 3, self.hidden, self.channel_mult, self.downsample, self.arch, **sizes
        )
        if self.disc_weight > 0:  # the discriminator is built
            check_discriminator_fits(self.disc_channels, self.disc_layers, 1, size)
        _ = self.loss  # the loss terms' own checks (a perceptual weight needs its file)

    # the typed option groups the step, the objective and the discriminator take: made
    # once from the flat config (their fields are this config's)
    @cached_property
    def loss(self) -> LossOptions:
        """The loss terms' options (:class:`~vqkit.losses.LossOptions`)."""
        return self.group(LossOptions)

    @cached_property
    def step_options(self) -> StepOptions:
        """How the step runs (:class:`~vqkit.training.step.StepOptions`)."""
        return self.group(StepOptions)

    @cached_property
    def disc_optim(self) -> DiscriminatorOptimOptions:
        """The discriminator's optimizer options."""
        return self.group(DiscriminatorOptimOptions)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """Options from a JSON file, then ``overrides`` on top. A ``preset`` among the
        ``overrides`` (named on the command line) applies over the file's values (and under
        the other overrides); a ``preset`` in the file applies under the file's values."""
        values = read_config_file(path, cls)
        preset = overrides.get("preset")
        if preset is not None:
            if _preset_check(preset):
                raise UserError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}")
            return cls(**{**values, **PRESETS[preset], **overrides})
        return cls.build(**{**values, **overrides})

    @classmethod
    def build(cls, **values: Any) -> TrainConfig:
        """A config from ``values`` on top of the named ``preset`` among them (if any),
        on top of the defaults: explicit values always win over the preset's."""
        name = values.get("preset")
        if _preset_check(name):
            raise UserError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(**{**(PRESETS[name] if name else {}), **values})

    def replace(self, **changes: Any) -> TrainConfig:
        return type(self)(**{**asdict(self), **changes})

    @classmethod
    def for_resume(cls, stored: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
        """The config of a resumed run: the run's own (``stored``, from its checkpoint)
        with the options ``given`` on top (only those that differ need be given). Stored
        keys unknown today are dropped; a preset only fills what was not stored."""
        known = {f.name for f in option_fields(cls)}
        stored = upgrade_options(stored, stored=True)
        base = {k: v for k, v in stored.items() if k in known}
        return cls(**{**base, **given})

    @staticmethod
    def check_resume_request(given: dict[str, Any], step: int, where: str = "the run") -> None:
        """Refuse what a resume cannot do, before anything is loaded or written: ``steps``
        below the checkpoint's ``step`` (nothing would be trained, yet the smaller number
        would be recorded) and a ``preset`` (a resumed run keeps its own options; a preset
        would be recorded in config.json but not applied)."""
        if "preset" in given:
            raise UserError(
                f"--preset {given['preset']} with --resume: a resumed run keeps its own "
                "options; drop --preset and give the options to change as flags"
            )
        check_resume_steps(given.get("steps"), step, where)

    def resume_changes(
        self, stored: dict[str, Any], stored_world: int = 1, world: int = 1
    ) -> dict[str, tuple[Any, Any]]:
        """``{name: (old, new)}`` of the training options that differ from the run's
        ``stored`` ones. A changed option that shaped the checkpoint's state
        (``on_resume="fixed"``, and every model or quantizer option) is a ValueError.
        The batch size is compared per global batch (``batch_size`` x processes), so a
        run resumes under another world size."""
        return resume_changes(
            self,
            upgrade_options(stored, stored=True),  # today's names, this kind's options
            stored_world=stored_world,
            world=world,
            fixed_groups=(ModelOptions, *QUANTIZER_GROUPS),
            ignore=("out_dir", "preset"),
        )

    def with_health_defaults(
        self, supports_init: bool, supports_revival: bool, vectors_per_batch: int, codes: int
    ) -> TrainConfig:
        """This config with :meth:`~vqkit.training.health.HealthOptions.health_defaults`
        applied (the open health defaults resolved for the quantizer and the batch)."""
        health = self.group(HealthOptions)
        return self.replace(
            **health.health_defaults(supports_init, supports_revival, vectors_per_batch, codes)
        )

    def model_config(self, in_channels: int, image_size: int) -> VQVAEConfig:
        names = {f.name for f in option_fields(VQVAEConfig)} - {"in_channels", "image_size"}
        return VQVAEConfig(
            in_channels=in_channels,
            image_size=image_size,
            **{k: getattr(self, k) for k in names},
        )


def read_config_values(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object of a ``--config`` file, with the option names an older vqkit wrote
    upgraded; one line when it is missing, unreadable, not JSON or not an object."""
    try:
        values = loads_json(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except OSError as e:  # a folder, no permission, ...: the reason, not "[Errno 21]"
        reason = (e.strerror or str(e)).lower()
        raise UserError(f"--config {path}: {reason}; give a JSON file of options") from e
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not text (JSON): {e}") from e
    except ValueError as e:
        raise UserError(f"config file {path} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a JSON object")
    return upgrade_options(values)  # names an older vqkit wrote (e.g. config.json)


def read_config_file(path: str | os.PathLike[str], config_class: Any) -> dict[str, Any]:
    """:func:`read_config_values`, every key one of ``config_class``'s options (either
    job's flat config: the one reader of both jobs' ``--config`` files)."""
    values = read_config_values(path)
    unknown = set(values) - {f.name for f in option_fields(config_class)}
    if unknown:
        raise UserError(f"config file {path}: unknown keys {sorted(unknown)}")
    return values
