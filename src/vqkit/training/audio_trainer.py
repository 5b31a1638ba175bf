"""The speech codec's training job (``vqkit train`` on WAV data): an
:class:`~vqkit.models.AudioCodec` (SEANet -> residual VQ with quantizer dropout -> SEANet)
trained on random fixed-length crops with the waveform L1, multi-resolution STFT and
multi-scale mel terms (:class:`~vqkit.losses.AudioReconstructionLoss`, weights from
:class:`~vqkit.losses.AudioLossOptions`) plus the quantizer's own loss. It supplies its
state, step and evaluation to the runtime (:class:`vqkit.runtime.job.LoaderJob`:
process group, run directory, exact resume, RNG, log window, best.pt, the run loop).

Data: ``load_audio(data, split, rate=sample_rate)`` (:mod:`vqkit.data.audiofolder`: a
WAV folder or tar, FSDD with its official split); training batches are
``segment_seconds`` crops of shuffled train clips (:class:`~vqkit.data.CropLoader`,
resumable); a shorter clip is taken whole, zero-padded, and its padding is left out of
every loss term and of the quantizer's statistics (``lengths``).

A run directory holds ``config.json``, ``metrics.jsonl`` (``"train"`` records: the loss
and its terms, perplexity, usage; ``"eval"`` records every ``eval_every`` steps on
``eval_clips`` test clips: SI-SDR and mel distance per evaluated stage count,
``si_sdr_q{n}``, ``mel_distance_q{n}``, and at the full count ``si_sdr``,
``mel_distance``, which best.pt minimises), ``checkpoints/last.pt`` and ``best.pt``, and
at the end ``eval.json`` (:func:`vqkit.evaluation.codec_eval.evaluate_codec` on the
whole test split, PESQ / STOI included when the ``audio-eval`` extra is installed),
``codec/`` (the pretrained directory: ``AudioCodec.from_pretrained(RUN / "codec")``),
``spectrograms.png`` and ``samples/*.wav`` (a few test clips and their decodings at the
lowest and the highest evaluated stage count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import torch

from ..data import CropLoader, load_audio, write_wav
from ..errors import UserError
from ..losses.spectral import AudioLossOptions, AudioReconstructionLoss, parse_triples
from ..models.audio_codec import AudioCodec, AudioCodecConfig
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
from ..runtime.job import LoaderJob
from ..runtime.loop import Progress, ScheduledOptimizer, StepResult
from ..runtime.options import check_resume_steps, resume_changes
from ..runtime.schedule import Schedule
from ..runtime.window import Window
from ..storage.checkpoint import CheckpointError
from ..storage.rundir import ARTIFACTS
from .config import TrainJobOptions
from .health import with_global_usage

__all__ = ["AudioTrainConfig", "AudioTrainOptions", "AudioTrainer", "train_audio"]

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
    sample_clips: int = option(
        3,
        "audio: test clips drawn as spectrograms and written as WAV with their decodings",
        check=nonneg_int,
    )


_AudioTrainConfigBase = compose(
    "AudioTrainConfig",
    (AudioTrainOptions, AudioLossOptions, AudioCodecConfig),
    bases=(Options,),
)


class AudioTrainConfig(_AudioTrainConfigBase):  # type: ignore[misc, valid-type]
    """All options of the speech codec job, flat: :class:`AudioTrainOptions`,
    :class:`~vqkit.losses.AudioLossOptions` and the codec's
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

    @classmethod
    def for_resume(cls, stored: dict[str, Any], given: dict[str, Any]) -> AudioTrainConfig:
        """A resumed run's config: its own (``stored``) with ``given`` on top."""
        known = {f.name for f in option_fields(cls)}
        return cls(**{**{k: v for k, v in stored.items() if k in known}, **given})

    @staticmethod
    def check_resume_request(given: dict[str, Any], step: int, where: str = "the run") -> None:
        """``steps`` below the checkpoint's step is refused before anything is loaded."""
        check_resume_steps(given.get("steps"), step, where)


