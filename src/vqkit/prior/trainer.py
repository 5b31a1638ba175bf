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
on the same quantity in nats). A masked prior (``kind="masked"``) is the same job with
another loss and evaluation (:class:`vqkit.prior.masked.MaskedObjective`): the
cross-entropy of the codes hidden by a mask drawn from its schedule, and in the eval
records the masked cross-entropy at fixed ratios (``test_masked_bits_25/50/90``, their
mean ``test_masked_bits`` choosing ``best.pt``), not an NLL.

Learning rate at step s (0-based) of S, warm-up W::

    lr(s) = lr * (s + 1) / W                                         s < W
    lr(s) = lr * (r + (1 - r) * (1 + cos(pi * (s - W) / (S - W))) / 2)   otherwise

with r = ``min_lr_ratio`` (:class:`vqkit.training.optim.Schedule`, set by the shared run
loop :mod:`vqkit.training.loop`, which also owns the cadence, Ctrl-C and logs). The
directory is a :class:`vqkit.storage.rundir.RunDir`: rank 0 holds its lock from
construction to the end of :meth:`PriorTrainer.fit` (or ``close()``), a fresh start
refuses a directory holding a run unless ``overwrite`` (which removes only the files
listed in :data:`ARTIFACTS`, the checkpoints and ``samples/step_*.png``).

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
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import distributed
from ..distributed import launch_rank, rank_device
from ..errors import UserError
from ..storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..storage.fileio import write_json
from ..storage.rundir import RunDir
from ..training.loop import (
    Cadence,
    LoaderJob,
    Progress,
    RunLoop,
    ScheduledOptimizer,
    StepResult,
)
from ..training.optim import Schedule
from .codes import CodeData, SequenceLoader, Tokenizer
from .config import PriorConfig, PriorTrainConfig
from .masked import MaskedObjective
from .transformer import Prior

__all__ = ["ARTIFACTS", "PriorTrainer", "lr_at"]

LN2 = math.log(2.0)
# what a prior run writes into its directory (removed by --overwrite; sample PNGs too)
ARTIFACTS = ("metrics.jsonl", "config.json", "eval.json", "curves.png", "samples.png")


def schedule_of(cfg: PriorTrainConfig) -> Schedule:
    """The prior's schedule: warm-up, then cosine decay to ``min_lr_ratio``."""
    return Schedule(cfg.steps, cfg.warmup, "cosine", cfg.min_lr_ratio)


def lr_at(step: int, cfg: PriorTrainConfig) -> float:
    """Learning rate of 0-based ``step`` (see the module docstring)."""
    return schedule_of(cfg).lr(cfg.lr, step)


