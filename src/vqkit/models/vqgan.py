"""The VQGAN-class encoder and decoder (Esser et al. 2021, taming-transformers' design).

* encoder: conv_in -> per level ``res_layers`` ResNet blocks (GroupNorm + SiLU, 3x3 convs,
  1x1 shortcut when the width changes; self-attention after each block of a level whose
  feature map is in ``attn_resolutions``) -> a stride-2 downsampling conv between levels
  -> middle (block, attention, block) -> GroupNorm, SiLU, conv_out;
* decoder: conv_in -> middle -> per level (deepest first) ``res_layers + 1`` blocks
  (+ attention) -> nearest x2 upsampling + conv between levels -> GroupNorm, SiLU,
  conv_out (the "last layer" of the adaptive GAN weight).

Level i has ``hidden * ch_mult[i]`` channels; ``len(ch_mult) - 1`` downsamplings give the
factor (4, 8 or 16 for 3, 4 or 5 levels). Written from the paper's description and the
layout of taming's ``Encoder``/``Decoder``; the names differ, so their checkpoints do not
load here.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

__all__ = [
    "DEFAULT_CH_MULT",
    "GROUPS",
    "AttnBlock",
    "ResnetBlock",
    "VQGANDecoder",
    "VQGANEncoder",
    "parse_attn_resolutions",
    "parse_vqgan_ch_mult",
]

GROUPS = 32  # GroupNorm groups, as taming: every level's width must be a multiple
DEFAULT_CH_MULT = {4: (1, 2, 4), 8: (1, 1, 2, 4), 16: (1, 1, 2, 2, 4)}
"""Per-level multipliers when ``channel_mult`` is '' (16: taming's ImageNet VQGAN)."""


def _ints(value: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(p.strip()) for p in value.split(",") if p.strip())
    except ValueError:
        raise UserError(f"{name} must be comma-separated ints; got {value!r}") from None


def parse_vqgan_ch_mult(value: str | Sequence[int] | None, downsample: int) -> tuple[int, ...]:
    """One multiplier per level: 3, 4 or 5 values for factor 4, 8 or 16 ('' or None:
    :data:`DEFAULT_CH_MULT`). ValueError for a wrong count or a value < 1."""
    if downsample not in DEFAULT_CH_MULT:
        raise UserError(f"downsample must be one of {tuple(DEFAULT_CH_MULT)}; got {downsample!r}")
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_CH_MULT[downsample]
    mult = _ints(value, "channel_mult") if isinstance(value, str) else tuple(map(int, value))
    levels = downsample.bit_length()  # 4 -> 3, 8 -> 4, 16 -> 5
    if len(mult) != levels or any(m < 1 for m in mult):
        raise UserError(
            f"channel_mult of the vqgan network needs {levels} positive ints for downsample "
            f"{downsample} (one per level, e.g. "
            f"{','.join(map(str, DEFAULT_CH_MULT[downsample]))}); got {value!r}"
        )
    return mult


def parse_attn_resolutions(value: str, image_size: int, downsample: int) -> tuple[int, ...]:
    """Feature-map sizes that get self-attention ('' : the lowest, ``image_size / f``)."""
    if not value.strip():
        return (image_size // downsample,)
    res = _ints(value, "attn_resolutions")
    sizes = {image_size >> i for i in range(downsample.bit_length())}
    bad = [r for r in res if r not in sizes]
    if bad:
        raise UserError(
            f"attn_resolutions {bad} are not feature-map sizes of a {image_size}-px image at "
            f"downsample {downsample} (sizes: {sorted(sizes)})"
        )
    return res


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))))))``; 1x1 shortcut if widths differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, residual:
    ``x + proj(softmax(q k^T / sqrt(C)) v)`` with q, k, v 1x1 convs of GN(x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        # (B, 1, hw, C): one head; the fused kernel, never a hand-built hw x hw softmax
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Level(nn.Module):
    def __init__(self, chans: Sequence[int], attn: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(a, b) for a, b in pairwise(chans))
        self.attn = nn.ModuleList(AttnBlock(b) for b in chans[1:]) if attn else None
        self.resample: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attn is not None:
                x = self.attn[i](x)
        return x


def _middle(channels: int) -> nn.Sequential:
    return nn.Sequential(
        ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)
    )


class _Down(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    """Nearest x2 upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQGANEncoder(nn.Module):
    """(B, C, H, W) -> (B, out_channels, H/f, W/f); ``out_channels = hidden * ch_mult[-1]``."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        res_layers: int,
        ch_mult: Sequence[int],
        image_size: int,
        attn_resolutions: Sequence[int],
    ) -> None:
        super().__init__()
        widths = [hidden * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.levels = nn.ModuleList()
        res, c = image_size, hidden
        for i, w in enumerate(widths):
            level = _Level([c] + [w] * res_layers, attn=res in attn_resolutions)
            if i < len(widths) - 1:
                level.resample = _Down(w)
                res //= 2
            self.levels.append(level)
            c = w
        self.mid = _middle(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, c, 3, padding=1)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
            if level.resample is not None:
                x = level.resample(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class VQGANDecoder(nn.Module):
    """(B, D, h, w) -> (B, out_channels, f*h, f*w); mirrors :class:`VQGANEncoder`."""

    def __init__(
        self,
        embedding_dim: int,
        hidden: int,
        out_channels: int,
        res_layers: int,
        ch_mult: Sequence[int],
        image_size: int,
        attn_resolutions: Sequence[int],
    ) -> None:
        super().__init__()
        widths = [hidden * m for m in ch_mult]
        c = widths[-1]
        res = image_size // 2 ** (len(widths) - 1)
        self.conv_in = nn.Conv2d(embedding_dim, c, 3, padding=1)
        self.mid = _middle(c)
        self.levels = nn.ModuleList()  # deepest first, the order they run in
        for i in reversed(range(len(widths))):
            w = widths[i]
            level = _Level([c] + [w] * (res_layers + 1), attn=res in attn_resolutions)
            if i > 0:
                level.resample = _Up(w)
                res *= 2
            self.levels.append(level)
            c = w
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The weight the adaptive GAN weight takes its gradient norms at."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
            if level.resample is not None:
                x = level.resample(x)
        return self.conv_out(F.silu(self.norm_out(x)))
