"""SEANet-style 1-D convolutional encoder and decoder for audio (the EnCodec / DAC
family: Défossez et al. 2022, Kumar et al. 2023).

Encoder, for strides ``(s_1, ..., s_n)`` and ``C`` base channels::

    conv(1 -> C, k=7)
    per stage i: 3 residual units at C_i (dilations 1, 3, 9), then
                 act, conv(C_i -> 2 C_i, k=2 s_i, stride s_i)          C_i = C 2^(i-1)
    act, conv(C 2^n -> D, k=3)

The decoder mirrors it: conv(D -> C 2^n, k=7), per stage (strides reversed) act,
transposed conv(C_i -> C_i / 2, k=2 s, stride s) then 3 residual units, then act,
conv(C -> 1, k=7). No final tanh: the output is not bounded (the L1 / spectral losses
keep it near the data). A residual unit (DAC's) is ``x + conv1(act(conv7_d(act(x))))``.

Lengths. The hop is ``prod(strides)``. Every convolution is padded so that a length
``L`` that is a multiple of the hop gives exactly ``L / hop`` frames, and ``T`` frames
decode to exactly ``T * hop`` samples: a strided conv (kernel 2s, stride s) is padded by
``s`` in all, a transposed one trimmed by ``s``, a stride-1 conv of kernel k and dilation
d padded by ``(k - 1) d``. The encoder pads any other length up (zeros on the right) to
``ceil(L / hop) * hop``, so ``T = ceil(L / hop)``; whoever knows ``L`` trims the
decoder's output back (:class:`~vqkit.models.audio_codec.AudioCodec` does).

``causal=True`` puts all padding on the left (and trims transposed convs on the right):
frame t then depends on samples ``< (t + 1) hop`` only, and output sample m on frames
``<= m // hop`` only. Otherwise the padding is split, the extra sample on the left
(EnCodec's rule).

Activations: ``"elu"`` or ``"snake"`` (DAC: ``x + sin(alpha x)^2 / alpha``, one learned
alpha per channel, initialised to 1). Weight norm (``torch.nn.utils.parametrizations``)
is optional, on every convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

__all__ = [
    "ACTIVATIONS",
    "SEANetDecoder",
    "SEANetEncoder",
    "Snake1d",
    "hop_length",
    "snake",
]

ACTIVATIONS = ("elu", "snake")
DILATIONS = (1, 3, 9)
# keeps 1 / alpha finite when a learned alpha reaches 0 (DAC's constant)
SNAKE_EPS = 1e-9


def hop_length(strides: tuple[int, ...]) -> int:
    """Samples per frame: the product of the strides."""
    return math.prod(strides)


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``x + sin(alpha x)^2 / (alpha + 1e-9)``; ``x`` (B, C, T), ``alpha`` (1, C, 1)."""
    return x + (alpha + SNAKE_EPS).reciprocal() * torch.sin(alpha * x).pow(2)


