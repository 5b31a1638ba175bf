"""vqkit.losses.spectral: the speech codec's waveform, multi-resolution STFT and mel losses,
against an independent float64 numpy computation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from vqkit.errors import UserError
from vqkit.evaluation.audio_metrics import mel_distance
from vqkit.losses.spectral import (
    AudioLossOptions,
    AudioReconstructionLoss,
    MelL1Loss,
    MultiResolutionSTFTLoss,
    mel_filterbank,
    waveform_l1,
)


def signals(b=2, t=1600, seed=0, scale=0.05):
    """A pair of float64 (B, T) speech-like signals: tones + noise, and a perturbed copy."""
    g = np.random.default_rng(seed)
    n = np.arange(t) / 8000
    y = np.stack([0.3 * np.sin(2 * np.pi * (180 + 40 * i) * n) for i in range(b)])
    y = y + 0.05 * g.standard_normal((b, t))
    x = y + scale * g.standard_normal((b, t))
    return torch.from_numpy(x), torch.from_numpy(y)


def np_stft_mag(x, n_fft, hop, win, floor):
    """sqrt(max(|STFT|², floor)) of (T,) in numpy: periodic Hann(win) centred in n_fft,
    reflect padding by n_fft // 2; (bins, frames)."""
    pad = np.pad(x, n_fft // 2, mode="reflect")
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    left = (n_fft - win) // 2
    window = np.zeros(n_fft)
    window[left : left + win] = w
    frames = np.stack([pad[i * hop : i * hop + n_fft] * window for i in range(1 + x.size // hop)])
    return np.sqrt(np.maximum(np.abs(np.fft.rfft(frames, axis=1)) ** 2, floor)).T


def np_mrstft(x, y, res):
    total = 0.0
    for n_fft, hop, win in res:
        xm = np.stack([np_stft_mag(r, n_fft, hop, win, 1e-7) for r in x])
        ym = np.stack([np_stft_mag(r, n_fft, hop, win, 1e-7) for r in y])
        sc = np.linalg.norm(ym - xm) / np.linalg.norm(ym)
        total += sc + np.abs(np.log(ym) - np.log(xm)).mean()
    return total / len(res)


RES = [(128, 32, 128), (256, 64, 256), (512, 128, 400)]


def test_stft_loss_matches_numpy_reference():
    x, y = signals()
    got = MultiResolutionSTFTLoss(RES)(x, y)
    assert got.dtype == torch.float64
    ref = np_mrstft(x.numpy(), y.numpy(), RES)
    assert float(got) == pytest.approx(ref, rel=1e-10)
    # the string form of the option parses to the same resolutions
    s = MultiResolutionSTFTLoss("128:32:128,256:64:256,512:128:400")(x, y)
    assert float(s) == float(got)


@pytest.mark.skipif(importlib.util.find_spec("auraloss") is None, reason="auraloss absent")
def test_stft_loss_matches_auraloss():
    import auraloss

    x, y = signals()
    ours = MultiResolutionSTFTLoss(RES)(x, y)
    theirs = auraloss.freq.MultiResolutionSTFTLoss(
        fft_sizes=[r[0] for r in RES], hop_sizes=[r[1] for r in RES],
        win_lengths=[r[2] for r in RES], w_sc=1.0, w_log_mag=1.0, w_lin_mag=0.0,
        eps=1e-7,
    )(x[:, None], y[:, None])  # fmt: skip
    # auraloss builds a float32 window: measured 1e-8 apart
    assert float(ours) == pytest.approx(float(theirs), rel=1e-7)


def test_mel_loss_matches_reference_and_mel_distance():
    x, y = signals(b=1, t=3000)
    loss = MelL1Loss(8000, [(512, 128, 80)])
    got = float(loss(x, y))
    # the evaluation's figure: same filterbank, STFT and floor
    assert got == pytest.approx(mel_distance(y[0], x[0]), rel=1e-9)
    fb = mel_filterbank(80, 512, 8000).numpy()
    lx = np.log10(fb @ np_stft_mag(x[0].numpy(), 512, 128, 512, 0.0) + 1e-5)
    ly = np.log10(fb @ np_stft_mag(y[0].numpy(), 512, 128, 512, 0.0) + 1e-5)
    assert got == pytest.approx(np.abs(lx - ly).mean(), rel=1e-9)
    # several scales: the mean of the single-scale losses
    scales = [(128, 32, 20), (256, 64, 40), (512, 128, 80)]
    each = [float(MelL1Loss(8000, [s])(x, y)) for s in scales]
    assert float(MelL1Loss(8000, scales)(x, y)) == pytest.approx(np.mean(each), rel=1e-12)


def test_waveform_l1():
    x, y = signals()
    assert float(waveform_l1(x, y)) == pytest.approx(float((x - y).abs().mean()), rel=1e-14)


LOSSES = {
    "wave": waveform_l1,
    "stft": MultiResolutionSTFTLoss(),
    "mel": MelL1Loss(),
}


@pytest.mark.parametrize("name", LOSSES)
def test_zero_positive_symmetric(name):
    f = LOSSES[name]
    x, y = signals()
    assert float(f(y, y)) == 0.0
    assert float(f(x, y)) > 0
    if name != "stft":  # spectral convergence divides by the target's norm: not symmetric
        assert float(f(x, y)) == pytest.approx(float(f(y, x)), rel=1e-12)
    # (B, 1, T) is the same as (B, T)
    assert float(f(x[:, None], y[:, None])) == float(f(x, y))


@pytest.mark.parametrize("name", LOSSES)
def test_silence_is_finite(name):
    f = LOSSES[name]
    x, _ = signals()
    x = x.clone().requires_grad_(True)
    zero = torch.zeros_like(x)
    for a, b in ((zero, zero), (x, zero), (zero.clone().requires_grad_(True), x.detach())):
        v = f(a, b)
        assert torch.isfinite(v), (name, float(v))
        if a.requires_grad:
            (g,) = torch.autograd.grad(v, a)
            assert torch.isfinite(g).all()
    assert float(f(zero, zero)) == 0.0


@pytest.mark.parametrize("name", ["wave", "stft", "mel"])
def test_gradcheck_float64(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 48, generator=g, dtype=torch.float64)
    f = {
        "wave": waveform_l1,
        "stft": MultiResolutionSTFTLoss([(16, 4, 16), (32, 8, 24)]),
        "mel": MelL1Loss(8000, [(16, 4, 4), (32, 8, 6)]),
    }[name]
    assert torch.autograd.gradcheck(lambda a: f(a, y), (x,))
    lengths = torch.tensor([48, 30])
    assert torch.autograd.gradcheck(lambda a: f(a, y, lengths), (x,))


@pytest.mark.parametrize("name", LOSSES)
def test_padded_batch_equals_unpadded_rows(name):
    """A row padded with garbage past its length scores as the row alone (mean over the
    rows' valid elements, so equal lengths: the mean of the rows)."""
    f = LOSSES[name]
    x, y = signals(b=2, t=1600)
    padded_x, padded_y = x.clone(), y.clone()
    # garbage past the length changes nothing when the length says so
    short = 1200
    gx = torch.cat([x[:, :short], 5 * torch.randn(2, 400, dtype=x.dtype)], 1)
    gy = torch.cat([y[:, :short], -3 * torch.randn(2, 400, dtype=x.dtype)], 1)
    lengths = torch.tensor([short, short])
    masked = float(f(gx, gy, lengths))
    zero_padded = float(
        f(
            torch.cat([x[:, :short], torch.zeros(2, 400, dtype=x.dtype)], 1),
            torch.cat([y[:, :short], torch.zeros(2, 400, dtype=x.dtype)], 1),
            lengths,
        )
    )
    assert masked == zero_padded
    if name == "wave":
        assert masked == pytest.approx(float(f(x[:, :short], y[:, :short])), rel=1e-12)
    else:  # the mask leaves out the padded frames, where both signals are 0 (difference 0)
        unmasked = float(
            f(
                torch.cat([x[:, :short], torch.zeros(2, 400, dtype=x.dtype)], 1),
                torch.cat([y[:, :short], torch.zeros(2, 400, dtype=x.dtype)], 1),
            )
        )
        assert masked > unmasked * 1.1
    # rows of different lengths: row 1's garbage tail changes nothing
    two = torch.tensor([1600, short])
    mixed = torch.stack([x[0], gx[1]]), torch.stack([y[0], gy[1]])
    clean = torch.stack([x[0], gx[1] * (torch.arange(1600) < short)])
    clean_y = torch.stack([y[0], gy[1] * (torch.arange(1600) < short)])
    assert float(f(*mixed, two)) == float(f(clean, clean_y, two))
    # full lengths are the unmasked path
    full = torch.tensor([1600, 1600])
    assert float(f(padded_x, padded_y, full)) == pytest.approx(float(f(x, y)), rel=1e-12)


def test_audio_reconstruction_loss_weights():
    x, y = signals()
    o = AudioLossOptions(wave_l1_weight=0.5, stft_weight=2.0, mel_weight=0.0)
    total, terms = AudioReconstructionLoss(o)(x, y)
    assert set(terms) == {"wave_l1", "stft"}
    want = 0.5 * waveform_l1(x, y) + 2.0 * MultiResolutionSTFTLoss(o.stft_resolutions)(x, y)
    assert float(total) == pytest.approx(float(want), rel=1e-12)
    total, terms = AudioReconstructionLoss()(x, x)
    assert set(terms) == {"wave_l1", "stft", "mel"} and float(total) == 0.0


def test_bad_input_one_line():
    x, y = signals()
    f = MultiResolutionSTFTLoss()
    cases = [
        (lambda: f(x, y[:, :100]), "differ"),
        (lambda: f(x[0], y[0]), r"\(B, T\)"),
        (lambda: f(x, y.float()), "float dtype"),
        (lambda: f(x.long(), y.long()), "float dtype"),
        (lambda: f(x[:, :200], y[:, :200]), "too short"),
        (lambda: f(x, y, torch.tensor([0, 10])), "lengths"),
        (lambda: f(x, y, torch.tensor([10])), "lengths"),
        (lambda: MultiResolutionSTFTLoss("512:128"), "triples"),
        (lambda: MultiResolutionSTFTLoss([(256, 64, 512)]), "win must be"),
        (lambda: MelL1Loss(8000, [(64, 16, 80)]), "hold no FFT bin"),
        (lambda: AudioLossOptions(stft_resolutions="a:b:c"), "stft_resolutions"),
        (lambda: AudioLossOptions(mel_weight=-1.0), "mel_weight"),
    ]
    for call, match in cases:
        with pytest.raises(UserError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
