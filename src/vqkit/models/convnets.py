"""Convolutional encoder and decoder of the VQ-VAE, with a configurable downsampling factor.

The classic model (van den Oord et al. 2017, CIFAR-10) downsamples by 4 with two
stride-2 convolutions. A factor of 8 or 16 adds one or two stride-2 levels after them
(and the matching transposed convolutions before the decoder's classic upsampling):

* encoder: conv1 (/2) -> conv2 (/4) -> down[0] (/8) -> down[1] (/16) -> conv3 -> residual stack
* decoder: conv1 -> residual stack -> up[0] (x2) -> up[1] (x4) -> up1 -> up2

Extra level i has ``hidden * channel_mult[i]`` channels (default multiplier 1: the classic
width throughout). For factor 4 there is no extra level at all, so parameter
names, shapes, the order in which they are created (hence their seeded initial values)
and the forward computation are exactly those of the classic model: old checkpoints load
(``down`` and ``up`` are then empty ModuleLists, which hold no parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

__all__ = [
    "DOWNSAMPLE_FACTORS",
    "Decoder",
    "Encoder",
    "ResidualBlock",
    "ResidualStack",
    "level_channels",
    "parse_channel_mult",
]

DOWNSAMPLE_FACTORS = (4, 8, 16)


def parse_channel_mult(value: str | Sequence[int] | None, downsample: int) -> tuple[int, ...]:
    """Multipliers of the extra levels: one per factor of 2 beyond 4 (0, 1 or 2 values).

    ``value``: "" or None (all 1), "2,4", or a sequence of ints. ValueError when the
    factor is not 4, 8 or 16, a multiplier is not a positive int, or the count is wrong.
    """
    if downsample not in DOWNSAMPLE_FACTORS:
        raise UserError(f"downsample must be one of {DOWNSAMPLE_FACTORS}; got {downsample!r}")
    extra = downsample.bit_length() - 3  # 4 -> 0, 8 -> 1, 16 -> 2
    if value is None or (isinstance(value, str) and not value.strip()):
        return (1,) * extra
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        mult = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        raise UserError(f"channel_mult must be comma-separated ints; got {value!r}") from None
    if any(m < 1 for m in mult):
        raise UserError(f"channel_mult values must be >= 1; got {value!r}")
    if len(mult) != extra:
        raise UserError(
            f"channel_mult needs {extra} value(s) for downsample {downsample} (one per level "
            f"beyond 4); got {value!r}"
        )
    return mult


def level_channels(hidden: int, channel_mult: Sequence[int]) -> list[int]:
    """Channels after conv2 and after each extra level: ``[hidden, hidden * m0, ...]``."""
    return [hidden] + [hidden * m for m in channel_mult]


class ResidualBlock(nn.Module):
    """``x + Conv1x1(ReLU(Conv3x3(ReLU(x))))``, convolutions without bias."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


class ResidualStack(nn.Module):
    """``layers`` residual blocks, each with its own weights, then a ReLU."""

    def __init__(self, channels: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(channels, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, out_channels, H/f, W/f), f = ``downsample``.

    ``out_channels`` is ``hidden`` times the last multiplier (``hidden`` for factor 4).
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        res_hidden: int,
        res_layers: int,
        downsample: int = 4,
        channel_mult: str | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        chans = level_channels(hidden, parse_channel_mult(channel_mult, downsample))
        self.downsample = downsample
        self.out_channels = chans[-1]
        # Creation order matters: for factor 4 it must stay conv1, conv2, conv3, res so a
        # seeded model initialises exactly as the classic one did.
        self.conv1 = nn.Conv2d(in_channels, hidden // 2, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1)
        # empty for factor 4: an empty ModuleList adds no parameters (names unchanged)
        self.down = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1) for i in range(len(chans) - 1)
        )
        self.conv3 = nn.Conv2d(chans[-1], chans[-1], 3, padding=1)
        self.res = ResidualStack(chans[-1], res_hidden, res_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        for conv in self.down:
            x = F.relu(conv(x))
        return self.res(self.conv3(x))


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, C, f*h, f*w), f = ``downsample``; mirrors :class:`Encoder`."""

    def __init__(
        self,
        embedding_dim: int,
        hidden: int,
        out_channels: int,
        res_hidden: int,
        res_layers: int,
        downsample: int = 4,
        channel_mult: str | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        chans = level_channels(hidden, parse_channel_mult(channel_mult, downsample))
        self.downsample = downsample
        # Same creation order as the classic decoder for factor 4: conv1, res, up1, up2.
        self.conv1 = nn.Conv2d(embedding_dim, chans[-1], 3, padding=1)
        self.res = ResidualStack(chans[-1], res_hidden, res_layers)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chans[i], chans[i - 1], 4, stride=2, padding=1)
            for i in range(len(chans) - 1, 0, -1)
        )
        self.up1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(hidden // 2, out_channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.res(self.conv1(z))
        for conv in self.up:
            x = F.relu(conv(x))
        return self.up2(F.relu(self.up1(x)))
