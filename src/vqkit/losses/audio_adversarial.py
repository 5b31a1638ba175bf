"""The speech codec's discriminators and adversarial terms (issue 35, its second part).

* :class:`MultiPeriodDiscriminator` (HiFi-GAN, Kong et al. 2020): for each period p in
  2, 3, 5, 7, 11 the waveform (B, 1, L), reflect-padded to a multiple of p, is folded to
  (B, 1, L / p, p) and read by 2-D convolutions of kernel (5, 1), stride (3, 1), so every
  column sees the samples p apart; LeakyReLU 0.1, weight norm, a (3, 1) output conv.
* :class:`MultiScaleSTFTDiscriminator` (EnCodec, Défossez et al. 2022): for each STFT
  resolution (n_fft, hop, window) the complex spectrogram's real and imaginary parts,
  (B, 2, frames, bins), are read by 2-D convolutions of kernel (3, 9), stride (1, 2) along
  frequency and dilations 1, 2, 4 along time; LeakyReLU 0.2, weight norm, a (3, 3)
  output conv.

Each discriminator returns, per sub-discriminator, its logits and the feature maps of
its hidden layers (``DiscOutput``). The terms (EnCodec's):

* hinge: discriminator ``1/K sum_k mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x^)))``,
  generator ``1/K sum_k mean(relu(1 - D_k(x^)))``;
* least squares (HiFi-GAN): ``mean((1 - D_k(x))^2) + mean(D_k(x^)^2)`` and
  ``mean((1 - D_k(x^))^2)``;
* feature matching: ``1/(K L) sum_k sum_l mean|D_k^l(x) - D_k^l(x^)| / mean|D_k^l(x)|``,
  the L1 distance of each layer normalised by the real features' mean magnitude, so
  layers and discriminators of different scales weigh alike (EnCodec's ``L_feat``).

:class:`AudioAdversarialLoss` is the speech codec job's use of them
(:mod:`vqkit.training.audio_trainer`, options :class:`AudioAdversarialOptions`): the
discriminators ``--audio-disc`` names (:class:`AudioDiscriminator`: their
sub-discriminators in one list), from ``disc_start`` on the generator's
``adv_weight * L_adv + feat_match_weight * L_feat`` with the discriminators frozen, and
the discriminators' own loss; real and fake crops go through one forward each time (no
layer mixes the rows of a batch, so the concatenation is two forwards' result).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..errors import UserError
from ..options import nonneg, option, positive_int
from .adversarial import DiscStartOptions, check_disc_loss, frozen

__all__ = [
    "AUDIO_DISCS",
    "AUDIO_DISC_LOSSES",
    "AudioAdversarialLoss",
    "AudioAdversarialOptions",
    "AudioDiscriminator",
    "DiscOutput",
    "MultiPeriodDiscriminator",
    "MultiScaleSTFTDiscriminator",
    "PeriodDiscriminator",
    "STFTDiscriminator",
    "audio_discriminator_loss",
    "audio_generator_loss",
    "feature_matching_loss",
]

AUDIO_DISC_LOSSES = ("hinge", "least_squares")
AUDIO_DISCS = ("none", "mpd", "stft", "mpd+stft")

# one sub-discriminator's (logits, hidden feature maps)
DiscOutput = tuple[torch.Tensor, list[torch.Tensor]]


def _check_wave(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"expected a mono waveform batch (B, 1, L); got {shape}")


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN's sub-discriminator of one ``period`` (module docstring). ``channels``:
    the widths of the strided convs (HiFi-GAN: 32, 128, 512, 1024), a last conv of the
    same width as the widest at stride 1, then the 1-channel output."""

    def __init__(self, period: int, channels: Sequence[int] = (32, 128, 512, 1024)) -> None:
        super().__init__()
        if period < 1:
            raise UserError(f"period must be >= 1; got {period}")
        self.period = period
        widths = [1, *channels]
        convs = [
            weight_norm(nn.Conv2d(a, b, (5, 1), (3, 1), padding=(2, 0)))
            for a, b in zip(widths, widths[1:], strict=False)
        ]
        convs.append(weight_norm(nn.Conv2d(widths[-1], widths[-1], (5, 1), 1, padding=(2, 0))))
        self.convs = nn.ModuleList(convs)
        self.post = weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> DiscOutput:
        """Waveform (B, 1, L) -> logits (B, 1, ceil(L/p) / 3^n, p) and the features."""
        b, c, n = x.shape
        pad = (-n) % self.period
        if pad:  # reflect needs pad < n; a shorter input is padded with zeros
            x = F.pad(x, (0, pad), mode="reflect" if pad < n else "constant")
        h = x.reshape(b, c, -1, self.period)
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            feats.append(h)
        return self.post(h), feats


class MultiPeriodDiscriminator(nn.Module):
    """One :class:`PeriodDiscriminator` per period (HiFi-GAN: 2, 3, 5, 7, 11)."""

    def __init__(
        self,
        periods: Sequence[int] = (2, 3, 5, 7, 11),
        channels: Sequence[int] = (32, 128, 512, 1024),
    ) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, x: torch.Tensor) -> list[DiscOutput]:
        _check_wave(x)
        return [d(x) for d in self.discriminators]