def strided(data: CodeData, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences (n, T), labels (n,)) of ``limit`` sequences (0: all), evenly strided,
    so a class-sorted split (image folders) is still covered."""
    n = len(data) if limit == 0 else min(limit, len(data))
    idx = torch.linspace(0, len(data) - 1, n).round().long() if n < len(data) else slice(None)
    return data.sequences()[idx], data.labels[idx]


class PriorTrainer(LoaderJob):
    """One prior training run: ``PriorTrainer(...).fit()``; see the module docstring.

    Args:
        config: the architecture; ``vocab_size``, ``code_shape`` and ``num_classes`` are
            filled from ``train_data`` and ``tokenizer`` when left at 0 / empty.
        train_config: the training options.
        out_dir: the run directory.
        train_data, test_data: the index maps of the two splits.
        tokenizer: decodes the sample grids and is recorded (path, sha256); None: no
            pictures (e.g. synthetic codes), ``vocab_size`` must then be set.
        resume / overwrite: continue ``checkpoints/last.pt`` / start again over it.
    """

    def __init__(
        self,
        config: PriorConfig,
        train_config: PriorTrainConfig,
        out_dir: str | Path,
        train_data: CodeData,
        test_data: CodeData,
        *,
        tokenizer: Tokenizer | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.tcfg = train_config
        self.out = Path(out_dir)
        self.last_path = self.out / "checkpoints" / "last.pt"
        self.best_path = self.out / "checkpoints" / "best.pt"
        if not resume and self.last_path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.out} already holds a prior run; pass --resume to continue it or "
                "--overwrite to start again"
            )
        if resume and not self.last_path.exists():
            raise CheckpointError(f"nothing to resume: {self.last_path} does not exist")
        # one writer per run directory: rank 0 holds its lock until fit() or close() ends
        self.run = RunDir(self.out, artifacts=ARTIFACTS)
        self.is_main = launch_rank() == 0
        if self.is_main:
            self.run.prepare(resume=resume, overwrite=overwrite)
            if overwrite:
                for png in self.out.glob("samples/step_*.png"):
                    png.unlink()
        try:
            self._setup(config, train_config, train_data, test_data, tokenizer, resume)
        except BaseException:
            self.close()
            raise

    def _setup(
        self,
        config: PriorConfig,
        train_config: PriorTrainConfig,
        train_data: CodeData,
        test_data: CodeData,
        tokenizer: Tokenizer | None,
        resume: bool,
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
        if not config.num_classes and classes:
            fill["num_classes"] = classes
        self.config = PriorConfig.from_dict({**config.to_dict(), **fill}) if fill else config
        # the masked kind's loss and evaluation; None: the autoregressive kind's own
        self.objective = MaskedObjective(self.config) if self.config.masked else None
        self.best_key = self.objective.best_key if self.objective else "test_bits"
        if list(train_data.code_shape) != self.config.code_shape:
            raise UserError(
                f"codes of shape {train_data.code_shape} do not fit code_shape "
                f"{self.config.code_shape}"
            )
        self.device = rank_device(train_config.device)
        if distributed.env_world_size() > 1 and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._owns_group = distributed.init_from_env(self.device)
        self.rank, self.world = distributed.rank(), distributed.world_size()

        torch.manual_seed(train_config.seed)  # same init (and dropout draws) on every rank
        self.model = Prior(self.config).to(self.device)
        self.ddp: torch.nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(train_config.weight_decay),
            lr=train_config.lr,
            betas=(0.9, 0.95),
            fused=fused,
        )
        self.scheduled = ScheduledOptimizer(
            self.optimizer,
            [train_config.lr] * len(self.optimizer.param_groups),
            schedule_of(train_config),
        )
        self.loader = SequenceLoader(
            train_data.sequences().to(self.device),
            train_data.labels.to(self.device),
            train_config.batch_size,
            seed=train_config.seed,
            rank=self.rank,
            world_size=self.world,
        )
        self.step = 0
        self.best_bits = math.inf
        # sums of the per-step figures since the last train record (saved: a resumed
        # run logs the same averages as an uninterrupted one)
        self.window: dict[str, Any] = {"sums": {}, "n": 0}
        self.resume = resume
        if resume:
            self._restore(load_checkpoint(self.last_path, map_location=self.device))
            if self.is_main:  # the steps after the checkpoint are logged again
                self.run.truncate_metrics(self.step)

    # -- state ------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "kind": "vqkit-prior",
            "model_config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_config": self.tcfg.to_dict(),
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": rng,
            "best_bits": self.best_bits,
            "window": self.window,
            "tokenizer": self.tokenizer.describe() if self.tokenizer is not None else None,
            "classes": list(self.train_data.classes) if self.config.num_classes else [],
            "world_size": self.world,
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("kind") != "vqkit-prior":
            raise CheckpointError(f"{self.last_path} is not a prior checkpoint")
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
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.step = int(ckpt["step"])
        self.best_bits = float(ckpt.get("best_bits", math.inf))
        self.window = ckpt.get("window", {"sums": {}, "n": 0})

    def save(self, path: Path | None = None) -> None:
        """Write ``checkpoints/last.pt`` (or ``path``) atomically, on rank 0."""
        if self.is_main:
            save_checkpoint(path or self.last_path, self._payload())

    # -- metrics ----------------------------------------------------------------------
    @torch.no_grad()
    def bits_per_code(self, data: CodeData, limit: int = 0, batch_size: int = 256) -> float:
        """Mean ``-log2 p(c_t | c_<t, y)`` over the codes of ``limit`` sequences (0: all),
        in eval mode (no dropout, true labels). The subset is evenly strided, so a
        class-sorted split (image folders) is still covered."""
        seq, labels = strided(data, limit)
        n = seq.shape[0]
        labels = labels if self.config.num_classes else None
        was = self.model.training
        self.model.eval()
        total = 0.0
        for i in range(0, n, batch_size):
            x = seq[i : i + batch_size].to(self.device)
            y = labels[i : i + batch_size].to(self.device) if labels is not None else None
            total += float(-self.model.log_prob(x, y).double().sum())
        self.model.train(was)
        return total / (max(n, 1) * self.model.seq_len) / LN2

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
        return {
            "test_bits": self.bits_per_code(self.test_data, lim),
            "train_bits": self.bits_per_code(self.train_data, lim),
        }

    # -- the job the run loop drives (vqkit.training.loop) -------------------------------
    loss_key = "bits"

    def train_step(self, seq: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimizer step on a batch, at the rate the run loop has set; returns its
        loss (bits per code), lr, grad norm."""
        self.model.train()
        if self.objective is not None:  # the masked kind: hidden codes only
            loss = self.objective.loss(self.ddp, seq, labels if self.config.num_classes else None)
        else:
            logits = self.ddp(seq, labels if self.config.num_classes else None)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seq.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.tcfg.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        lr = float(self.optimizer.param_groups[0]["lr"])
        return {"bits": float(loss.detach()) / LN2, "lr": lr, "grad_norm": float(norm)}

    def update(self, batch: tuple[torch.Tensor, torch.Tensor], progress: Progress) -> StepResult:
        return StepResult(self.train_step(*batch))

    def observe(self, batch: Any, values: dict[str, float], counts: Any) -> None:
        """Add a step's figures to the log window (saved in the checkpoint: a resumed run
        logs the same averages as an uninterrupted one)."""
        sums, w = self.window["sums"], self.window
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        w["n"] += 1
        timed, since = self._timer
        self._timer = (timed + 1, since)

    def train_record(self) -> dict[str, Any]:
        timed, since = self._timer
        dt = max(time.perf_counter() - since, 1e-9)
        codes = timed * self.tcfg.batch_size * self.world * self.model.seq_len
        w = self.window
        record = {
            "epoch": self.loader.epoch,
            **{k: v / w["n"] for k, v in w["sums"].items()},
            "codes_per_s": codes / dt,
        }
        self.window = {"sums": {}, "n": 0}
        self._timer = (0, time.perf_counter())
        return record

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        return {"bits": f"{values['bits']:.3f}"}

    def periodic_eval(self) -> dict[str, Any]:
        result = self.evaluate()
        self.last_eval = {"step": self.step, **result}
        return result

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``steps`` (or stop after step ``until``, saving ``last.pt``, as an
        interruption would); returns the final evaluation (rank 0), ``{"step": ...}``
        otherwise. Tears down a process group it created."""
        try:
            return self._fit(until)
        finally:
            self.close()

    def close(self) -> None:
        """Release the run directory's lock and a process group this trainer created."""
        self.run.unlock()
        if getattr(self, "_owns_group", False):
            distributed.teardown()
            self._owns_group = False

    def __enter__(self) -> PriorTrainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run_info(self) -> dict[str, Any]:
        return {
            "prior": self.config.to_dict(),
            "train": self.tcfg.to_dict(),
            "tokenizer": self.tokenizer.describe() if self.tokenizer is not None else None,
            "data": {
                "train_sequences": len(self.train_data),
                "test_sequences": len(self.test_data),
                "classes": list(self.train_data.classes),
            },
            "params": self.model.num_params(),
            "device": str(self.device),
            "world_size": self.world,
            "global_batch_size": self.tcfg.batch_size * self.world,
            "torch": torch.__version__,
        }

    def _fit(self, until: int | None) -> dict[str, Any]:
        cfg = self.tcfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.run.write_json("config.json", self._run_info())
            if cfg.tensorboard:  # a resume truncated the metrics: the same steps are purged
                self.run.open_tensorboard()
        self._timer = (0, time.perf_counter())  # (steps timed, since)
        if not RunLoop(self, Cadence.of(cfg, "prior"), self.run, self.world).run_steps(until):
            return {"step": self.step}  # stopped at ``until`` (saved)
        result = self.finish() if self.is_main else {"step": self.step}
        distributed.barrier()  # leave together: no rank tears down while rank 0 writes
        return result

    def after_eval(self, result: dict[str, Any]) -> None:
        """Keep the best checkpoint, write the sample grid and the curves."""
        from .report import plot_prior_curves

        if result[self.best_key] < self.best_bits:
            self.best_bits = result[self.best_key]
            save_checkpoint(self.best_path, self._payload())
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
        images = self.tokenizer.model.to(self.device).decode(codes)
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        save_grid(images, path)
        save_grid(images, self.out / "samples.png")
        self.run.images(self.step, "samples", images)  # to the sinks (TensorBoard), if any

    def finish(self) -> dict[str, Any]:
        """The final evaluation (the last periodic one, made at this step) to ``eval.json``."""
        last = getattr(self, "last_eval", None)
        result = (
            last if last and last["step"] == self.step else {"step": self.step, **self.evaluate()}
        )
        result = {**result, "eval_sequences": self.tcfg.eval_sequences}
        write_json(self.out / "eval.json", result)
        return result
