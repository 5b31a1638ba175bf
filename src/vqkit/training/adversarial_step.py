"""The adversarial part of both training jobs: a discriminator's own optimizer, step, DDP
wrapper, figures and checkpoint state (:class:`DiscriminatorStep`, shared by the image
tokenizer and the speech codec), and the image tokenizer's adversarial and perceptual
objective on top of it (:class:`AdversarialStep`).

The speech codec job (:mod:`.audio_trainer`) builds a :class:`DiscriminatorStep` over an
:class:`~vqkit.losses.audio_adversarial.AudioAdversarialLoss` when ``--audio-disc`` names
discriminators; its generator terms (adversarial and feature matching) join the codec's
loss in its own update, and the discriminators then take this step on the same padded
crops and (detached) reconstruction, from ``--disc-start`` on.

The tokenizer job (:mod:`.tokenizer`) builds an :class:`AdversarialStep` when its
objective is more than the classic normalised MSE (``rec_loss="l1"``, a perceptual term or
a discriminator: :func:`objective_is_plain`); with the defaults it builds none and its step
is exactly the classic one. On the shared run loop (:mod:`vqkit.runtime.loop`) one
training step is::

    generator:      L = rec(x, x^) [+ w_p LPIPS] + lambda w_d L_G(D(x^)) + vq_loss
                    (StepRunner: forward, backward, the tokenizer's optimizer; D frozen)
    discriminator:  L_D(D(x), D(sg(x^))) [+ w_l LeCAM]    from --disc-start on
                    (its own Adam over D's parameters; the same batch and x^ as above)

``x^`` is the reconstruction of the generator's forward (computed before its update and
detached): one forward of the tokenizer per step, so the EMA codebook sees each batch
once. The run loop sets both optimizers' learning rates (two ``ScheduledOptimizer``: the
discriminator's base rate is ``disc_lr``, its schedule the generator's); the step's
figures of both go through the loop's one all-reduce.

Distributed: the discriminator is wrapped in DistributedDataParallel for its own step
(its gradients averaged over the ranks as the tokenizer's are); the generator step calls
the unwrapped, frozen network (no gradient reaches its weights, so DDP has nothing to
reduce there). Its BatchNorm layers normalise with each rank's own batch, as taming's
(Lightning DDP without SyncBatchNorm) does: SyncBatchNorm would add an all-reduce per
BatchNorm layer per forward (3 layers x 3 forwards a step) and change the recipe being
reproduced. The running statistics are never used (the discriminator is only run in
training mode) and are not broadcast (``forward_sync_buffers=False``); rank 0's are saved.
LeCAM's anchors, which the loss does use, are EMAs of the global batch's mean logits (one
all-reduce in :class:`~vqkit.losses.adversarial.LeCAM`): the same on every rank, so rank
0's saved anchors resume every rank exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import data_parallel
from ..losses import LossOptions, VQGANLoss
from ..models import VQVAE, VQVAEOutput
from ..options import Options, option, positive, unit_interval_excl_one
from ..runtime.loop import ScheduledOptimizer
from ..runtime.schedule import Schedule
from ..runtime.window import Window
from ..storage.checkpoint import CheckpointError
from .step import PRECISIONS, StepRunner

__all__ = [
    "AdversarialStep",
    "DiscriminatorOptimOptions",
    "DiscriminatorStep",
    "objective_is_plain",
]


@dataclass
class DiscriminatorOptimOptions(Options):
    """The discriminator's optimizer (Adam), declared once; composed into both jobs'
    configs (``TrainConfig``, ``AudioTrainConfig``)."""

    disc_lr: float = option(
        None,
        "learning rate of the discriminator's Adam (default: --lr); it follows the "
        "generator's schedule (--warmup-steps, --lr-schedule)",
        type=float,
        check=positive,
    )
    disc_beta1: float = option(
        0.5, "Adam beta1 of the discriminator (taming: 0.5)", check=unit_interval_excl_one
    )
    disc_beta2: float = option(
        0.9, "Adam beta2 of the discriminator (taming: 0.9)", check=unit_interval_excl_one
    )


def objective_is_plain(config: Any) -> bool:
    """True when the objective is the classic ``mse / data_variance + vq_loss``
    (:meth:`VQVAE.loss`): no L1, no perceptual term, no discriminator."""
    return config.rec_loss == "l2" and config.perceptual_weight == 0 and config.disc_weight == 0


class DiscriminatorStep:
    """A discriminator's own optimizer, step, DDP wrapper and checkpoint state: what both
    jobs' adversarial training shares (the image tokenizer's, :class:`AdversarialStep`;
    the speech codec's, :mod:`.audio_trainer`).

    ``loss``: the module holding the discriminator (``VQGANLoss``, or
    ``AudioAdversarialLoss``): its ``discriminator`` (None: no optimizer, no step),
    ``options.disc_start``, ``discriminator_parameters()``, ``discriminator_loss(x,
    recon, step, net=)`` (``{"loss", figures...}``, None before ``disc_start``),
    ``checkpoint_state()`` / ``load_checkpoint_state()`` and the flags named when a
    resumed run's do not fit (``shape_flags``, ``off_flag``). ``optim``: the optimizer's
    options; ``schedule`` and ``lr``: the run's schedule and (default) base rate;
    ``dtype``: the autocast dtype of the run (None: fp32; fp16 gives the discriminator
    its own gradient scaler)."""

    def __init__(
        self,
        loss: nn.Module,
        optim: DiscriminatorOptimOptions,
        device: torch.device,
        dtype: torch.dtype | None = None,
        *,
        schedule: Schedule,
        lr: float,
    ) -> None:
        self.loss: Any = loss.to(device)
        self.device, self.dtype = device, dtype
        self.net: nn.Module | None = self.loss.discriminator  # the DDP wrapper under torchrun
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduled: ScheduledOptimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        params = self.loss.discriminator_parameters()
        if params:
            lr = lr if optim.disc_lr is None else optim.disc_lr
            self.optimizer = torch.optim.Adam(
                params, lr=lr, betas=(optim.disc_beta1, optim.disc_beta2)
            )
            if dtype == torch.float16:
                self.scaler = torch.amp.GradScaler(device.type)
            self.scheduled = ScheduledOptimizer(self.optimizer, [lr], schedule, self.scaler)

    @property
    def objective_final_from(self) -> int:
        """The first step whose objective is the run's final one: ``disc_start`` with a
        discriminator (before it the model trains on reconstruction alone, and a lower
        reconstruction error there is not a better model of this objective), else 0."""
        return self.loss.options.disc_start if self.loss.discriminator is not None else 0

    def optimizers(self) -> list[ScheduledOptimizer]:
        """The discriminator's scheduled optimizer (none without a discriminator)."""
        return [] if self.scheduled is None else [self.scheduled]

    def wrap_ddp(self) -> None:
        """Wrap the discriminator in DistributedDataParallel (under torchrun; module doc)."""
        if self.loss.discriminator is None:
            return
        self.net = data_parallel(self.loss.discriminator, self.device)

    def unwrap_ddp(self) -> None:
        """Drop the DistributedDataParallel wrapper (the job is closing its group)."""
        self.net = self.loss.discriminator

    def record(self, window: Window) -> dict[str, int]:
        """A train record's ``disc_steps``: the window's steps with a discriminator update
        (its figures are averaged over those steps only); none without a discriminator."""
        return {} if self.optimizer is None else {"disc_steps": window.steps("d_loss")}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def discriminator_step(
        self, x: torch.Tensor, recon: torch.Tensor, step: int
    ) -> dict[str, float]:
        """One update of the discriminator on real ``x`` and the (detached) reconstructions
        ``recon``, at the rate the run loop has set; ``{}`` before ``disc_start``.
        FloatingPointError (one line) on a non-finite loss, before anything is updated."""
        if self.optimizer is None or self.net is None:
            return {}
        self.loss.train()
        with self._autocast():
            d = self.loss.discriminator_loss(x, recon.detach(), step, net=self.net)
        if d is None:
            return {}
        self.optimizer.zero_grad(set_to_none=True)
        loss = d["loss"].float()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return {k: float(v.detach()) for k, v in d.items() if k != "loss"}

    # -- checkpoint -----------------------------------------------------------------------
    @staticmethod
    def dropped_note(loss: Any) -> str:
        """The note of a resumed run without the discriminator its checkpoint holds
        (``loss``: the loss module or its class, for its ``off_flag``)."""
        return f"the checkpoint's discriminator is dropped ({loss.off_flag})"

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"loss": self.loss.checkpoint_state()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any] | None) -> list[str]:
        """Restore :meth:`state_dict`; returns notes on what starts fresh (a discriminator
        switched on at resume). CheckpointError when the saved one does not fit these options."""
        if not state or not state.get("loss"):
            return ["the discriminator starts fresh"] if self.optimizer is not None else []
        if self.optimizer is None:
            return [self.dropped_note(self.loss)]
        try:
            self.loss.load_checkpoint_state(state["loss"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"the checkpoint's discriminator does not fit these options ({first}); "
                f"resume with the run's {self.loss.shape_flags}"
            ) from None
        notes = []
        if self.scaler is not None:
            if "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
            else:
                notes.append("the discriminator's fp16 gradient scaler starts at its initial scale")
        return notes


class AdversarialStep(DiscriminatorStep):
    """The image tokenizer's adversarial step (module doc): :class:`DiscriminatorStep`
    over a :class:`~vqkit.losses.VQGANLoss`, with the generator's objective and the
    update of both. ``loss``: the loss terms' options; ``optim``: the discriminator's
    optimizer's; ``model``: the plain tokenizer (its ``last_layer`` for the adaptive
    weight); ``schedule``, ``lr``, ``dtype``: :class:`DiscriminatorStep`'s."""

    def __init__(
        self,
        loss: LossOptions,
        optim: DiscriminatorOptimOptions,
        model: VQVAE,
        in_channels: int,
        device: torch.device,
        dtype: torch.dtype | None,
        *,
        schedule: Schedule,
        lr: float,
    ) -> None:
        super().__init__(
            VQGANLoss(loss, in_channels), optim, device, dtype, schedule=schedule, lr=lr
        )
        self.options, self.model = loss, model

    @classmethod
    def build(
        cls, config: Any, model: VQVAE, in_channels: int, device: torch.device
    ) -> AdversarialStep | None:
        """The run's adversarial step from its flat ``TrainConfig`` (its typed groups);
        None with the classic objective (whose step then stays exactly the classic one)."""
        if objective_is_plain(config):
            return None
        return cls(
            config.loss,
            config.disc_optim,
            model,
            in_channels,
            device,
            PRECISIONS[config.precision],
            schedule=Schedule.of(config),
            lr=config.lr,
        )

    # -- the generator's objective (called by StepRunner) ---------------------------------
    def objective(
        self, x: torch.Tensor, out: VQVAEOutput, data_variance: float, step: int
    ) -> dict[str, torch.Tensor]:
        """The tokenizer's loss terms on batch ``x`` (B, C, H, W) and its forward ``out``:
        ``{"loss", "recon_nmse", "vq", "rec", "perceptual"?, "g_loss"?, "d_weight"?}``.
        ``rec`` is ``mse / data_variance`` (l2) or the mean absolute error (l1);
        ``recon_nmse`` (logged for every objective) is ``mse / data_variance``."""
        if not data_variance > 0:
            raise ValueError(f"data_variance must be > 0; got {data_variance}")
        scale = 1.0 / data_variance if self.options.rec_loss == "l2" else 1.0
        with self._autocast():
            g = self.loss.generator_loss(
                x, out.recon, out.vq.loss, self.model.last_layer, step, rec_scale=scale
            )
        terms = {k: v.float() for k, v in g.items() if k != "nll"}
        terms["recon_nmse"] = F.mse_loss(out.recon.detach(), x) / data_variance
        terms["vq"] = out.vq.loss
        return terms

    # -- the update of both ---------------------------------------------------------
    def update(
        self, runner: StepRunner, x: torch.Tensor, data_variance: float, step: int
    ) -> tuple[dict[str, float], torch.Tensor]:
        """One training step: the generator's update (``runner``, with :meth:`objective`),
        then the discriminator's on the same batch and reconstruction."""
        values, counts = runner(x, data_variance, step)
        assert runner.recon is not None
        values.update(self.discriminator_step(x, runner.recon, step))
        return values, counts
