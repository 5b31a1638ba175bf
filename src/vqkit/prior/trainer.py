"""Training loop of the prior: AdamW, warm-up and cosine decay, metrics, checkpoints.

A prior run directory follows the conventions of ``vqkit train``::

    config.json          the resolved options, the tokenizer (path, sha256), the data
    metrics.jsonl        strict JSON, one object per log interval ("kind": "train") and
                         per evaluation ("kind": "eval"); NLL in bits per code
    checkpoints/last.pt  written atomically at every evaluation, at the end and on Ctrl-C;
    checkpoints/best.pt  best = lowest test bits per code
    samples.png          decoded samples of the latest evaluation (samples/step_N.png kept)
    curves.png           bits per code (train, test) and learning rate against step; both
                         pictures are rewritten at every evaluation
    eval.json            the final evaluation
    tensorboard/         with ``--tensorboard``: the metrics records and the sample grids

Loss: the mean over codes of ``-log2 p(c_t | c_<t, y)`` (bits per code; the model trains
on the same quantity in nats). A speech codec's codes (:mod:`vqkit.prior.audio_codes`:
windows of frames, the last of a clip padded with PAD) train the autoregressive kind
only, their padding left out of the loss and of ``test_bits``; their eval records add
each stage's bits per code (``test_bits_stage{s}``) and the bitrates: ``test_kbps``
(test bits per code x codes per second: what entropy coding with the prior spends),
``raw_kbps`` (the codec's uncoded rate at the modelled stages) and ``kbps_ratio``. Its
samples are WAV clips of one window each (``samples/step_N_i.wav``). A masked prior
(``kind="masked"``) is the same job with another loss and evaluation
(:class:`vqkit.prior.masked.MaskedObjective`): the cross-entropy of the codes hidden by
a mask drawn from its schedule, and in the eval records the masked cross-entropy at
fixed ratios (``test_masked_bits_25/50/90``, their mean ``test_masked_bits`` choosing
``best.pt``), not an NLL. A next-scale prior (``kind="next-scale"``,
:mod:`vqkit.prior.nextscale`) trains and evaluates like the autoregressive kind: its
forward gives every code's logits given the coarser scales in one pass, so its loss and
``test_bits`` are the same mean ``-log2 p(c_t | ...)``.

Learning rate at step s (0-based) of S, warm-up W::

    lr(s) = lr * (s + 1) / W                                         s < W
    lr(s) = lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (S - W))) / 2)   otherwise

with r = ``min_lr_ratio`` (:class:`vqkit.runtime.schedule.Schedule`). The prior is a job
of the runtime (:class:`vqkit.runtime.job.Job`), which owns the process group, the run
directory (rank 0 holds its lock from construction to the end of
:meth:`PriorTrainer.fit` or ``close()``; a fresh start refuses a directory holding a run
unless ``overwrite``, which removes only the files listed in :data:`ARTIFACTS`, the
checkpoints and ``samples/step_*.png``), resume, RNG, the log window, best.pt and the
run loop.

``resume=True`` restores model, optimizer, RNG, data position and the log window from
``checkpoints/last.pt`` and drops the metric records written after it: a run
interrupted at step N and resumed gives the same weights and records as an
uninterrupted one (the schedule depends on ``steps``: resume with the same ``steps``).

Distributed (``torchrun``): DistributedDataParallel, each rank reads its own shard of
every epoch (``batch_size`` per rank); losses are all-reduced for the logs together with
the Ctrl-C flag; rank 0 alone evaluates (no collective inside), writes and shows
progress. Every rank seeds the global RNG alike, so class dropout draws the same masks
on every rank (on different data) and rank 0's RNG state is everyone's: a checkpoint
resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..runtime.job import LoaderJob
from ..runtime.loop import Progress, ScheduledOptimizer, StepResult
from ..runtime.schedule import Schedule
from ..storage.checkpoint import CheckpointError
from ..storage.fileio import write_json
from .audio_codes import audio_rates, decode_windows, stage_bits
from .codes import CodeData, SequenceLoader, Tokenizer
from .config import PriorConfig, PriorTrainConfig
from .masked import MaskedObjective
from .sampling import PAD
from .transformer import Prior

__all__ = ["ARTIFACTS", "PriorTrainer", "lr_at"]

LN2 = math.log(2.0)
# what a prior run writes into its directory (removed by --overwrite; sample PNGs too)
ARTIFACTS = ("metrics.jsonl", "config.json", "eval.json", "curves.png", "samples.png")

# what eval.json says of the data the figures were measured on
_IMAGE_KEYS = ("source", "format", "image_size", "channels")
_AUDIO_KEYS = ("source", "modality", "sample_rate", "audio_window", "audio_stages")
# the prior's data, made once the process group exists: (train, test, tokenizer)
CodeLoad = Callable[["PriorTrainer"], tuple[CodeData, CodeData, "Tokenizer | None"]]


def lr_at(step: int, cfg: PriorTrainConfig) -> float:
    """Learning rate of 0-based ``step`` (see the module docstring)."""
    return Schedule.of(cfg).lr(cfg.lr, step)


def strided(data: CodeData, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences (n, T), labels (n,)) of ``limit`` sequences (0: all), evenly strided,
    so a class-sorted split (image folders) is still covered."""
    n = len(data) if limit == 0 else min(limit, len(data))
    idx = torch.linspace(0, len(data) - 1, n).round().long() if n < len(data) else slice(None)
    return data.sequences()[idx], data.labels[idx]