class STFTDiscriminator(nn.Module):
    """EnCodec's sub-discriminator of one STFT resolution (module docstring):
    ``channels`` wide throughout (EnCodec: 32)."""

    def __init__(self, n_fft: int, hop: int, win: int, channels: int = 32) -> None:
        super().__init__()
        if not 1 <= hop <= win <= n_fft:
            raise UserError(f"STFT needs 1 <= hop <= win <= n_fft; got {n_fft}:{hop}:{win}")
        self.n_fft, self.hop, self.win = n_fft, hop, win
        self.register_buffer("window", torch.hann_window(win), persistent=False)
        c = channels
        self.convs = nn.ModuleList(
            [
                weight_norm(nn.Conv2d(2, c, (3, 9), padding=(1, 4))),
                *(
                    weight_norm(nn.Conv2d(c, c, (3, 9), (1, 2), padding=(d, 4), dilation=(d, 1)))
                    for d in (1, 2, 4)
                ),
                weight_norm(nn.Conv2d(c, c, (3, 3), padding=(1, 1))),
            ]
        )
        self.post = weight_norm(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> DiscOutput:
        """Waveform (B, 1, L) -> logits (B, 1, frames, ~bins / 8) and the features."""
        spec = torch.stft(
            x[:, 0].to(torch.float32),
            self.n_fft,
            self.hop,
            self.win,
            self.window,
            center=True,
            pad_mode="constant",  # reflect would need L > n_fft / 2
            return_complex=True,
        )  # (B, bins, frames)
        h = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # (B, 2, frames, bins)
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.post(h), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    """One :class:`STFTDiscriminator` per ``(n_fft, hop, win)`` resolution (EnCodec at
    24 kHz: 2048, 1024, 512, 256, 128 with hop n_fft / 4; at 8 kHz fewer and smaller)."""

    def __init__(
        self,
        resolutions: Sequence[tuple[int, int, int]] = (
            (512, 128, 512),
            (256, 64, 256),
            (128, 32, 128),
        ),
        channels: int = 32,
    ) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(n, h, w, channels) for n, h, w in resolutions
        )

    def forward(self, x: torch.Tensor) -> list[DiscOutput]:
        _check_wave(x)
        return [d(x) for d in self.discriminators]


def _check_kind(kind: str) -> None:
    if kind not in AUDIO_DISC_LOSSES:
        raise UserError(f"disc_loss must be one of {list(AUDIO_DISC_LOSSES)}; got {kind!r}")


def audio_discriminator_loss(
    real: list[DiscOutput], fake: list[DiscOutput], kind: str = "hinge"
) -> torch.Tensor:
    """The discriminators' loss (module docstring), averaged over the K
    sub-discriminators; ``fake`` from the detached reconstruction."""
    _check_kind(kind)
    terms = []
    for (lr, _), (lf, _) in zip(real, fake, strict=True):
        if kind == "hinge":
            terms.append(F.relu(1 - lr).mean() + F.relu(1 + lf).mean())
        else:
            terms.append(((1 - lr) ** 2).mean() + (lf**2).mean())
    return torch.stack(terms).mean()


def audio_generator_loss(fake: list[DiscOutput], kind: str = "hinge") -> torch.Tensor:
    """The codec's adversarial term, averaged over the K sub-discriminators."""
    _check_kind(kind)
    if kind == "hinge":
        terms = [F.relu(1 - lf).mean() for lf, _ in fake]
    else:
        terms = [((1 - lf) ** 2).mean() for lf, _ in fake]
    return torch.stack(terms).mean()


def feature_matching_loss(real: list[DiscOutput], fake: list[DiscOutput]) -> torch.Tensor:
    """EnCodec's normalised feature matching (module docstring): the mean over every
    sub-discriminator's hidden layers of ``mean|f_real - f_fake| / mean|f_real|`` (the
    real features detached: they are targets)."""
    terms = []
    for (_, fr), (_, ff) in zip(real, fake, strict=True):
        for a, b in zip(fr, ff, strict=True):
            a = a.detach()
            terms.append((a - b).abs().mean() / a.abs().mean().clamp(min=1e-8))
    return torch.stack(terms).mean()


