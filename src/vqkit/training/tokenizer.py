"""The VQ-VAE training job: data, model, optimizer, metrics, checkpoints, pictures. It
supplies its state, step and evaluation to the runtime (:class:`vqkit.runtime.job.Job`:
process group, run directory, resume, RNG, log window, best.pt, the run loop).

A run directory holds::

    config.json          the resolved configuration
    metrics.jsonl        one JSON object per log interval ("kind": "train") and per
                         evaluation ("kind": "eval")
    checkpoints/last.pt  written atomically every ``eval_every`` steps, after
                         ``ckpt_minutes``, at the end and on Ctrl-C;
    checkpoints/best.pt  best = lowest eval NMSE among the evaluations of the final
                         objective (an adversarial run: from ``disc_start`` on)
    model.safetensors    final weights + model config (for ``vqkit.models.load_model``)
    recon.png            originals (odd rows) above reconstructions (even rows)
    curves.png           loss, NMSE, perplexity, usage against step
    usage.png            codebook-usage histogram on the eval split
    eval.json            final evaluation on the eval split
    tensorboard/         with ``--tensorboard``: the metrics records and, at each
                         evaluation, 8 eval images above their reconstructions

``resume=True`` continues from ``checkpoints/last.pt``: model, optimizer, EMA
buffers, weight average, gradient scaler, RNG, data position and log window are
restored, so the resumed run produces the same weights and records as an uninterrupted
one.

Data (:mod:`vqkit.training.data`): in memory, or streamed from shards; ``prefetch``
(:mod:`vqkit.runtime.prefetch`). The step (:mod:`vqkit.training.step`): precision,
compile, schedule, ``grad_clip``, ``weight_ema`` (evaluation, best.pt and the export
use the averaged weights). Beyond MSE: :mod:`vqkit.training.adversarial_step`.

Distributed (``torchrun --nproc_per_node=N -m vqkit train ...``): the process group
is initialised from torchrun's environment (gloo on CPU, NCCL on GPU, one GPU per
process by LOCAL_RANK); the model is wrapped in DistributedDataParallel; each rank
reads its own shard of every epoch (``batch_size`` is per rank, the global batch is
``batch_size * world_size``); the logged metrics are global (all-reduced every step,
together with the Ctrl-C flag so that all ranks stop at the same step); only rank 0
writes files and shows the progress bar. Evaluation runs on rank 0 alone, on the
unwrapped model in eval mode, which calls no collective (the EMA quantizer syncs
only in training mode), so the other ranks cannot hang on it: they simply wait at
the next step's collectives. A checkpoint resumes under any world size (the data
position is mapped to the same point of the global epoch).

Codebook health: ``init="kmeans"`` sets the codebook by k-means++ and ``init_iters``
Lloyd iterations on the initial encoder's latents of ``init_batches`` batches of all
ranks (once, at step 0); ``revive_every=N`` replaces, every N steps, the codes whose
usage statistic (the quantizer's ``code_usage()``: the EMA cluster size, the plain
quantizer's usage EMA) is below ``dead_threshold`` assignments per global batch by
latents of the current global batch, and for the gradient-trained codebook restarts
the optimizer's state of those rows (:func:`vqkit.codebook.reset_optimizer_rows`).
Every log record carries ``dead`` (codes below ``dead_threshold``), ``codes_used``,
``window_perplexity`` and ``revived``. ``preset`` picks a named set of these options
(:data:`PRESETS`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from typing import Any

import torch

from ..data import normalize
from ..data.reference import data_reference, describe_use
from ..distributed import data_parallel
from ..evaluation.reconstruction import evaluate
from ..losses import disc_start_warning
from ..models import VQVAE, VQVAEConfig, export_safetensors
from ..runtime.job import LoaderJob
from ..runtime.loop import Progress, ScheduledOptimizer, StepResult
from ..runtime.prefetch import Prefetcher
from ..runtime.schedule import Schedule
from ..runtime.window import Window
from ..storage.checkpoint import CheckpointError
from .adversarial_step import AdversarialStep
from .config import PRESETS, TrainConfig, resolve_device
from .data import load_run_data
from .health import CodebookHealth, HealthOptions, with_global_usage
from .step import StepRunner

__all__ = ["PRESETS", "TrainConfig", "Trainer", "resolve_device", "train"]


class Trainer(LoaderJob):
    """Owns one training run. ``Trainer(config).fit()``; see the module docstring."""

    kind = "vqkit-tokenizer"
    loss_key = "loss"
    best_key = "nmse"
    rate_key = "images_per_s"

    def __init__(
        self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False
    ) -> None:
        super().__init__(config, config.out_dir, resume=resume, overwrite=overwrite)
        self.ckpt_dir = self.out / "checkpoints"
        with self.setting_up():
            self._setup(config)

    def _setup(self, config: TrainConfig) -> None:
        ckpt = self.checkpoint
        with self.rank0_first():  # rank 0 loads first (and fills the decode cache)
            self.data = load_run_data(config, self.rank, self.world)
        self.eval_data, self.data_variance = self.data.eval_data, self.data.data_variance

        torch.manual_seed(config.seed)
        self.model_config = config.model_config(self.data.channels, self.data.image_size)
        self.model = VQVAE(self.model_config).to(self.device)
        q = self.model.quantizer
        vectors = config.batch_size * self.world * self.model.latent_positions()
        if ckpt is not None:  # defaults left open take the run's resolved values
            stored = ckpt.get("train_config", {})
            config = config.replace(**config.group(HealthOptions).stored_health(stored))
        self.config = self.options = config.with_health_defaults(
            q.supports_init, q.supports_revival, vectors, self.model.num_codes
        )
        self.window = Window(
            self.model.num_codes,
            self.rate_key,
            tallies=("revived",),
            per_group=q.code_groups is not None,  # the per-scale health of multiscale
        )
        self.health = CodebookHealth(self.config, q)
        if self.config.channels_last:  # before the optimizer state exists (its layout)
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self._param_groups(), lr=self.config.lr)
        # the adversarial / perceptual objective, the discriminator and its optimizer
        self.adv = AdversarialStep.build(self.config, self.model, self.data.channels, self.device)
        if self.config.eval_ssim:  # a missing package now, not at the first evaluation
            from ..evaluation.suite import check_image_metric_packages

            check_image_metric_packages()
        self.features = None  # the feature network of --eval-features (loaded once)
        if self.config.eval_features:
            from ..evaluation.feature_net import VqkitFeatures

            self.features = VqkitFeatures(self.config.eval_features).to(self.device)
        self.loader: Any = self.data.loader(
            self.config, seed=config.seed, device=self.device, rank=self.rank, world_size=self.world
        )
        if self.config.prefetch:
            self.loader = Prefetcher(self.loader)
        # the averaged weights' model: copied here, before DDP's hooks, and not built anew
        # later, which would draw from the global RNG that a resumed run must replay
        self._eval_copy = copy.deepcopy(self.model) if self.config.weight_ema else None
        objective = None if self.adv is None else self.adv.objective
        self.runner = StepRunner(
            self.model,
            self.model,
            self.optimizer,
            self.config.step_options,
            self.device,
            objective,
            grad_clip=self.config.grad_clip,
        )
        self.scheduled = ScheduledOptimizer(
            self.optimizer,
            [g.get("lr", self.config.lr) for g in self._param_groups()],
            Schedule.of(self.config),
            self.runner.scaler,
        )
        self.ddp: torch.nn.Module = self.model
        if self.world > 1:  # statistics already identical on every rank: data_parallel
            self.ddp = data_parallel(self.model, self.device)
            if self.adv is not None:
                self.adv.wrap_ddp()
        self.runner.forward = self.ddp  # what the step calls (before any compile traces it)

    def release(self) -> None:
        """Stop the data workers and let go of the DistributedDataParallel wrappers (the
        runtime then releases the directory and destroys the group: its worker threads
        are joined only once nothing holds it, see :func:`vqkit.distributed.teardown`)."""
        loader = getattr(self, "loader", None)
        if loader is not None and hasattr(loader, "close"):
            loader.close()
        if hasattr(self, "ddp"):
            self.ddp = self.runner.forward = self.model
        if getattr(self, "adv", None) is not None:
            self.adv.unwrap_ddp()

    def _param_groups(self) -> list[dict[str, Any]]:
        """One group for everything, a second at ``lr * codebook_lr_scale`` for the
        quantizer's codebook parameters when the scale is not 1."""
        if self.config.codebook_lr_scale == 1.0:
            return [{"params": list(self.model.parameters())}]
        codebook = self.model.quantizer.codebook_lr_parameters()
        ids = {id(p) for p in codebook}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest}]
        if codebook:
            groups.append(
                {"params": codebook, "lr": self.config.lr * self.config.codebook_lr_scale}
            )
        return groups

    def optimizers(self) -> list[ScheduledOptimizer]:
        """The tokenizer's optimizer, and the discriminator's when there is one."""
        return [self.scheduled, *([] if self.adv is None else self.adv.optimizers())]

    # -- state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader": self.loader.state_dict(),
            "data_variance": self.data_variance,
            **self.runner.state_dict(),
            **({} if self.adv is None else {"adversarial": self.adv.state_dict()}),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> list[str]:
        # from_dict: a checkpoint written before a config key existed gets its default
        if VQVAEConfig.from_dict(ckpt["model_config"]).to_dict() != self.model_config.to_dict():
            raise CheckpointError(
                f"{self.last_path}: the checkpoint's model config {ckpt['model_config']} "
                f"does not match this run's {self.model_config.to_dict()}"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        # options changed on resume are applied, not just recorded: the learning rates
        # come from this run's config, not from the optimizer state in the checkpoint
        for group, fresh in zip(self.optimizer.param_groups, self._param_groups(), strict=True):
            group["lr"] = fresh.get("lr", self.config.lr)
        self.loader.load_state_dict(ckpt["loader"])
        notes = self.runner.load_state_dict(ckpt)
        if self.adv is not None:
            notes += self.adv.load_state_dict(ckpt.get("adversarial"))
        return notes

    def changes_on_resume(self, ckpt: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        return self.config.resume_changes(
            ckpt.get("train_config", {}), int(ckpt.get("world_size", 1)), self.world
        )

    # -- the job the runtime drives (vqkit.runtime) ------------------------------------
    def train_step(self, x: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """One update on ``x`` (see :class:`vqkit.training.step.StepRunner`)."""
        if self.adv is None:
            return self.runner(x, self.data_variance)
        return self.adv.update(self.runner, x, self.data_variance, self.step)

    def update(self, batch: tuple[torch.Tensor, Any], progress: Progress) -> StepResult:
        if self.step == 0 and self.config.init == "kmeans":
            self.init_codebook(progress)
        values, counts = self.train_step(batch[0])
        # the EMA quantizer's counts are summed over the ranks already
        sum_counts = counts is not None and not self.model.quantizer.counts_are_global
        return StepResult(values, counts, sum_counts)

    def observe(
        self, batch: tuple[torch.Tensor, Any], values: dict[str, float], counts: Any
    ) -> None:
        x = batch[0]
        if self.world > 1:
            with_global_usage(values, counts)
        if self.health.due(self.step):
            revived = self.health.revive(
                self._latents(x), self.step, self.optimizer, self.runner.ema, self.model
            )
            self.window.tally("revived", revived)
        # the adversarial figures are averaged over the steps that had them
        self.window.add(values, counts, x.shape[0] * self.world)

    def record(self) -> dict[str, Any]:
        disc = {} if self.adv is None else self.adv.record(self.window)
        return {
            "epoch": self.loader.epoch,
            **self.health.figures(self.window.counts, self.window.group_counts),
            **disc,
        }

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        return {
            "loss": f"{values['loss']:.4f}",
            "nmse": f"{values['recon_nmse']:.4f}",
            "ppl": f"{values['perplexity']:.1f}",
            "used": f"{values['usage']:.2f}",
            **({"d": f"{values['d_loss']:.3f}"} if "d_loss" in values else {}),
        }

    def evaluate(self) -> dict[str, Any]:
        """The periodic evaluation: ``eval_images`` images of the eval split."""
        result = self.evaluate_split(limit=self.config.eval_images)
        result.pop("counts")
        result.pop("labels", None)  # in eval.json; not repeated in every record
        return result

    @property
    def best_from(self) -> int:
        """best.pt: reconstruction-only weights drop out once the discriminator is on."""
        return 0 if self.adv is None else self.adv.objective_final_from

    def report_eval(self, record: dict[str, Any]) -> None:
        if self.config.tensorboard:  # a small reconstruction grid of this evaluation
            from ..evaluation.plots import recon_pairs

            self.run.images(self.step, "eval/recon", recon_pairs(*self.reconstruct(8)))

    def reconstruct(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(originals, reconstructions) (n, C, H, W) of ``n`` eval images, evenly strided
        over the split (class-sorted data shows every class), by the evaluated weights."""
        n = min(n, len(self.eval_data))
        pick = torch.linspace(0, len(self.eval_data) - 1, n).round().long()
        x = normalize(self.eval_data.images[pick].to(self.device))
        model = self.eval_model()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            recon = model(x).recon
        model.train(was_training)
        return x, recon

    def eval_model(self) -> VQVAE:
        """The weights evaluated and exported: the weight average when there is one."""
        return self.runner.eval_model(self._eval_copy)

    def _suite(self) -> Any:
        """SSIM / MS-SSIM, FD, LPIPS (the perceptual term's network) when asked; else None."""
        lpips = None if self.adv is None else self.adv.loss.perceptual
        if not (self.config.eval_ssim or self.features is not None or lpips is not None):
            return None
        from ..evaluation.suite import QualitySuite

        feats = {} if self.features is None else {"fd_vqkit_features": self.features}
        return QualitySuite(image_metrics=self.config.eval_ssim, lpips=lpips, extractors=feats)

    def evaluate_split(self, limit: int | None = None) -> dict[str, Any]:
        """Reconstruction figures of ``limit`` eval images (None: the whole split)."""
        return evaluate(
            self.eval_model(),
            self.eval_data,
            data_variance=self.data_variance,
            device=self.device,
            limit=limit,
            suite=self._suite(),
        )

    def data_reference(self) -> dict[str, Any]:
        """The run's record of its data (:mod:`vqkit.data.reference`), carried by its
        model files so that ``vqkit eval`` and ``vqkit prior`` find the data again."""
        return data_reference(
            self.config.data,
            format=self.config.data_format,
            image_size=self.model_config.image_size,
            channels=self.model_config.in_channels,
            eval_split=self.data.eval_split,
        )

    def run_info(self) -> dict[str, Any]:
        return {
            "train": asdict(self.config),
            "model": self.model_config.to_dict(),
            "data": {
                "train": self.data.describe_train,
                "eval": self.eval_data.describe(),
                "data_variance": self.data_variance,
            },
            "device": str(self.device),
        }

    def announce(self) -> None:
        warning = disc_start_warning(self.config.loss, self.config.steps)
        if warning:
            print(f"warning: {warning}", flush=True)

    @torch.no_grad()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_latents(x)

    def init_codebook(self, progress: Progress) -> None:
        """``init="kmeans"``: k-means on the initial encoder's latents of
        :meth:`CodebookHealth.init_batch_count` batches of every rank. The batches come
        from a loader of their own (another seed, same shards), so the training stream is
        the same with and without the init."""
        loader = self.data.loader(
            self.config,
            seed=self.config.seed + 7919,
            device=self.device,
            rank=self.rank,
            world_size=self.world,
        )
        positions = self.model.latent_positions()
        n = self.health.init_batch_count(positions, self.world)
        try:
            latents = [self._latents(loader.next_batch()[0]) for _ in range(n)]
        finally:
            if hasattr(loader, "close"):
                loader.close()
        # at large K this takes minutes: say so while it runs, and how long it took
        what = (
            f"k-means init of {self.model.quantizer.num_codes} codes on "
            f"{sum(z.numel() // z.shape[1] for z in latents) * self.world} latents"
        )
        progress.phase("k-means init", f"{what} ...")
        started = time.perf_counter()
        self.health.init_codebook(latents)
        progress.write(f"{what}: {time.perf_counter() - started:.1f} s")
        progress.phase(None)

    def finish(self) -> dict[str, Any]:
        """Final evaluation on the whole eval split, weights export and pictures."""
        from ..evaluation.plots import plot_curves, plot_usage, save_recon_grid

        result = self.evaluate_split()
        counts = result.pop("counts")
        result["step"] = self.step
        ref = self.data_reference()
        result["data"] = describe_use(ref, self.data.eval_split, len(self.eval_data))
        self.run.write_json("eval.json", result)
        export_safetensors(self.eval_model(), self.out / "model.safetensors", info={"data": ref})
        save_recon_grid(*self.reconstruct(32), self.out / "recon.png")
        if (self.out / "metrics.jsonl").exists():
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        plot_usage(counts, self.out / "usage.png", title=f"{self.eval_data.split}:")
        return result


def train(
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a VQ-VAE; returns the final evaluation dict."""
    if config is None:
        config = TrainConfig.build(**overrides)
    elif overrides:
        config = TrainConfig(**{**asdict(config), **overrides})
    return Trainer(config, resume=resume, overwrite=overwrite).fit()
