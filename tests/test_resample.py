"""vqkit.data.resample against float64 references: tones keep their frequency and
amplitude, a tone above the new Nyquist rate is removed, and the outputs equal
scipy.signal.resample_poly's (the same filter and alignment) where scipy is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vqkit.data.resample import lowpass_filter, resample, resampled_length
from vqkit.errors import UserError


def tone(freq: float, rate: int, n: int) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) / rate
    return torch.sin(2 * math.pi * freq * t)


@pytest.mark.parametrize(
    "orig,new,freq",
    [(8000, 16000, 440.0), (16000, 8000, 3000.0), (44100, 16000, 1234.5), (8000, 24000, 2500.0)],
)
def test_tone_kept(orig, new, freq):
    x = tone(freq, orig, orig)  # one second
    y = resample(x, orig, new)
    assert y.shape == (resampled_length(orig, orig, new),) == (new,)
    ref = tone(freq, new, new)
    inner = slice(new // 10, -new // 10)  # away from the edges' zero padding
    assert (y[inner] - ref[inner]).abs().max() < 2e-3
    # frequency: the spectrum's peak bin (1 Hz bins over one second)
    peak = int(
        torch.fft.rfft(y[inner] * torch.hann_window(y[inner].numel(), dtype=y.dtype)).abs().argmax()
    )
    assert abs(peak / (y[inner].numel() / new) - freq) < 2


def test_no_aliasing_above_nyquist():
    # 6 kHz at 16 kHz has no place at 8 kHz: it must vanish, not fold to 2 kHz
    x = tone(6000.0, 16000, 16000)
    y = resample(x, 16000, 8000)[800:-800]
    assert y.pow(2).mean().sqrt() < 0.01 * math.sqrt(0.5)


def test_dtype_batch_and_identity():
    x = torch.randn(2, 3, 500)
    y = resample(x, 8000, 16000)
    assert y.shape == (2, 3, 1000) and y.dtype == torch.float32
    y64 = resample(x.double(), 8000, 16000)
    assert (y - y64).abs().max() < 1e-5
    assert torch.equal(resample(x[0, 0], 8000, 16000), y[0, 0])
    assert resample(x, 16000, 16000) is x
    assert lowpass_filter(3, 2).sum().item() == pytest.approx(3.0)
    with pytest.raises(UserError, match="orig_rate"):
        resample(x, 0, 8000)
    with pytest.raises(UserError, match="floating-point"):
        resample(torch.zeros(3, dtype=torch.int16), 8000, 16000)


@pytest.mark.parametrize("orig,new", [(8000, 16000), (16000, 8000), (44100, 16000), (48000, 44100)])
def test_matches_scipy_resample_poly(orig, new):
    signal = pytest.importorskip("scipy.signal")
    x = torch.randn(2, 1001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = math.gcd(orig, new)
    ref = signal.resample_poly(x.numpy(), new // g, orig // g, axis=-1)
    y = resample(x, orig, new).numpy()
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() < 1e-12