class Snake1d(nn.Module):
    """DAC's periodic activation with a learned frequency ``alpha`` per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)


def _activation(kind: str, channels: int) -> nn.Module:
    return Snake1d(channels) if kind == "snake" else nn.ELU()


class _Conv(nn.Module):
    """A stride-1 or strided conv padded so that a length that is a multiple of its
    stride ``s`` gives ``length / s`` outputs (total padding ``(k-1)d + 1 - s``)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, *, stride: int = 1, dilation: int = 1,
        causal: bool, norm: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        conv = nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation)
        self.conv = _weight_norm(conv) if norm else conv
        total = (kernel - 1) * dilation + 1 - stride
        right = 0 if causal else total // 2
        self.pad = (total - right, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class _ConvTranspose(nn.Module):
    """Transposed conv (kernel 2s, stride s) trimmed by s: T frames -> T * s samples."""

    def __init__(self, cin: int, cout: int, stride: int, *, causal: bool, norm: bool) -> None:
        super().__init__()
        conv = nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride)
        self.conv = _weight_norm(conv) if norm else conv
        right = stride if causal else stride // 2
        self.trim = (stride - right, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        left, right = self.trim
        return y[..., left : y.shape[-1] - right]


class _ResidualUnit(nn.Module):
    """``x + conv1(act(conv7_dilated(act(x))))`` at constant width."""

    def __init__(self, channels: int, dilation: int, *, activation: str, causal: bool,
                 norm: bool) -> None:  # fmt: skip
        super().__init__()
        conv = {"causal": causal, "norm": norm}
        self.block = nn.Sequential(
            _activation(activation, channels),
            _Conv(channels, channels, 7, dilation=dilation, **conv),
            _activation(activation, channels),
            _Conv(channels, channels, 1, **conv),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _check(channels: int, strides: tuple[int, ...], dim: int, activation: str) -> None:
    if channels < 1 or dim < 1:
        raise ValueError(f"channels and dim must be positive; got {channels}, {dim}")
    if not strides or any(not isinstance(s, int) or s < 1 for s in strides):
        raise ValueError(f"strides must be one or more positive ints; got {strides!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}; got {activation!r}")


class SEANetEncoder(nn.Module):
    """Waveform (B, 1, L) -> latents (B, dim, ceil(L / hop)); see the module docstring.

    Args:
        channels: C, the first stage's width (doubled after every stride).
        strides: the downsampling factors, first stage first; hop = their product.
        dim: D, the latent channels (the quantizer's input).
        activation: ``"elu"`` or ``"snake"``.
        causal: all padding on the left.
        weight_norm: weight normalisation on every convolution.
    """

    def __init__(
        self,
        channels: int = 16,
        strides: tuple[int, ...] = (2, 4, 5, 8),
        dim: int = 64,
        *,
        activation: str = "elu",
        causal: bool = False,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        strides = tuple(strides)
        _check(channels, strides, dim, activation)
        self.strides = strides
        self.hop = hop_length(strides)
        conv = {"causal": causal, "norm": weight_norm}
        layers: list[nn.Module] = [_Conv(1, channels, 7, **conv)]
        c = channels
        for s in strides:
            layers += [_ResidualUnit(c, d, activation=activation, **conv) for d in DILATIONS]
            layers += [_activation(activation, c), _Conv(c, 2 * c, 2 * s, stride=s, **conv)]
            c *= 2
        layers += [_activation(activation, c), _Conv(c, dim, 3, **conv)]
        self.layers = nn.Sequential(*layers)

    def frames(self, length: int) -> int:
        """Frames for ``length`` samples: ``ceil(length / hop)``."""
        return -(-length // self.hop)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, 1, L) -> (B, dim, ceil(L / hop)); L is zero-padded up to a multiple of hop."""
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"expected a mono waveform (B, 1, L); got {tuple(wav.shape)}")
        extra = self.frames(wav.shape[-1]) * self.hop - wav.shape[-1]
        return self.layers(F.pad(wav, (0, extra)) if extra else wav)


class SEANetDecoder(nn.Module):
    """Latents (B, dim, T) -> waveform (B, 1, T * hop); the encoder's mirror (same
    arguments; ``strides`` are the encoder's, applied in reverse)."""

    def __init__(
        self,
        channels: int = 16,
        strides: tuple[int, ...] = (2, 4, 5, 8),
        dim: int = 64,
        *,
        activation: str = "elu",
        causal: bool = False,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        strides = tuple(strides)
        _check(channels, strides, dim, activation)
        self.strides = strides
        self.hop = hop_length(strides)
        conv = {"causal": causal, "norm": weight_norm}
        c = channels * 2 ** len(strides)
        layers: list[nn.Module] = [_Conv(dim, c, 7, **conv)]
        for s in reversed(strides):
            layers += [_activation(activation, c), _ConvTranspose(c, c // 2, s, **conv)]
            c //= 2
            layers += [_ResidualUnit(c, d, activation=activation, **conv) for d in DILATIONS]
        layers += [_activation(activation, c), _Conv(c, 1, 7, **conv)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, dim, T) -> (B, 1, T * hop)."""
        return self.layers(z)
