"""The adversarial parts of a VQGAN objective (Esser et al. 2021, taming-transformers).

* :class:`PatchDiscriminator`: the N-layer PatchGAN of pix2pix as taming uses it (4x4
  convs, stride 2 then 1, BatchNorm, LeakyReLU 0.2; N(0, 0.02) init), one logit per patch;
* discriminator losses: hinge ``(relu(1 - D(x)) + relu(1 + D(x^)))/2`` and
  non-saturating ``(softplus(-D(x)) + softplus(D(x^)))/2``; the generator's
  ``-D(x^)`` (hinge, as taming) or ``softplus(-D(x^))`` (non-saturating);
* :func:`adaptive_weight`: ``||grad_w L_rec|| / (||grad_w L_G|| + 1e-4)`` at the decoder's
  last weight ``w``, clamped to [0, 1e4] and detached (taming's ``calculate_adaptive_weight``);
* :class:`LeCAM`: Tseng et al. (2021)'s regulariser
  ``mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x^))^2)``;
* :func:`frozen`: the discriminator as the generator step must see it (no gradients into
  its weights, no BatchNorm statistics updated);
* what both jobs' discriminators share (the image's PatchGAN, the speech codec's
  :mod:`.audio_adversarial`): :class:`DiscStartOptions` (``disc_start``, declared once),
  :func:`disc_start_warning` and :func:`check_disc_loss` (a non-finite loss is one line).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..errors import UserError
from ..options import Options, nonneg_int, option

__all__ = [
    "DISC_LOSSES",
    "DiscStartOptions",
    "LeCAM",
    "PatchDiscriminator",
    "adaptive_weight",
    "check_disc_loss",
    "check_discriminator_fits",
    "disc_start_warning",
    "discriminator_loss",
    "frozen",
    "generator_loss",
]

DISC_LOSSES = ("hinge", "non_saturating")
MAX_ADAPTIVE_WEIGHT = 1e4  # taming's clamp


@dataclass
class DiscStartOptions(Options):
    """What every job's discriminator options share, declared once: the image's
    (:class:`~vqkit.losses.objective.LossOptions`) and the speech codec's
    (:class:`~vqkit.losses.audio_adversarial.AudioAdversarialOptions`). A subclass says
    whether its options switch a discriminator on (:attr:`disc_on`)."""

    disc_start: int = option(0, "step at which the discriminator switches on", check=nonneg_int)

    @property
    def disc_on(self) -> bool:
        """Whether these options switch a discriminator on."""
        raise NotImplementedError


def disc_start_warning(options: DiscStartOptions, steps: int) -> str | None:
    """The warning a run should print when its discriminator would never switch on."""
    if options.disc_on and options.disc_start >= steps:
        return (
            f"disc_start={options.disc_start} is not before steps={steps}: the discriminator "
            "never switches on in this run"
        )
    return None


def check_disc_loss(loss: torch.Tensor, step: int, detail: str = "") -> None:
    """FloatingPointError (one line) when a discriminator's ``loss`` is not finite, raised
    before anything is updated; ``detail``: what else the line should say (the logits)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the discriminator's loss is {value} at step {step}{detail}: lower the "
            "discriminator's learning rate or the adversarial weight"
        )


