"""The speech codec job's options (:class:`AudioTrainOptions`, its own) and its flat
configuration (:class:`AudioTrainConfig`: its own, the codebook health's, the audio loss
terms', the discriminators' and their optimizer's, and the codec's), checked on
construction before any data is read; the job is :mod:`vqkit.training.audio_trainer`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

from ..errors import UserError
from ..losses.audio_adversarial import AudioAdversarialOptions
from ..losses.spectral import AudioLossOptions, parse_triples
from ..models.audio_codec import AudioCodecConfig
from ..options import (
    Options,
    compose,
    nonneg_int,
    option,
    option_fields,
    positive,
    positive_int,
    with_defaults,
)
from ..runtime.options import check_resume_steps
from .adversarial_step import DiscriminatorOptimOptions
from .config import TrainJobOptions
from .health import HealthOptions

__all__ = ["AudioTrainConfig", "AudioTrainOptions"]

# a CPU-sized default run: 0.5 s crops at 8 kHz, 16 a batch
_AudioJobOptions = with_defaults(
    TrainJobOptions,
    "_AudioJobOptions",
    steps=2000,
    batch_size=16,
    eval_every=250,
    grad_clip=1.0,  # the spectral terms' gradients spike on near-silent crops
    out_dir="runs/vqkit-audio",
)


def _stages_check(text: str) -> str | None:
    try:
        ok = all(int(s) >= 1 for s in text.split(",")) if text.strip() else True
    except ValueError:
        ok = False
    return None if ok else "'' (every stage count) or comma-separated stage counts >= 1"


@dataclass
class AudioTrainOptions(_AudioJobOptions):  # type: ignore[misc, valid-type]
    """The speech codec job's own options; the options every job has (steps, batch,
    learning rate, ...) and ``data`` / ``modality`` / ``out_dir`` are inherited from
    their declarations (:class:`vqkit.runtime.options.JobOptions`,
    :class:`vqkit.training.config.TrainJobOptions`), with the codec's defaults."""

    segment_seconds: float = option(
        0.5,
        "audio: length of the random training crops in seconds (clips shorter are taken "
        "whole and zero-padded, the padding left out of the loss)",
        check=positive,
        on_resume="fixed",  # the loader's state counts crops of this length
    )
    eval_clips: int = option(
        16, "audio: test clips of the periodic evaluation (evenly strided)", check=positive_int
    )
    eval_stages: str = option(
        "",
        "audio: the stage counts evaluated, comma-separated ('': every count 1..Q)",
        check=_stages_check,
    )
    eval_limit: int = option(
        0, "audio: test clips of the final evaluation (0: the whole split)", check=nonneg_int
    )
    holdout_speaker: str = option(
        "",
        "audio: a held-out-speaker run: train on every other speaker's train clips and "
        "evaluate on this speaker's test clips (FSDD names george, jackson, lucas, nicolas, "
        "theo, yweweler; '': every speaker in both)",
        on_resume="fixed",  # the training clips, and so the loader's order, depend on it
    )
    sample_clips: int = option(
        3,
        "audio: test clips drawn as spectrograms and written as WAV with their decodings",
        check=nonneg_int,
    )


_AudioTrainConfigBase = compose(
    "AudioTrainConfig",
    (
        AudioTrainOptions,
        HealthOptions,
        AudioLossOptions,
        AudioAdversarialOptions,
        DiscriminatorOptimOptions,
        AudioCodecConfig,
    ),
    bases=(Options,),
)


class AudioTrainConfig(_AudioTrainConfigBase):  # type: ignore[misc, valid-type]
    """All options of the speech codec job, flat: :class:`AudioTrainOptions`, the
    codebook health's :class:`~vqkit.training.health.HealthOptions` (the image job's
    declarations: k-means init and revival every 20 steps when the quantizer supports
    them), :class:`~vqkit.losses.AudioLossOptions`, the discriminators'
    (:class:`~vqkit.losses.audio_adversarial.AudioAdversarialOptions`, ``disc_start``
    the image job's declaration) and their optimizer's (the image job's
    :class:`~vqkit.training.adversarial_step.DiscriminatorOptimOptions`) and the codec's
    (:class:`~vqkit.models.AudioCodecConfig`: network, ``embedding_dim``, ``quantizer``
    and every quantizer kind's options at the codec's defaults). Checked on construction,
    before any data is read: the codec's own checks, and crops long enough for every
    loss window and for one frame."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _ = self.codec_config  # the codec's checks (strides, quantizer kind's options)
        if self.modality == "image":
            raise UserError(
                "modality 'image' is the image tokenizer's (vqkit.training.Trainer); the "
                "speech codec job trains on audio"
            )
        need = max(n // 2 + 1 for n, _, _ in self._windows())
        if self.segment_samples < need:
            raise UserError(
                f"segment_seconds {self.segment_seconds} gives {self.segment_samples} samples "
                f"at {self.sample_rate} Hz; the loss windows need at least {need}"
            )

    def _windows(self) -> list[tuple[int, int, int]]:
        out = []
        if self.stft_weight > 0:
            out += parse_triples(self.stft_resolutions)
        if self.mel_weight > 0:
            out += parse_triples(self.mel_scales)
        return out or [(1, 1, 1)]

    @property
    def segment_samples(self) -> int:
        """Samples of a training crop: ``round(segment_seconds * sample_rate)``."""
        return max(1, round(self.segment_seconds * self.sample_rate))

    @cached_property
    def codec_config(self) -> AudioCodecConfig:
        """The codec's options (:class:`~vqkit.models.AudioCodecConfig`), checked."""
        return AudioCodecConfig(
            **{f.name: getattr(self, f.name) for f in option_fields(AudioCodecConfig)}
        )

    @cached_property
    def loss(self) -> AudioLossOptions:
        return self.group(AudioLossOptions)

    @cached_property
    def adversarial(self) -> AudioAdversarialOptions:
        return self.group(AudioAdversarialOptions)

    def replace(self, **changes: Any) -> AudioTrainConfig:
        return type(self)(**{**asdict(self), **changes})

    @classmethod
    def for_resume(cls, stored: dict[str, Any], given: dict[str, Any]) -> AudioTrainConfig:
        """A resumed run's config: its own (``stored``) with ``given`` on top."""
        known = {f.name for f in option_fields(cls)}
        return cls(**{**{k: v for k, v in stored.items() if k in known}, **given})

    @staticmethod
    def check_resume_request(given: dict[str, Any], step: int, where: str = "the run") -> None:
        """``steps`` below the checkpoint's step is refused before anything is loaded."""
        check_resume_steps(given.get("steps"), step, where)
