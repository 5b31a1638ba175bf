"""The speech codec's training job (``vqkit train`` on WAV data): an
:class:`~vqkit.models.AudioCodec` (SEANet -> residual VQ with quantizer dropout -> SEANet)
trained on random fixed-length crops with the waveform L1, multi-resolution STFT and
multi-scale mel terms (:class:`~vqkit.losses.AudioReconstructionLoss`, weights from
:class:`~vqkit.losses.AudioLossOptions`) plus the quantizer's own loss. It supplies its
state, step and evaluation to the runtime (:class:`vqkit.runtime.job.LoaderJob`:
process group, run directory, exact resume, RNG, log window, best.pt, the run loop).

Data: ``load_audio(data, split, rate=sample_rate)`` (:mod:`vqkit.data.audiofolder`: a
WAV folder or tar, FSDD with its official split; ``holdout_speaker``: train on the other
speakers' train clips, evaluate on that speaker's test clips); training batches are
``segment_seconds`` crops of shuffled train clips (:class:`~vqkit.data.CropLoader`,
resumable); a shorter clip is taken whole, zero-padded, and its padding is left out of
every loss term and of the quantizer's statistics (``lengths``). Options:
:mod:`vqkit.training.audio_config`.

Discriminators (``--audio-disc mpd|stft|mpd+stft``; none by default, and then the step
is exactly the reconstruction-only one): from ``disc_start`` on, the codec's loss adds
``adv_weight * g_adv + feat_match_weight * feat_match``
(:class:`~vqkit.losses.audio_adversarial.AudioAdversarialLoss`, the discriminators
frozen), and after the codec's update the discriminators take their own step (the shared
:class:`~vqkit.training.adversarial_step.DiscriminatorStep`: Adam at ``disc_lr`` on the
run's schedule, DistributedDataParallel under torchrun, checkpointed) on the same crops
and the detached reconstruction, both with their padding zeroed. The train records
carry ``g_adv``, ``feat_match``, ``d_loss`` (means over the window's steps that had
them) and ``disc_steps``; best.pt is chosen from ``disc_start`` on.

Codebook health: the image job's policy (:mod:`vqkit.training.health`, the same
options): k-means init of the quantizer (rvq: stage by stage, each on its residual) on
the initial encoder's frames of crops of a loader of its own at step 0, padding frames
left out, and dead-code revival every ``revive_every`` steps from the current batch's
frames; the train records carry ``dead``, ``codes_used``, ``window_perplexity``,
``revived`` (and ``code_groups`` for a quantizer with groups).

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
import time
from dataclasses import asdict
from typing import Any

import torch

from ..data import CropLoader, load_audio
from ..distributed import data_parallel
from ..errors import UserError
from ..losses.adversarial import disc_start_warning
from ..losses.audio_adversarial import AudioAdversarialLoss
from ..losses.spectral import AudioReconstructionLoss, zero_padding
from ..models.audio_codec import AudioCodec, AudioCodecConfig
from ..runtime.job import LoaderJob
from ..runtime.loop import Progress, ScheduledOptimizer, StepResult
from ..runtime.options import resume_changes
from ..runtime.schedule import Schedule
from ..runtime.window import Window
from ..storage.checkpoint import CheckpointError
from ..storage.rundir import ARTIFACTS
from .adversarial_step import DiscriminatorOptimOptions, DiscriminatorStep
from .audio_config import AudioTrainConfig, AudioTrainOptions
from .health import CodebookHealth, HealthOptions, with_global_usage

__all__ = ["AudioTrainConfig", "AudioTrainOptions", "AudioTrainer", "train_audio"]


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
        held = [c.holdout_speaker] if c.holdout_speaker else None
        self.train_data = load_audio(c.data, "train", rate=rate, exclude_speakers=held)
        self.test_data = load_audio(c.data, "test", rate=rate, speakers=held)
        torch.manual_seed(c.seed)  # the same initial weights on every rank
        self.model = AudioCodec(c.codec_config).to(self.device)
        q = self.model.quantizer
        if self.checkpoint is not None:  # defaults left open take the run's resolved values
            stored = self.checkpoint.get("train_config", {})
            c = c.replace(**c.group(HealthOptions).stored_health(stored))
        frames = self.crop_frames
        health = c.group(HealthOptions).health_defaults(
            q.supports_init, q.supports_revival, c.batch_size * self.world * frames, q.num_codes
        )
        self.config = self.options = c = c.replace(**health)
        self.health = CodebookHealth(c, q)
        self.stages = self._eval_stages()
        self.loss = AudioReconstructionLoss(c.loss, rate=rate).to(self.device)
        self.window = Window(
            self.model.num_codes,
            self.rate_key,
            tallies=("revived",),
            per_group=q.code_groups is not None,  # a quantizer's groups, one by one
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr)
        self.scheduled = ScheduledOptimizer(self.optimizer, [c.lr], Schedule.of(c))
        self.adv: DiscriminatorStep | None = None  # the discriminators, their optimizer
        if c.adversarial.disc_on:
            # initialised from a stream of their own: the codec's random draws (quantizer
            # dropout) and so its steps before disc_start are the run's without them
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed + 104729)
                adversarial = AudioAdversarialLoss(c.adversarial)
            self.adv = DiscriminatorStep(
                adversarial,
                c.group(DiscriminatorOptimOptions),
                self.device,
                schedule=Schedule.of(c),
                lr=c.lr,
            )
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
        if self.world > 1:  # statistics already identical on every rank: data_parallel
            self.ddp = data_parallel(self.model, self.device)
            if self.adv is not None:
                self.adv.wrap_ddp()

    @property
    def crop_frames(self) -> int:
        """Latent frames of a training crop: ``ceil(segment_samples / hop)``."""
        return -(-self.config.segment_samples // self.model.hop)

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
        """Let go of the DistributedDataParallel wrappers before the group is destroyed."""
        if hasattr(self, "ddp"):
            self.ddp = self.model
        if getattr(self, "adv", None) is not None:
            self.adv.unwrap_ddp()

    def optimizers(self) -> list[ScheduledOptimizer]:
        """The codec's optimizer, and the discriminators' when there are any."""
        return [self.scheduled, *([] if self.adv is None else self.adv.optimizers())]

    @property
    def best_from(self) -> int:
        """best.pt: reconstruction-only weights drop out once the discriminators are on."""
        return 0 if self.adv is None else self.adv.objective_final_from

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            **({} if self.adv is None else {"adversarial": self.adv.state_dict()}),
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
        if self.adv is None:  # --audio-disc none
            dropped = (ckpt.get("adversarial") or {}).get("loss")
            return [DiscriminatorStep.dropped_note(AudioAdversarialLoss)] if dropped else []
        return self.adv.load_state_dict(ckpt.get("adversarial"))

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
        mode), from ``disc_start`` on plus the adversarial terms, then the
        discriminators' step on the same crops (module docstring)."""
        x, lengths = batch
        self.model.train()
        if self.step == 0 and self.config.init == "kmeans":
            self.init_codebook(progress)
        out = self.ddp(x, lengths)
        recon, terms = self.loss(out.recon, x, lengths)
        loss = recon + out.vq.loss
        if self.adv is not None:  # the discriminators see the crops' padding zeroed
            real, fake = zero_padding(x, lengths), zero_padding(out.recon, lengths)
            adversarial = self.adv.loss.generator_loss(real, fake, self.step)
            if adversarial:
                loss = loss + adversarial.pop("loss")
                terms.update(adversarial)
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
        if self.adv is not None:
            values.update(self.adv.discriminator_step(real, fake.detach(), self.step))
        counts = out.vq.counts
        sum_counts = counts is not None and not self.model.quantizer.counts_are_global
        return StepResult(values, counts, sum_counts)

    def observe(
        self, batch: tuple[torch.Tensor, torch.Tensor], values: dict[str, float], counts: Any
    ) -> None:
        if self.world > 1:
            with_global_usage(values, counts)
        if self.health.due(self.step):
            z, mask = self._latents(*batch)
            revived = self.health.revive(z, self.step, self.optimizer, mask=mask)
            self.window.tally("revived", revived)
        self.window.add(values, counts, self.items(batch))

    def record(self) -> dict[str, Any]:
        """A train record's codebook health (:meth:`CodebookHealth.figures`) and, with
        discriminators, ``disc_steps``."""
        return {
            **super().record(),
            **self.health.figures(self.window.counts, self.window.group_counts),
            **({} if self.adv is None else self.adv.record(self.window)),
        }

    @torch.no_grad()
    def _latents(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantizer's input (B, D, T) for crops ``x`` and its padding mask (B, T)."""
        z = self.model.encoder(x)
        return z, self.model.frame_mask(lengths.to(z.device), z.shape[-1])

    def init_codebook(self, progress: Progress | None) -> None:
        """``init="kmeans"``: k-means on the initial encoder's latents of
        :meth:`CodebookHealth.init_batch_count` batches of crops of every rank, padding
        frames left out. The crops come from a loader of their own (another seed), so the
        training stream is the same with and without the init."""
        c = self.config
        loader = CropLoader(
            self.train_data,
            c.batch_size,
            c.segment_samples,
            seed=c.seed + 7919,
            rank=self.rank,
            world_size=self.world,
            device=self.device,
        )
        n = self.health.init_batch_count(self.crop_frames, self.world)
        pairs = [self._latents(*loader.next_batch()) for _ in range(n)]
        kept = sum(int((~m).sum()) for _, m in pairs) * self.world
        what = f"k-means init of {self.model.quantizer.num_codes} codes on {kept} latents"
        if progress is not None:
            progress.phase("k-means init", f"{what} ...")
        started = time.perf_counter()
        self.health.init_codebook([z for z, _ in pairs], [m for _, m in pairs])
        if progress is not None:
            progress.write(f"{what}: {time.perf_counter() - started:.1f} s")
            progress.phase(None)

    def items(self, batch: Any) -> int:
        """Seconds of audio in the global batch (the records' ``audio_seconds_per_s``)."""
        lengths = batch[1]
        return float(lengths.sum()) * self.world / self.config.sample_rate  # type: ignore[return-value]

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        return {
            "loss": f"{values['loss']:.3f}",
            **({"mel": f"{values['mel']:.3f}"} if "mel" in values else {}),
            "ppl": f"{values['perplexity']:.1f}",
            **({"d": f"{values['d_loss']:.3f}"} if "d_loss" in values else {}),
        }

    def announce(self) -> None:
        warning = disc_start_warning(self.config.adversarial, self.config.steps)
        if warning:
            print(f"warning: {warning}", flush=True)

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
        from ..evaluation.codec_eval import codec_report, write_samples

        report = codec_report(
            self.model, self.test_data, stages=self.stages, limit=self.config.eval_limit
        )
        result = {"step": self.step, "split": "test", "data": self.config.data}
        if self.config.holdout_speaker:  # the test clips are that speaker's alone
            result["holdout_speaker"] = self.config.holdout_speaker
        result.update(report)
        self.run.write_json("eval.json", result)
        self.model.pretrained_info = {"data": self.config.data, "eval": result}
        self.model.save_pretrained(self.out / "codec")
        write_samples(self.model, self.test_data, self.stages, self.config.sample_clips, self.out)
        return result


def _describe(data: Any) -> dict[str, Any]:
    named = data.speakers is not None and bool(data.speaker_names)
    return {
        "source": data.source,
        "split": data.split,
        "clips": len(data),
        "seconds": round(data.seconds, 3),
        "rate": data.rate,
        # the speakers present (a held-out split keeps every name, not every speaker)
        "speakers": len(set(data.speakers.tolist())) if named else 0,
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