@dataclass
class AudioAdversarialOptions(DiscStartOptions):
    """The speech codec's discriminators and adversarial terms (off by default);
    ``disc_start`` is the image job's declaration (:class:`DiscStartOptions`), and the
    discriminators' optimizer is the image job's too
    (:class:`vqkit.training.adversarial_step.DiscriminatorOptimOptions`: ``disc_lr``,
    ``disc_beta1``, ``disc_beta2``). The weights are starting points, not tuned."""

    audio_disc: str = option(
        "none",
        "audio: the codec's discriminators: none, mpd (HiFi-GAN's multi-period), stft "
        "(EnCodec's multi-scale STFT) or mpd+stft",
        choices=AUDIO_DISCS,
    )
    audio_disc_loss: str = option(
        "hinge",
        "audio: the discriminators' loss: hinge (EnCodec) or least_squares (HiFi-GAN)",
        choices=AUDIO_DISC_LOSSES,
    )
    audio_disc_channels: int = option(
        32,
        "audio: the discriminators' width c: the multi-period one's convs c, 4c, 16c, 32c "
        "(HiFi-GAN: 32), the STFT one's c throughout (EnCodec: 32)",
        check=positive_int,
    )
    adv_weight: float = option(
        1.0, "audio: weight of the adversarial term of the codec's loss", check=nonneg
    )
    feat_match_weight: float = option(
        1.0,
        "audio: weight of the (normalised) feature-matching term of the codec's loss",
        check=nonneg,
    )

    @property
    def disc_on(self) -> bool:
        return self.audio_disc != "none"


class AudioDiscriminator(nn.Module):
    """The discriminators ``kinds`` names (``"mpd"``, ``"stft"``, ``"mpd+stft"``) at width
    ``channels`` (:class:`AudioAdversarialOptions`); ``forward`` returns every
    sub-discriminator's output, the multi-period ones first."""

    def __init__(self, kinds: str = "mpd+stft", channels: int = 32) -> None:
        super().__init__()
        if kinds not in AUDIO_DISCS[1:]:
            raise UserError(f"audio_disc must be one of {list(AUDIO_DISCS[1:])}; got {kinds!r}")
        nets: list[nn.Module] = []
        if "mpd" in kinds.split("+"):
            c = channels
            nets.append(MultiPeriodDiscriminator(channels=(c, 4 * c, 16 * c, 32 * c)))
        if "stft" in kinds.split("+"):
            nets.append(MultiScaleSTFTDiscriminator(channels=channels))
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> list[DiscOutput]:
        return [out for net in self.nets for out in net(x)]


def _split(outs: list[DiscOutput], n: int) -> tuple[list[DiscOutput], list[DiscOutput]]:
    """The outputs of a forward on ``cat([real, fake])`` as (real's, fake's): rows ``:n``
    and ``n:`` of every logit and feature map."""
    real = [(lg[:n], [f[:n] for f in fs]) for lg, fs in outs]
    fake = [(lg[n:], [f[n:] for f in fs]) for lg, fs in outs]
    return real, fake


class AudioAdversarialLoss(nn.Module):
    """The speech codec's adversarial terms (module docstring). ``x`` and ``recon`` are
    (B, 1, L) crops whose padding the caller has zeroed in both (the discriminators then
    see zeros past every clip's end, real and fake alike)."""

    # what a resumed run is told (vqkit.training.adversarial_step.DiscriminatorStep)
    shape_flags = "--audio-disc/--audio-disc-channels"
    off_flag = "--audio-disc none"

    def __init__(self, options: AudioAdversarialOptions) -> None:
        super().__init__()
        self.options = options
        self.discriminator: AudioDiscriminator | None = None
        if options.disc_on:
            self.discriminator = AudioDiscriminator(options.audio_disc, options.audio_disc_channels)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """What the discriminators' optimizer updates (empty without discriminators)."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.options.disc_start

    def checkpoint_state(self) -> dict[str, Any]:
        """What a training checkpoint holds: the discriminators' weights (none without)."""
        if self.discriminator is None:
            return {}
        return {"discriminator": self.discriminator.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state`; ValueError / RuntimeError when it does not fit."""
        if set(state) != set(self.checkpoint_state()):
            raise UserError(f"the checkpoint's loss state holds {sorted(state)}")
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])

    def generator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "g_adv", "feat_match"}`` from ``disc_start`` on (``loss``: their
        weighted sum, to add to the codec's), ``{}`` before. The discriminators are
        :func:`frozen`: this loss reaches the codec only."""
        if not self.disc_active(step):
            return {}
        assert self.discriminator is not None
        with frozen(self.discriminator):
            real, fake = _split(self.discriminator(torch.cat([x.detach(), recon])), len(x))
        o = self.options
        g = audio_generator_loss(fake, o.audio_disc_loss)
        fm = feature_matching_loss(real, fake)
        return {"loss": o.adv_weight * g + o.feat_match_weight * fm, "g_adv": g, "feat_match": fm}

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, step: int, net: nn.Module | None = None
    ) -> dict[str, torch.Tensor] | None:
        """``{"loss", "d_loss"}`` on real ``x`` and (detached) ``recon``; None before
        ``disc_start``. ``net``: what runs the discriminators (their DistributedDataParallel
        wrapper under torchrun; default: them). FloatingPointError (one line) when the loss
        is not finite, before anything is updated."""
        if not self.disc_active(step):
            return None
        run = self.discriminator if net is None else net
        assert run is not None
        real, fake = _split(run(torch.cat([x.detach(), recon.detach()])), len(x))
        d = audio_discriminator_loss(real, fake, self.options.audio_disc_loss)
        check_disc_loss(d, step)
        return {"loss": d, "d_loss": d}