class PatchDiscriminator(nn.Module):
    """``(B, C, H, W) -> (B, 1, h, w)`` logits, one per overlapping patch.

    ``layers`` stride-2 convs (widths ``channels * min(2^n, 8)``), then a stride-1 conv and
    the stride-1 output conv; BatchNorm after every conv but the first and the last.
    For 256 px and 3 layers each logit sees a 70 x 70 patch.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1 or channels < 1 or in_channels < 1:
            raise UserError(
                f"the discriminator needs >= 1 layer, channel and input channel; got layers="
                f"{layers}, channels={channels}, in_channels={in_channels}"
            )
        seq: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(
                    channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        self.layers = layers
        for m in self.modules():  # taming's weights_init
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m.weight.is_meta:
                continue  # counted on the meta device (no values; its normal_ takes ~2 s)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @property
    def min_size(self) -> int:
        """Smallest image side it takes: ``3 * 2^layers`` (one logit after the last convs)."""
        return 3 * 2**self.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size:
            raise UserError(
                f"a {self.layers}-layer discriminator needs images of at least {self.min_size} "
                f"px; got {tuple(x.shape)}: lower --disc-layers"
            )
        return self.main(x)


def check_discriminator_fits(
    channels: int, layers: int, in_channels: int = 3, image_size: int = 0
) -> None:
    """Refuse, before anything is allocated, a discriminator whose float32 weights
    (counted on one built on the meta device) plus one image's first activation
    (``channels`` x (image_size / 2)²) exceed this machine's memory: a lower bound of
    what its training needs (no gradients, optimizer state or batch)."""
    from ..quantizers.base import check_network_memory

    with torch.device("meta"):
        net = PatchDiscriminator(in_channels, channels, layers)
    weights = 4 * sum(p.numel() for p in net.parameters())
    activation = 4 * channels * ((image_size + 1) // 2) ** 2
    check_network_memory(
        f"disc_channels {channels} with disc_layers {layers}",
        weights,
        activation,
        "use a smaller --disc-channels",
    )


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge"
) -> torch.Tensor:
    """The discriminator's loss (scalar) from its logits on real and reconstructed images."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise UserError(f"disc_loss must be one of {list(DISC_LOSSES)}; got {kind!r}")


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's adversarial loss (scalar): ``-mean D(x^)`` for hinge (taming),
    ``mean softplus(-D(x^))`` for the non-saturating loss."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise UserError(f"disc_loss must be one of {list(DISC_LOSSES)}; got {kind!r}")


def adaptive_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """``clamp(||dL_rec/dw|| / (||dL_G/dw|| + 1e-4), 0, 1e4)``, detached, at ``w =
    last_layer``: balances the adversarial gradient against the reconstruction's where
    both enter the decoder. Both losses must depend on ``last_layer``; the graph is kept."""
    if not (rec_loss.requires_grad and gan_loss.requires_grad):
        raise ValueError("the adaptive weight needs both losses to carry gradients")
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.float().norm() / (g_gan.float().norm() + 1e-4)
    return w.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``module`` gets no gradients and its BatchNorm layers normalise
    with the batch's statistics (as in training) without updating their running ones: the
    generator step leaves the discriminator exactly as it found it."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    norms = [
        (m, m.track_running_stats)
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for m, _ in norms:
            m.track_running_stats = False
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in norms:
            m.track_running_stats = flag


class LeCAM(nn.Module):
    """LeCAM regulariser with EMAs (decay ``decay``) of the mean real and fake logits;
    :meth:`forward` updates the EMAs (in training mode) and returns the penalty.

    Under torch.distributed the means are those of the GLOBAL batch (the ranks' logit
    sums and counts all-reduced in one collective; every rank must call :meth:`forward`
    in training mode together), so the anchors are identical on every rank and the one
    checkpoint (rank 0's) resumes them all exactly; in one process the local means."""

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise UserError(f"lecam decay must be in [0, 1); got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                # the first batch sets the EMAs (no bias towards the zero start)
                d = self.decay if int(self.steps) > 0 else 0.0
                real, fake = _global_means(logits_real.detach(), logits_fake.detach())
                self.ema_real.mul_(d).add_((1 - d) * real)
                self.ema_fake.mul_(d).add_((1 - d) * fake)
                self.steps += 1
        return (
            F.relu(logits_real - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - logits_fake).pow(2).mean()
        )


def _global_means(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 means of ``real`` and ``fake`` over every rank's rows (the ranks' batches
    may differ in size: sums and counts are all-reduced, in float64); the local means in
    one process."""
    if distributed.world_size() == 1:
        return real.float().mean(), fake.float().mean()
    stats = torch.stack([real.double().sum(), fake.double().sum()])
    counts = torch.tensor([real.numel(), fake.numel()], dtype=torch.float64, device=stats.device)
    total = distributed.all_reduce_sum([torch.cat([stats, counts])])[0]
    means = (total[:2] / total[2:]).float()
    return means[0], means[1]