class AudioTrainer(LoaderJob):
    """One speech codec run: ``AudioTrainer(config).fit()``; see the module docstring."""

    kind = "vqkit-audio-codec"
    desc = "codec"
    loss_key = "loss"
    best_key = "mel_distance"
    rate_key = "audio_seconds_per_s"
    artifacts = (
        *ARTIFACTS,
        "spectrograms.png",
        "codec/config.json",
        "codec/model.safetensors",
        "codec/README.md",
    )
    artifact_globs = ("samples/*.wav",)

    def __init__(
        self, config: AudioTrainConfig, *, resume: bool = False, overwrite: bool = False
    ) -> None:
        if config.data is None:
            raise UserError("the speech codec needs --data: a WAV folder, a tar of one, or FSDD")
        super().__init__(config, config.out_dir, resume=resume, overwrite=overwrite)
        self.config: AudioTrainConfig = config
        with self.setting_up():
            self._setup()

    def _setup(self) -> None:
        c = self.config
        rate = c.sample_rate
        self.train_data = load_audio(c.data, "train", rate=rate)
        self.test_data = load_audio(c.data, "test", rate=rate)
        torch.manual_seed(c.seed)  # the same initial weights on every rank
        self.model = AudioCodec(c.codec_config).to(self.device)
        self.stages = self._eval_stages()
        self.loss = AudioReconstructionLoss(c.loss, rate=rate).to(self.device)
        self.window = Window(self.model.num_codes, self.rate_key)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr)
        self.scheduled = ScheduledOptimizer(self.optimizer, [c.lr], Schedule.of(c))
        self.loader = CropLoader(
            self.train_data,
            c.batch_size,
            c.segment_samples,
            seed=c.seed,
            rank=self.rank,
            world_size=self.world,
            device=self.device,
        )
        self.ddp: torch.nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # the quantizer's statistics are identical on every rank already (see
            # vqkit.training.tokenizer): no buffer broadcast before each forward
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False,
            )

    def _eval_stages(self) -> list[int]:
        from ..evaluation.codec_eval import parse_stages

        q = self.model.num_stages
        if self.config.eval_stages.strip() and self.config.quantizer != "rvq":
            raise UserError(
                f"eval_stages applies to quantizer 'rvq' (residual stages), not "
                f"{self.config.quantizer!r}"
            )
        return parse_stages(self.config.eval_stages, q)

    def release(self) -> None:
        """Let go of the DistributedDataParallel wrapper before the group is destroyed."""
        if hasattr(self, "ddp"):
            self.ddp = self.model

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> list[str]:
        stored = AudioCodecConfig.from_dict(ckpt["model_config"]).to_dict()
        if stored != self.model.config.to_dict():
            raise CheckpointError(
                f"{self.last_path}: the checkpoint's codec config {stored} does not match "
                f"this run's {self.model.config.to_dict()}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # a changed --lr applies
            group["lr"] = self.config.lr
        self.loader.load_state_dict(ckpt["loader"])
        return []

    def changes_on_resume(self, ckpt: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        return resume_changes(
            self.config,
            ckpt.get("train_config", {}),
            stored_world=int(ckpt.get("world_size", 1)),
            world=self.world,
            fixed_groups=(AudioCodecConfig,),  # every option that shapes the codec
            ignore=("out_dir",),
        )

    # -- the step ---------------------------------------------------------------------------
    def update(self, batch: tuple[torch.Tensor, torch.Tensor], progress: Progress) -> StepResult:
        """One update on crops ``x`` (B, 1, L) with their real ``lengths`` (B,): the
        reconstruction terms plus the quantizer's loss (quantizer dropout acts: training
        mode)."""
        x, lengths = batch
        self.model.train()
        out = self.ddp(x, lengths)
        recon, terms = self.loss(out.recon, x, lengths)
        loss = recon + out.vq.loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        values = {
            "loss": float(loss.detach()),
            "recon": float(recon.detach()),
            "vq_loss": float(out.vq.loss.detach()),
            **{k: float(v.detach()) for k, v in terms.items()},
            "perplexity": float(out.vq.perplexity),
            "usage": float(out.vq.usage),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        if self.config.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            values["grad_norm"] = float(norm)
        self.optimizer.step()
        counts = out.vq.counts
        sum_counts = counts is not None and not self.model.quantizer.counts_are_global
        return StepResult(values, counts, sum_counts)

    def observe(
        self, batch: tuple[torch.Tensor, torch.Tensor], values: dict[str, float], counts: Any
    ) -> None:
        if self.world > 1:
            with_global_usage(values, counts)
        self.window.add(values, counts, self.items(batch))

    def items(self, batch: Any) -> int:
        """Seconds of audio in the global batch (the records' ``audio_seconds_per_s``)."""
        lengths = batch[1]
        return float(lengths.sum()) * self.world / self.config.sample_rate  # type: ignore[return-value]

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        return {
            "loss": f"{values['loss']:.3f}",
            **({"mel": f"{values['mel']:.3f}"} if "mel" in values else {}),
            "ppl": f"{values['perplexity']:.1f}",
        }

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """SI-SDR and mel distance of ``eval_clips`` test clips per evaluated stage count
        (``si_sdr_q{n}``, ``mel_distance_q{n}``), the full count's as ``si_sdr`` and
        ``mel_distance`` (best.pt's figure)."""
        from ..evaluation.codec_eval import evaluate_codec

        result = evaluate_codec(
            self.model, self.test_data, stages=self.stages, limit=self.config.eval_clips
        )
        out: dict[str, Any] = {}
        for row in result["stages"]:
            n = row["num_stages"]
            out[f"si_sdr_q{n}"], out[f"mel_distance_q{n}"] = row["si_sdr"], row["mel_distance"]
        last = result["stages"][-1]
        out["si_sdr"], out["mel_distance"] = last["si_sdr"], last["mel_distance"]
        if not math.isfinite(out["mel_distance"]):  # every eval clip too short to score
            out["mel_distance"] = math.inf
        out["codes_used"] = result["codes_used"]
        return out

    def run_info(self) -> dict[str, Any]:
        return {
            "train": asdict(self.config),
            "model": self.model.config.to_dict(),
            "data": {
                "train": _describe(self.train_data),
                "test": _describe(self.test_data),
            },
            "rates": {
                "hop": self.model.hop,
                "frames_per_second": self.model.frames_per_second,
                "kbps_per_stage": self.model.bitrate(1) / 1000.0
                if self.model.num_stages > 1
                else self.model.bitrate() / 1000.0,
            },
            "device": str(self.device),
        }

    def finish(self) -> dict[str, Any]:
        """The final evaluation on the test split (``eval.json``), the pretrained
        directory ``codec/``, the spectrograms and WAV samples."""
        from ..evaluation.audio_metrics import audio_eval_available
        from ..evaluation.codec_eval import evaluate_codec

        result = evaluate_codec(
            self.model,
            self.test_data,
            stages=self.stages,
            limit=self.config.eval_limit,
            speech_scores=audio_eval_available(),
        )
        result = {
            "step": self.step,
            "split": "test",
            "data": self.config.data,
            "sample_rate": self.config.sample_rate,
            "frames_per_second": self.model.frames_per_second,
            "speech_scores": "joined per speaker, aligned"
            if "stoi" in result["stages"][0]
            else "absent: pip install 'vqkit[audio-eval]' for PESQ and STOI",
            **result,
        }
        self.run.write_json("eval.json", result)
        self.model.pretrained_info = {"data": self.config.data, "eval": result}
        self.model.save_pretrained(self.out / "codec")
        self.write_samples()
        return result

    def write_samples(self) -> None:
        """``samples/clipI_original.wav``, ``clipI_q{n}.wav`` (one stage and all) and
        ``spectrograms.png`` of ``sample_clips`` strided test clips."""
        from ..evaluation.codec_eval import decode_clip, pick_clips
        from ..evaluation.plots import plot_spectrograms

        n = self.config.sample_clips
        if n == 0:
            return
        shown = sorted({self.stages[0], self.stages[-1]})
        rows = []
        (self.out / "samples").mkdir(exist_ok=True)
        self.model.eval()
        rate = self.config.sample_rate
        for i in pick_clips(self.test_data, n):
            clip = self.test_data.clip(i)
            _, decoded = decode_clip(self.model, clip, shown)
            row = {"original": clip}
            write_wav(self.out / "samples" / f"clip{i}_original.wav", clip, rate)
            for q, dec in zip(shown, decoded, strict=True):
                kbps = self.model.bitrate(q if self.model.num_stages > 1 else None) / 1000
                row[f"{q} stage{'s' * (q > 1)}, {kbps:.2g} kbps"] = dec
                write_wav(self.out / "samples" / f"clip{i}_q{q}.wav", dec, rate)
            rows.append(row)
        self.model.train()
        plot_spectrograms(rows, rate, self.out / "spectrograms.png")


def _describe(data: Any) -> dict[str, Any]:
    return {
        "source": data.source,
        "split": data.split,
        "clips": len(data),
        "seconds": round(data.seconds, 3),
        "rate": data.rate,
        "speakers": len(data.speaker_names),
    }


def train_audio(
    config: AudioTrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a speech codec; returns the final evaluation dict."""
    if config is None:
        config = AudioTrainConfig(**overrides)
    elif overrides:
        config = AudioTrainConfig(**{**asdict(config), **overrides})
    return AudioTrainer(config, resume=resume, overwrite=overwrite).fit()
