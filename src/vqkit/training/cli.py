"""``vqkit train``: its flags and what runs. One command for both training jobs: the
image tokenizer (:mod:`.tokenizer`) and the speech codec (:mod:`.audio_trainer`), told
apart by ``--modality`` or by what ``--data`` holds (a resumed run: by its checkpoint's
kind). Each flag is an option declared once in its module; a flag of the other job is
refused in one line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["add_train_arguments", "run_train"]


def add_train_arguments(sub: argparse._SubParsersAction) -> None:
    from ..losses import LossOptions
    from ..models.vqvae import RENAMED_OPTIONS, ModelOptions, QuantizerFlags
    from ..options import add_arguments, compose
    from .adversarial_step import DiscriminatorOptimOptions
    from .config import PRESETS, TrainConfig, TrainOptions
    from .health import HealthOptions
    from .step import StepOptions

    p = sub.add_parser(
        "train",
        help="train a VQ-VAE (default: the built-in dataset), or on WAV data the speech codec",
        description="Train a VQ-VAE on images, or the speech codec (SEANet + residual VQ) on "
        "WAV data (--modality, or told apart by the files). Every option below is declared "
        "once (vqkit.training.config, vqkit.runtime.options, vqkit.training.step, "
        "vqkit.losses.objective, vqkit.training.adversarial_step, vqkit.models.vqvae, "
        "vqkit.training.audio_trainer, vqkit.models.audio_codec, vqkit.losses.spectral, "
        "vqkit.losses.audio_adversarial, and "
        "each quantizer module; the codec's defaults differ where its module says so); "
        "presets (images): " + ", ".join(PRESETS),
    )
    p.add_argument("--config", help="JSON file of options; command-line flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start again in an existing --out")
    add_arguments(
        p.add_argument_group("training"),
        compose("TrainFlags", (TrainOptions, HealthOptions, StepOptions)),
        aliases={"out_dir": ["--out"]},
    )
    add_arguments(p.add_argument_group("model"), ModelOptions)
    add_arguments(
        p.add_argument_group("loss terms and the discriminator"),
        compose("LossFlags", (LossOptions, DiscriminatorOptimOptions)),
    )
    # every quantizer kind's options, each once (shared ones are one declaration); a
    # renamed option keeps its old flag as an alias
    old_flags: dict[str, list[str]] = {}
    for old, (_, new) in RENAMED_OPTIONS.items():
        old_flags.setdefault(new, []).append("--" + old.replace("_", "-"))
    add_arguments(
        p.add_argument_group("quantizer (options of the other kinds are errors)"),
        QuantizerFlags,
        aliases=old_flags,
    )
    add_arguments(p.add_argument_group("speech codec (audio --data)"), _audio_flags())
    p.set_defaults(_config_class=TrainConfig)


def _audio_flags() -> type:
    """The speech codec job's options that the image job has not: its own, the codec
    network's, the audio loss terms' and the discriminators' (each still declared once,
    in its module; ``disc_start`` and the discriminator's optimizer are both jobs')."""
    from ..losses.audio_adversarial import AudioAdversarialOptions
    from ..losses.spectral import AudioLossOptions
    from ..models.audio_codec import AudioModelOptions
    from ..options import compose, option_fields
    from .audio_trainer import AudioTrainOptions
    from .config import TrainConfig

    image = {f.name for f in option_fields(TrainConfig)}
    return compose(
        "AudioFlags",
        (AudioTrainOptions, AudioModelOptions, AudioLossOptions, AudioAdversarialOptions),
        exclude=image,
    )


def _train_modality(args: argparse.Namespace) -> str:
    """ "image" or "audio": a resumed run's own (its checkpoint's kind), else
    ``--modality``, or what ``--data`` holds (auto). One line when ``--modality image``
    names a source of WAV files, or a source holds both kinds."""
    from ..data import detect_modality
    from .audio_trainer import AudioTrainConfig, AudioTrainer
    from .config import read_config_values

    # a --config file's data / modality count as flags given under the command line's
    filed = read_config_values(args.config) if args.config and not args.resume else {}
    asked = args.modality or filed.get("modality") or "auto"
    data = args.data or filed.get("data")
    if args.resume:
        default = AudioTrainConfig.defaults() if asked == "audio" else None
        out = Path(args.out_dir or (default or {}).get("out_dir", "runs/vqkit"))
        from ..storage.checkpoint import load_checkpoint

        last = out / "checkpoints" / "last.pt"
        if last.is_file():
            return "audio" if load_checkpoint(last).get("kind") == AudioTrainer.kind else "image"
        return "audio" if asked == "audio" else "image"
    source = Path(data) if isinstance(data, str) and data else None
    found = detect_modality(source) if source is not None and source.exists() else "image"
    if asked == "image" and found == "audio":
        raise UserError(
            f"--modality image, but {data} holds WAV files (audio); drop --modality "
            "(or give --modality audio) to train the speech codec"
        )
    return found if asked == "auto" else asked


def run_train(args: argparse.Namespace) -> int:
    from ..options import option_fields
    from .audio_trainer import AudioTrainConfig
    from .tokenizer import TrainConfig

    modality = _train_modality(args)
    config_class = AudioTrainConfig if modality == "audio" else TrainConfig
    flags = {f.name for c in (TrainConfig, AudioTrainConfig) for f in option_fields(c)}
    given = {n: getattr(args, n) for n in flags if getattr(args, n, None) is not None}
    own = {f.name for f in option_fields(config_class)}
    stray = sorted(n for n in given if n not in own)
    if stray:
        names = ", ".join("--" + n.replace("_", "-") for n in stray)
        other = "image" if modality == "audio" else "audio"
        job = "the speech codec" if modality == "audio" else "the image tokenizer"
        raise UserError(
            f"{names} {'applies' if len(stray) == 1 else 'apply'} to {other} data, not to "
            f"this {modality} run ({job})"
        )
    if modality == "audio":
        return _train_audio(args, given)
    return _train_image(args, given)


def _train_audio(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from .audio_trainer import AudioTrainConfig, AudioTrainer
    from .config import read_config_file

    def fresh() -> Any:
        filed = read_config_file(args.config, AudioTrainConfig) if args.config else {}
        return AudioTrainConfig(**{**filed, **given})

    cfg = _resolved(AudioTrainConfig, args, given, fresh)
    return _fit(AudioTrainer(cfg, resume=args.resume, overwrite=args.overwrite), AUDIO_KEYS)


def _train_image(args: argparse.Namespace, given: dict[str, Any]) -> int:
    from .tokenizer import TrainConfig, Trainer

    def fresh() -> Any:
        if args.config:
            return TrainConfig.from_file(args.config, **given)
        return TrainConfig.build(**given)

    cfg = _resolved(TrainConfig, args, given, fresh)
    return _fit(Trainer(cfg, resume=args.resume, overwrite=args.overwrite), IMAGE_KEYS)


AUDIO_KEYS = ("step", "clips", "stages", "codes_used")
IMAGE_KEYS = ("step", "nmse", "psnr", "perplexity", "batch_perplexity", "codes_used", "usage")


def _resolved(
    config_class: Any, args: argparse.Namespace, given: dict[str, Any], fresh: Any
) -> Any:
    """The job's config: on ``--resume`` the run's own options (from its checkpoint;
    only the flags that change something need be given, ``--config`` refused), else
    ``fresh()``."""
    if not args.resume:
        return fresh()
    from ..storage.checkpoint import load_checkpoint

    out = Path(given.get("out_dir", config_class.defaults()["out_dir"]))
    if args.config:
        raise UserError("--resume takes the run's own options; drop --config")
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    config_class.check_resume_request(given, int(ckpt.get("step", 0)), str(out))
    return config_class.for_resume(ckpt.get("train_config", {}), given)


def _fit(trainer: Any, keys: tuple[str, ...]) -> int:
    """Run the job; rank 0 prints the final figures named ``keys`` and what it wrote."""
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        return 130
    if not trainer.is_main:  # torchrun: rank 0 reports
        return 0
    from ..storage.fileio import dump_json

    print(dump_json({k: result[k] for k in keys if k in result}, indent=2))
    written = [p.relative_to(trainer.out) for p in trainer.run.existing_artifacts()]
    print(f"run written to {trainer.out}: " + " ".join(map(str, written)))
    return 0
