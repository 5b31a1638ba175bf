"""One training step of the VQ-VAE, and the switches that make it faster.

* ``precision``: ``"fp32"`` (no autocast at all: the reference arithmetic), ``"bf16"`` or
  ``"fp16"`` through ``torch.autocast`` (the quantizer's search, rounding and loss terms
  stay in float32; the reconstruction loss is taken in float32), with a
  ``torch.amp.GradScaler`` for fp16, whose state is checkpointed;
* ``channels_last``: model and inputs in NHWC memory format (oneDNN and cuDNN convolutions
  skip their layout reorders);
* ``compile``: ``torch.compile`` of the training forward and loss (the model, quantizer
  included, traces as one graph); compiled once per run, on the first step;
* ``objective``: a loss other than :meth:`VQVAE.loss` (the adversarial / perceptual
  objective of :mod:`.adversarial_step`); the step then keeps the reconstruction (``recon``,
  detached) for the discriminator's step, and ``compile`` compiles the model's forward
  only (the loss, with its adaptive weight, runs eagerly);
* gradient-norm clipping, and the weight average (:class:`vqkit.training.optim.WeightEMA`)
  after each update. The learning rates are set by the run loop (:mod:`.loop`).

With the defaults (fp32, no channels_last, no compile, constant rate, no clipping, no
average) the step is exactly the plain one: same operations, same bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models import VQVAE, VQVAEOutput
from ..options import Options, option, unit_interval_excl_one
from .optim import WeightEMA

__all__ = ["PRECISIONS", "Objective", "StepOptions", "StepRunner"]

# a loss other than VQVAE.loss: (x, forward output, data_variance, step) -> terms, with
# "loss" (what is back-propagated), "recon_nmse" and "vq" among them
Objective = Callable[[torch.Tensor, VQVAEOutput, float, int], dict[str, torch.Tensor]]

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class StepOptions(Options):
    """How the tokenizer's step runs (declared once; composed into ``TrainConfig``)."""

    weight_ema: float = option(
        0.0,
        "decay of an exponential moving average of the weights, used for evaluation and "
        "export (0: off; e.g. 0.999)",
        check=unit_interval_excl_one,
    )
    precision: str = option(
        "fp32",
        "fp32, or bf16 / fp16 autocast (the quantizer searches in fp32; fp16 scales the loss)",
        choices=tuple(PRECISIONS),
    )
    channels_last: bool = option(False, "channels-last memory format for model and inputs")
    compile: bool = option(False, "torch.compile the training forward and loss")


class StepRunner:
    """Forward, loss, backward, update for one batch (see the module doc).

    ``model`` is the plain module (weights, EMA, clipping); ``forward`` what the step
    calls (the DistributedDataParallel wrapper under torchrun); ``options`` how the step
    runs; ``grad_clip`` the gradient-norm bound (0: none)."""

    def __init__(
        self,
        model: VQVAE,
        forward: nn.Module,
        optimizer: torch.optim.Optimizer,
        options: StepOptions,
        device: torch.device,
        objective: Objective | None = None,
        *,
        grad_clip: float = 0.0,
    ) -> None:
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.options, self.device, self.grad_clip = options, device, grad_clip
        self.dtype = PRECISIONS[options.precision]
        self.scaler: torch.amp.GradScaler | None = None
        if options.precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        self.channels_last = bool(options.channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = WeightEMA(model, options.weight_ema) if options.weight_ema else None
        self.objective = objective
        self.recon: torch.Tensor | None = None  # the last step's x^ (detached), with an objective
        self._fwd: Callable[..., Any] = self._forward_loss if objective is None else self._forward
        if options.compile:  # with an objective: the model's forward (the loss stays eager:
            # the adaptive weight's autograd.grad and the disc_start switch would break it)
            self._fwd = torch.compile(self._fwd)

    # -- the step -----------------------------------------------------------------------
    def _keep_buffers(self) -> contextlib.AbstractContextManager[Any]:
        """Compiled with an objective: AOT autograd must not donate the saved buffers of
        the backward, because the adaptive weight differentiates the graph more than once
        (``retain_graph=True``), which donated buffers refuse. (A global config read when
        the graph is compiled and again at its backward: set for the whole step only.)"""
        if not self.options.compile or self.objective is None:
            return contextlib.nullcontext()
        return torch._functorch.config.patch(donated_buffer=False)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _forward(self, x: torch.Tensor) -> VQVAEOutput:
        with self._autocast():
            out = self.forward(x)
        if self.dtype is not None:  # the reconstruction loss in float32
            out = VQVAEOutput(recon=out.recon.float(), vq=out.vq)
        return out

    def _forward_loss(
        self, x: torch.Tensor, data_variance: float
    ) -> tuple[dict[str, torch.Tensor], VQVAEOutput]:
        out = self._forward(x)
        return VQVAE.loss(out, x, data_variance), out

    def __call__(
        self, x: torch.Tensor, data_variance: float, step: int = 0
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Update on batch ``x`` at the learning rates the run loop has set; returns the
        figures of the step and the per-code counts. ``step`` (0-based) is the objective's
        (the discriminator switches on at ``disc_start``)."""
        with self._keep_buffers():
            return self._update(x, data_variance, step)

    def _update(
        self, x: torch.Tensor, data_variance: float, step: int
    ) -> tuple[dict[str, float], torch.Tensor]:
        self.model.train()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.objective is None:
            terms, out = self._fwd(x, data_variance)
        else:
            out = self._fwd(x)
            terms = self.objective(x, out, data_variance, step)
            self.recon = out.recon.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss = terms["loss"]
        grad_norm = None
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                grad_norm = self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.grad_clip:
                grad_norm = self._clip()
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        values = {k: float(v.detach()) for k, v in terms.items()}
        values["perplexity"] = float(out.vq.perplexity)
        values["usage"] = float(out.vq.usage)
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        return values, out.vq.counts

    def _clip(self) -> float:
        """Clip the global gradient norm to ``grad_clip``; returns the norm before (after
        DDP's all-reduce the gradients, hence the norm, are the same on every rank)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["weight_ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore what the checkpoint holds; returns notes on state it lacked (an option
        turned on at resume starts fresh: the scaler at its initial scale, the average
        from the current weights)."""
        notes = []
        if self.scaler is not None:
            if "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
            else:
                notes.append("fp16 gradient scaler starts at its initial scale")
        if self.ema is not None:
            if "weight_ema" in state:
                self.ema.load_state_dict(state["weight_ema"])
            else:  # from the weights just restored, not the initial ones
                self.ema = WeightEMA(self.model, self.options.weight_ema)
                notes.append("weight_ema starts from the current weights")
        return notes

    def eval_model(self, scratch: VQVAE | None) -> VQVAE:
        """The model to evaluate and export: the weight average loaded into ``scratch`` (a
        copy of the model's architecture) when there is one, else the model itself."""
        if self.ema is None or scratch is None:
            return self.model
        return self.ema.copy_to(scratch)  # type: ignore[return-value]
