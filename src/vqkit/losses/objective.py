"""The tokenizer's objective beyond MSE: reconstruction L1/L2, LPIPS, a patch discriminator.

Generator step (the tokenizer's update)::

    L_nll = rec(x, x^) + perceptual_weight * LPIPS(x, x^)
    L     = L_nll + lambda * disc_weight * L_G(D(x^)) + vq_loss     (from disc_start on)
    lambda = ||grad_w L_nll|| / (||grad_w L_G|| + 1e-4), clamped [0, 1e4]  (w: decoder's last)

Discriminator step: ``L_D(D(x), D(sg(x^))) + lecam_weight * LeCAM``; from ``disc_start`` on.
Images are on vqkit's scale [-0.5, 0.5]; LPIPS gets them doubled to [-1, 1].

:class:`LossOptions` declares the options once (the trainer composes them into its
config); :class:`VQGANLoss` holds the discriminator (its own optimizer, see
:meth:`VQGANLoss.discriminator_parameters`) and the frozen LPIPS network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..options import nonneg, option, positive_int, unit_interval_excl_one
from .adversarial import (
    DISC_LOSSES,
    DiscStartOptions,
    LeCAM,
    PatchDiscriminator,
    adaptive_weight,
    check_disc_loss,
    discriminator_loss,
    frozen,
    generator_loss,
)
from .perceptual import LPIPS, VGG16_FILE

__all__ = ["LossOptions", "VQGANLoss"]


@dataclass
class LossOptions(DiscStartOptions):
    """The reconstruction, perceptual and adversarial terms (all off by default);
    ``disc_start`` is the one declaration both jobs share (:class:`DiscStartOptions`)."""

    rec_loss: str = option("l2", "reconstruction term: l2 (MSE) or l1", choices=("l1", "l2"))
    perceptual_weight: float = option(
        0.0, "weight of the LPIPS term (needs --perceptual-weights)", check=nonneg
    )
    perceptual_weights: str = option(
        "",
        f"torchvision's ImageNet VGG16 weights file ({VGG16_FILE}) for the LPIPS term; "
        "never downloaded",
    )
    disc_weight: float = option(
        0.0, "weight of the adversarial term (0: no discriminator)", check=nonneg
    )
    disc_loss: str = option("hinge", "GAN loss: hinge or non_saturating", choices=DISC_LOSSES)
    disc_layers: int = option(
        3, "stride-2 layers of the PatchGAN discriminator", check=positive_int
    )
    disc_channels: int = option(
        64, "channels of the discriminator's first layer", check=positive_int
    )
    adaptive_disc_weight: bool = option(
        True, "scale the adversarial term by taming's adaptive weight (else by disc_weight only)"
    )
    lecam_weight: float = option(0.0, "weight of the LeCAM regulariser (0: off)", check=nonneg)
    lecam_decay: float = option(
        0.99,
        "EMA decay of LeCAM's logit anchors",
        check=unit_interval_excl_one,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise UserError(
                f"perceptual_weight > 0 needs --perceptual-weights FILE: torchvision's ImageNet "
                f"VGG16 weights ({VGG16_FILE}), downloaded by you; vqkit never downloads"
            )

    @property
    def disc_on(self) -> bool:
        return self.disc_weight > 0


class VQGANLoss(nn.Module):
    """The objective of one tokenizer. ``in_channels``: the images' channels (LPIPS and
    the perceptual term need 3)."""

    # what a resumed run is told (vqkit.training.adversarial_step.DiscriminatorStep)
    shape_flags = "--disc-layers/--disc-channels/--lecam-weight"
    off_flag = "--disc-weight 0"

    def __init__(self, options: LossOptions, in_channels: int) -> None:
        super().__init__()
        self.options = options
        self.perceptual: LPIPS | None = None
        if options.perceptual_weight > 0:
            if in_channels != 3:
                raise UserError(
                    f"the perceptual (LPIPS) term needs RGB images; the model has {in_channels} "
                    "channel(s): drop --perceptual-weight"
                )
            self.perceptual = LPIPS(options.perceptual_weights)
        self.discriminator: PatchDiscriminator | None = None
        self.lecam: LeCAM | None = None
        if options.disc_weight > 0:
            self.discriminator = PatchDiscriminator(
                in_channels, options.disc_channels, options.disc_layers
            )
            if options.lecam_weight > 0:
                self.lecam = LeCAM(options.lecam_decay)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """What the discriminator's optimizer updates (empty without a discriminator)."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.options.disc_start

    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a training checkpoint must hold: the discriminator and LeCAM's anchors (the
        frozen LPIPS network comes from its file and is not saved)."""
        state = {}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
        if self.lecam is not None:
            state["lecam"] = self.lecam.state_dict()
        return state

    def load_checkpoint_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`checkpoint_state`; ValueError when it does not fit these options."""
        own = self.checkpoint_state()
        if set(state) != set(own):
            raise UserError(
                f"the checkpoint's loss state holds {sorted(state)}, these loss options need "
                f"{sorted(own)}"
            )
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
        if self.lecam is not None:
            self.lecam.load_state_dict(state["lecam"])

    def reconstruction(
        self, x: torch.Tensor, recon: torch.Tensor, rec_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """``{"rec", "perceptual"?, "nll"}``: the non-adversarial part of the loss.
        ``rec_scale`` multiplies the L1/L2 term (``1 / data_variance`` with l2 gives
        :meth:`vqkit.models.VQVAE.loss`'s normalised MSE)."""
        if self.options.rec_loss == "l1":
            rec = F.l1_loss(recon, x) * rec_scale
        else:
            rec = F.mse_loss(recon, x) * rec_scale
        out = {"rec": rec, "nll": rec}
        if self.perceptual is not None:
            p = self.perceptual(LPIPS.from_model_scale(recon), LPIPS.from_model_scale(x)).mean()
            out["perceptual"] = p
            out["nll"] = rec + self.options.perceptual_weight * p
        return out

    def generator_loss(
        self,
        x: torch.Tensor,
        recon: torch.Tensor,
        vq_loss: torch.Tensor,
        last_layer: torch.Tensor,
        step: int,
        rec_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """The tokenizer's loss: ``{"loss", "rec", "nll", "perceptual"?, "g_loss"?,
        "d_weight"?}`` (``d_weight``: the adaptive weight times ``--disc-weight``, named
        as taming logs it, apart from the option). The discriminator is :func:`frozen`
        here: this loss reaches the tokenizer only. ``last_layer``: the decoder's last
        weight (``model.last_layer``)."""
        out = self.reconstruction(x, recon, rec_scale)
        out["loss"] = out["nll"] + vq_loss
        if not self.disc_active(step):
            return out
        assert self.discriminator is not None
        with frozen(self.discriminator):
            g = generator_loss(self.discriminator(recon), self.options.disc_loss)
        if self.options.adaptive_disc_weight and torch.is_grad_enabled():
            lam = adaptive_weight(out["nll"], g, last_layer)
        else:
            lam = torch.ones((), device=g.device)
        weight = lam * self.options.disc_weight
        out.update(g_loss=g, d_weight=weight, loss=out["loss"] + weight * g)
        return out

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int, net: nn.Module | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The discriminator's loss on real ``x`` and (detached) ``recon``:
        ``{"loss", "d_loss", "logits_real", "logits_fake", "lecam"?}``; None before
        ``disc_start`` (no discriminator step then). FloatingPointError (one line) when
        the loss is not finite, before anything is updated. ``net``: what runs the
        discriminator (its DistributedDataParallel wrapper under torchrun; default: it)."""
        if not self.disc_active(step):
            return None
        assert self.discriminator is not None
        run = self.discriminator if net is None else net
        logits_real = run(x.detach())
        logits_fake = run(recon.detach())
        d = discriminator_loss(logits_real, logits_fake, self.options.disc_loss)
        out = {
            "d_loss": d,
            "loss": d,
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        if self.lecam is not None:
            reg = self.lecam(logits_real, logits_fake)
            out.update(lecam=reg, loss=d + self.options.lecam_weight * reg)
        logits = f" (real logits {float(out['logits_real'])}, fake {float(out['logits_fake'])})"
        check_disc_loss(out["loss"], step, logits)
        return out