class PriorTrainer(LoaderJob):
    """One prior training run: ``PriorTrainer(...).fit()``; see the module docstring.

    Args:
        config: the architecture; ``vocab_size``, ``code_shape``, ``scales`` and
            ``num_classes`` are filled from ``train_data`` and ``tokenizer`` when left at
            0 / empty.
        train_config: the training options.
        out_dir: the run directory.
        train_data, test_data: the index maps of the two splits; or ``load``, which makes
            them (and the tokenizer) once the process group exists.
        tokenizer: decodes the sample grids and is recorded (path, sha256); None: no
            pictures (e.g. synthetic codes), ``vocab_size`` must then be set.
        resume / overwrite: continue ``checkpoints/last.pt`` / start again over it.
    """

    kind = "vqkit-prior"
    desc = "prior"
    loss_key = "bits"
    rate_key = "codes_per_s"
    artifacts = ARTIFACTS
    artifact_globs = ("samples/step_*.png", "samples/step_*.wav")

    def __init__(
        self,
        config: PriorConfig,
        train_config: PriorTrainConfig,
        out_dir: str | Path,
        train_data: CodeData | None = None,
        test_data: CodeData | None = None,
        *,
        tokenizer: Tokenizer | None = None,
        load: CodeLoad | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        super().__init__(train_config, out_dir, resume=resume, overwrite=overwrite)
        self.tcfg = train_config
        with self.setting_up():
            if load is not None:
                train_data, test_data, tokenizer = load(self)
            if train_data is None or test_data is None:
                raise UserError("PriorTrainer needs train_data and test_data, or load")
            self._setup(config, train_data, test_data, tokenizer)

    def _setup(
        self,
        config: PriorConfig,
        train_data: CodeData,
        test_data: CodeData,
        tokenizer: Tokenizer | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.train_data, self.test_data = train_data, test_data
        classes = len(train_data.classes) if config.class_cond else 0
        fill: dict[str, Any] = {}
        if not config.vocab_size:
            if tokenizer is None:
                raise UserError("vocab_size must be set when no tokenizer is given")
            fill["vocab_size"] = tokenizer.num_codes
        if not config.code_shape:
            fill["code_shape"] = list(train_data.code_shape)
        if not config.scales and tokenizer is not None and tokenizer.scales:
            fill["scales"] = tokenizer.scales  # its quantizer's code groups, coarse to fine
        if not config.num_classes and classes:
            fill["num_classes"] = classes
        self.config = PriorConfig.from_dict({**config.to_dict(), **fill}) if fill else config
        self.audio = tokenizer is not None and tokenizer.is_audio
        if self.audio and self.config.kind != "autoregressive":
            raise UserError(
                f"a speech codec's codes take an autoregressive prior (--kind "
                f"autoregressive); this one is {self.config.kind}"
            )
        # the masked kind's loss and evaluation; None: the autoregressive kind's own
        self.objective = MaskedObjective(self.config) if self.config.masked else None
        self.best_key = self.objective.best_key if self.objective else "test_bits"
        if list(train_data.code_shape) != self.config.code_shape:
            raise UserError(
                f"codes of shape {train_data.code_shape} do not fit code_shape "
                f"{self.config.code_shape}"
            )
        tcfg = self.tcfg
        torch.manual_seed(tcfg.seed)  # same init (and dropout draws) on every rank
        self.model = Prior(self.config).to(self.device)
        self.ddp: torch.nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(tcfg.weight_decay), lr=tcfg.lr, betas=(0.9, 0.95), fused=fused
        )
        self.scheduled = ScheduledOptimizer(
            self.optimizer, [tcfg.lr] * len(self.optimizer.param_groups), Schedule.of(tcfg)
        )
        self.loader = SequenceLoader(
            train_data.sequences().to(self.device),
            train_data.labels.to(self.device),
            tcfg.batch_size,
            seed=tcfg.seed,
            rank=self.rank,
            world_size=self.world,
        )

    # -- state ------------------------------------------------------------------------
    def release(self) -> None:
        """Let go of the DistributedDataParallel wrapper: the runtime then destroys the
        group, whose worker threads are joined only once nothing holds it (see
        :func:`vqkit.distributed.teardown`)."""
        if hasattr(self, "ddp"):
            self.ddp = self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "tokenizer": self.tokenizer.describe() if self.tokenizer is not None else None,
            "classes": list(self.train_data.classes) if self.config.num_classes else [],
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> list[str]:
        saved = PriorConfig.from_dict(ckpt["model_config"])
        if saved.to_dict() != self.config.to_dict():
            raise CheckpointError(
                f"{self.last_path}: the checkpoint's prior config {saved.to_dict()} does not "
                f"match this run's {self.config.to_dict()}"
            )
        tok = ckpt.get("tokenizer")
        if self.tokenizer is not None and tok and tok["sha256"] != self.tokenizer.sha256:
            raise UserError(
                f"tokenizer mismatch: {self.last_path} was trained on sha256 "
                f"{tok['sha256'][:16]}..., {self.tokenizer.checkpoint} has "
                f"{self.tokenizer.sha256[:16]}..."
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.loader.load_state_dict(ckpt["loader"])
        return []

    def changes_on_resume(self, ckpt: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        stored = PriorTrainConfig.from_dict(ckpt.get("train_config", {})).to_dict()
        return super().changes_on_resume({**ckpt, "train_config": stored})

    # -- metrics ----------------------------------------------------------------------
    @torch.no_grad()
    def position_bits(
        self, data: CodeData, limit: int = 0, batch_size: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of ``-log2 p(c_t | c_<t, y)`` at each position t, codes present there),
        float64 (T,) each, over ``limit`` sequences (0: all, evenly strided), in eval
        mode (no dropout, true labels); PAD codes are not counted."""
        seq, labels = strided(data, limit)
        n = seq.shape[0]
        labels = labels if self.config.num_classes else None
        was = self.model.training
        self.model.eval()
        total = torch.zeros(self.model.seq_len, dtype=torch.float64)
        count = torch.zeros(self.model.seq_len, dtype=torch.float64)
        for i in range(0, n, batch_size):
            x = seq[i : i + batch_size].to(self.device)
            y = labels[i : i + batch_size].to(self.device) if labels is not None else None
            total -= self.model.log_probs(x, y).double().sum(0).cpu() / LN2
            count += (x != PAD).sum(0).double().cpu()
        self.model.train(was)
        return total, count

    def bits_per_code(self, data: CodeData, limit: int = 0, batch_size: int = 256) -> float:
        """Mean ``-log2 p(c_t | c_<t, y)`` over the codes of ``limit`` sequences (0: all;
        :meth:`position_bits`), PAD left out."""
        total, count = self.position_bits(data, limit, batch_size)
        return float(total.sum() / count.sum().clamp_min(1))

    def evaluate(self) -> dict[str, float]:
        lim = self.tcfg.eval_sequences
        if self.objective is not None:  # the masked kind: masked cross-entropy
            cond = self.config.num_classes > 0
            test, train = strided(self.test_data, lim), strided(self.train_data, lim)
            was = self.model.training
            self.model.eval()
            try:
                return self.objective.evaluate(
                    self.model,
                    (test[0], test[1] if cond else None),
                    (train[0], train[1] if cond else None),
                )
            finally:
                self.model.train(was)
        if not self.audio:
            return {
                "test_bits": self.bits_per_code(self.test_data, lim),
                "train_bits": self.bits_per_code(self.train_data, lim),
            }
        total, count = self.position_bits(self.test_data, lim)
        bits = float(total.sum() / count.sum().clamp_min(1))
        stages = self.config.code_shape[-1]
        per_stage = stage_bits(total, count, stages)
        return {
            "test_bits": bits,
            "train_bits": self.bits_per_code(self.train_data, lim),
            **{f"test_bits_stage{s}": v for s, v in enumerate(per_stage)},
            **{f"test_{k}" if k == "kbps" else k: v
               for k, v in audio_rates(self.tokenizer.model, stages, bits).items()},
        }  # fmt: skip

    # -- the job the runtime drives (vqkit.runtime) ------------------------------------
    def train_step(self, seq: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a batch, at the rate the run loop has set; returns its
        loss (bits per code), lr, grad norm."""
        self.model.train()
        if self.objective is not None:  # the masked kind: hidden codes only
            loss = self.objective.loss(self.ddp, seq, labels if self.config.num_classes else None)
        else:  # PAD (a padded suffix, audio windows) left out of the mean
            logits = self.ddp(seq.clamp_min(0), labels if self.config.num_classes else None)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), seq.reshape(-1), ignore_index=PAD
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.tcfg.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        lr = float(self.optimizer.param_groups[0]["lr"])
        return {"bits": float(loss.detach()) / LN2, "lr": lr, "grad_norm": float(norm)}

    def update(self, batch: tuple[torch.Tensor, torch.Tensor], progress: Progress) -> StepResult:
        return StepResult(self.train_step(*batch))

    def items(self, batch: Any) -> int:
        """Codes of the global batch (the records' ``codes_per_s``)."""
        return self.tcfg.batch_size * self.world * self.model.seq_len

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        return {"bits": f"{values['bits']:.3f}"}

    def run_info(self) -> dict[str, Any]:
        return {
            "prior": self.config.to_dict(),
            "train": self.tcfg.to_dict(),
            "tokenizer": self.tokenizer.describe() if self.tokenizer is not None else None,
            "data": {
                **(self.train_data.data or {}),  # the images the codes are of
                "train_sequences": len(self.train_data),
                "test_sequences": len(self.test_data),
                "classes": list(self.train_data.classes),
            },
            "params": self.model.num_params(),
            "device": str(self.device),
        }

    def report_eval(self, result: dict[str, Any]) -> None:
        """Write the sample grid and the curves."""
        from .report import plot_prior_curves

        self.write_samples()
        plot_prior_curves(self.run.metrics_path, self.out / "curves.png")

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """Labels of the sample grid: classes in turn (None for an unconditional prior)."""
        c = self.config.num_classes
        return torch.arange(n, device=self.device) % c if c else None

    def write_samples(self) -> None:
        """Decode ``num_samples`` samples (fixed seed: comparable across evaluations) to
        ``samples/step_N.png`` and ``samples.png``. The global RNG is left alone."""
        n = self.tcfg.num_samples
        if self.tokenizer is None or n == 0:
            return
        from .report import save_grid

        g = torch.Generator(self.device).manual_seed(self.tcfg.seed)
        codes = self.model.sample(n, labels=self.sample_labels(n), generator=g)
        if self.audio:  # one window each, as WAV clips
            from ..data import write_wav

            codec = self.tokenizer.model.to(self.device)
            (self.out / "samples").mkdir(exist_ok=True)
            for i, wav in enumerate(decode_windows(codec, codes).cpu()):
                name = f"step_{self.step:07d}_{i}.wav"
                write_wav(self.out / "samples" / name, wav[0], codec.config.sample_rate)
            return
        images = self.tokenizer.model.to(self.device).decode(codes)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        save_grid(images, path)
        save_grid(images, self.out / "samples.png")
        self.run.images(self.step, "samples", images)  # to the sinks (TensorBoard), if any

    def finish(self) -> dict[str, Any]:
        """The final evaluation (the last periodic one, made at this step) to ``eval.json``."""
        last = self.last_eval
        result = (
            last if last and last["step"] == self.step else {"step": self.step, **self.evaluate()}
        )
        result = {**result, "eval_sequences": self.tcfg.eval_sequences}
        ref = self.test_data.data or {}
        result["data"] = {  # what the figures were measured on
            **{k: ref.get(k) for k in (_AUDIO_KEYS if self.audio else _IMAGE_KEYS)},
            "split": self.test_data.split,
            "num_maps": len(self.test_data),
        }
        write_json(self.out / "eval.json", result)
        return result
