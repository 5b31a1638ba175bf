"""vqkit.evaluation.audio_metrics: SI-SDR, the log-mel distance, alignment and joining
against independent float64 references; PESQ-NB and STOI when the ``audio-eval`` extra is
installed (skipped otherwise), on synthetic signals and on FSDD speech when present."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.errors import UserError
from vqkit.evaluation import audio_metrics as am


def noise(n: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n) * scale


def speechlike(n: int = 16000, rate: int = 8000, seed: int = 0) -> np.ndarray:
    """Harmonics of a wandering pitch under a syllable-rate envelope (voiced-speech-like)."""
    t = np.arange(n) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 20))
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) ** 2
    return 0.1 * x * env + noise(n, seed, 1e-3)


# --------------------------------------------------------------------------- SI-SDR


def test_si_sdr_scaled_copy_is_inf():
    x = noise(4000)
    assert am.si_sdr(x, x) == math.inf
    # a scaled copy: +inf up to float64 rounding of the projection
    assert am.si_sdr(x, 0.3 * x) > 250
    assert am.si_sdr(torch.tensor(x), torch.tensor(-2.0 * x)) > 250


@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 30.0])
def test_si_sdr_orthogonal_noise_at_known_snr(snr):
    """Noise orthogonal to the (zero-mean) reference at power ratio ``snr``: exactly it."""
    s = speechlike()
    s = s - s.mean()
    n = noise(s.size, seed=1)
    n = n - n.mean()
    n -= (n @ s) / (s @ s) * s  # orthogonal to s (still zero-mean)
    n *= math.sqrt((s @ s) / (n @ n) / 10 ** (snr / 10))
    assert am.si_sdr(s, s + n) == pytest.approx(snr, abs=1e-9)
    # the scale of the estimate does not matter
    assert am.si_sdr(s, 3.0 * (s + n)) == pytest.approx(snr, abs=1e-9)


def test_si_sdr_matches_projection_reference():
    """Against the definition by least squares: target = projection of ŝ on s."""
    s, e = speechlike(), speechlike(seed=3) + noise(16000, seed=4, scale=0.05)
    for zero_mean in (True, False):
        a, b = (s - s.mean(), e - e.mean()) if zero_mean else (s, e)
        coef = np.linalg.lstsq(a[:, None], b, rcond=None)[0][0]
        ref = 10 * np.log10(np.sum((coef * a) ** 2) / np.sum((b - coef * a) ** 2))
        assert am.si_sdr(s, e, zero_mean=zero_mean) == pytest.approx(ref, abs=1e-9)


def test_si_sdr_random_noise_near_snr():
    s = speechlike(32000)
    n = noise(s.size, seed=7)
    n *= math.sqrt(np.sum(s**2) / np.sum(n**2) / 10)  # 10 dB
    assert am.si_sdr(s, s + n) == pytest.approx(10.0, abs=0.1)


def test_si_sdr_bad_input():
    with pytest.raises(UserError, match="differ in length"):
        am.si_sdr(np.ones(10), np.ones(11))
    with pytest.raises(UserError, match="silent"):
        am.si_sdr(np.zeros(10), np.ones(10))
    with pytest.raises(UserError, match="mono 1-D"):
        am.si_sdr(np.ones((2, 10)), np.ones((2, 10)))
    with pytest.raises(UserError, match="NaN"):
        am.si_sdr(np.array([1.0, np.nan]), np.ones(2))


# --------------------------------------------------------------------------- mel


def htk_filters_reference(n_mels, n_fft, rate):
    """Triangles on the HTK mel scale, by loops (independent of the library's vector code)."""
    fmax = rate / 2
    mel_max = 2595 * math.log10(1 + fmax / 700)
    pts = [700 * (10 ** (mel_max * i / (n_mels + 1) / 2595) - 1) for i in range(n_mels + 2)]
    out = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * rate / n_fft
            if lo < f <= c:
                out[m, k] = (f - lo) / (c - lo)
            elif c < f < hi:
                out[m, k] = (hi - f) / (hi - c)
    return out


def test_mel_filterbank_matches_reference():
    fb = am.mel_filterbank(80, 512, 8000)
    assert fb.shape == (80, 257) and fb.dtype == torch.float64
    np.testing.assert_allclose(fb.numpy(), htk_filters_reference(80, 512, 8000), atol=1e-12)
    assert (fb.max(1).values > 0).all()
    with pytest.raises(UserError, match="hold no FFT bin"):
        am.mel_filterbank(256, 64, 8000)
    with pytest.raises(UserError, match="f_min < f_max"):
        am.mel_filterbank(80, 512, 8000, f_max=5000)


def test_log_mel_matches_numpy_stft():
    x = speechlike(3000)
    got = am.log_mel(x)
    assert got.shape == (80, 1 + 3000 // 128)
    pad = np.pad(x, 256, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)  # periodic Hann
    frames = np.stack([pad[i * 128 : i * 128 + 512] * window for i in range(got.shape[1])])
    mag = np.abs(np.fft.rfft(frames, axis=1)).T  # (257, frames)
    ref = np.log10(htk_filters_reference(80, 512, 8000) @ mag + 1e-5)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-9)


def test_mel_distance():
    x = speechlike()
    assert am.mel_distance(x, x) == 0.0
    d = am.mel_distance(x, x + noise(x.size, seed=2, scale=0.01))
    assert d > 0 and d == pytest.approx(am.mel_distance(x + noise(x.size, 2, 0.01), x))
    # a gain of 10 moves every log10 mel by 1 where the mel is far above the 1e-5 floor
    loud = noise(8000, seed=5, scale=0.1)
    assert am.mel_distance(loud, 10 * loud) == pytest.approx(1.0, abs=1e-3)
    # more noise, larger distance
    assert am.mel_distance(x, x + noise(x.size, 2, 0.05)) > d
    with pytest.raises(UserError, match="too short"):
        am.mel_distance(np.ones(100), np.ones(100))


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("shift", [0, 1, 37, 400, -25])
def test_align_recovers_shift(shift):
    x = speechlike(6000)
    # degraded = x delayed by `shift` (advanced when negative), with noise and a gain
    y = np.roll(np.pad(x, 500), shift)[500:-500] if shift else x.copy()
    y = 0.7 * y + noise(y.size, seed=9, scale=0.005)
    got = am.align(x, y)
    assert got.lag == shift
    assert got.degraded.shape == x.shape
    inner = slice(max(0, -shift), x.size - max(0, shift))
    np.testing.assert_allclose(got.degraded[inner], y[inner.start + shift : inner.stop + shift])
    assert 0.9 < got.correlation <= 1.0


def test_align_pads_trims_and_bounds():
    x = speechlike(4000)
    delayed = np.concatenate([np.zeros(123), x, np.zeros(50)])  # longer than x
    got = am.align(x, delayed)
    assert got.lag == 123 and got.correlation == pytest.approx(1.0)
    np.testing.assert_allclose(got.degraded, x, atol=1e-12)
    short = x[300:]  # degraded starts late: lag -300, the first 300 samples padded with 0
    got = am.align(x, short)
    assert got.lag == -300
    assert (got.degraded[:300] == 0).all()
    np.testing.assert_allclose(got.degraded[300:], x[300:])
    # max_lag keeps the search within bounds
    assert abs(am.align(x, delayed, max_lag=50).lag) <= 50
    with pytest.raises(UserError, match="max_lag"):
        am.align(x, x, max_lag=-1)


def test_align_matches_direct_correlation():
    """The FFT cross-correlation against a direct float64 sum over every lag."""
    a, b = noise(300, seed=11), noise(250, seed=12)
    lags = range(-(a.size - 1), b.size)
    direct = [sum(a[t] * b[t + k] for t in range(a.size) if 0 <= t + k < b.size) for k in lags]
    assert am.align(a, b).lag == list(lags)[int(np.argmax(direct))]


def test_join_by_speaker():
    clips = [torch.full((n,), float(n)) for n in (3, 4, 5, 6)]
    got = am.join_by_speaker(clips, ["b", "a", "b", "a"])
    assert list(got) == ["b", "a"]
    assert got["b"].tolist() == [3.0] * 3 + [5.0] * 5
    assert got["a"].tolist() == [4.0] * 4 + [6.0] * 6
    with pytest.raises(UserError, match="3 clips but 2 speakers"):
        am.join_by_speaker(clips[:3], ["a", "b"])
    with pytest.raises(UserError, match="not mono"):
        am.join_by_speaker([torch.zeros(2, 3)], ["a"])


# --------------------------------------------------------------------------- PESQ, STOI


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)  # makes `import pesq` fail
    monkeypatch.setitem(sys.modules, "pystoi", None)
    x = speechlike()
    with pytest.raises(UserError, match=r"vqkit\[audio-eval\]"):
        am.pesq_nb(x, x)
    with pytest.raises(UserError, match=r"'pystoi' package"):
        am.stoi(x, x)


def test_pesq_nb_and_stoi_order_noise_levels():
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    x = speechlike(24000)
    assert am.pesq_nb(x, x) > 4.4
    assert am.stoi(x, x) == pytest.approx(1.0, abs=1e-6)
    pesqs, stois = [], []
    for scale in (0.003, 0.02, 0.08):
        y = x + noise(x.size, seed=13, scale=scale)
        pesqs.append(am.pesq_nb(x, y))
        stois.append(am.stoi(x, y))
    assert pesqs == sorted(pesqs, reverse=True) and 1.0 <= pesqs[-1] < pesqs[0] < 4.6
    assert stois == sorted(stois, reverse=True) and 0 < stois[-1] < stois[0] <= 1
    with pytest.raises(UserError, match="8000 or 16000"):
        am.pesq_nb(x, x, rate=11025)


def test_fsdd_speaker_signal_scores(fsdd_archive):
    """Real speech: one speaker's 50 test clips joined (digit, then index), a delayed
    8-bit mu-law copy aligned back and scored."""
    from vqkit.data.audiofolder import load_audio

    data = load_audio(fsdd_archive, "test", speakers=["theo"])
    clips = [data.clip(i) for i in range(len(data))]
    joined = am.join_by_speaker(clips, [data.speaker_names[s] for s in data.speakers.tolist()])
    assert list(joined) == ["theo"] and joined["theo"].numel() == int(data.lengths.sum())
    assert [Path(n).name for n in data.names[:6]] == [f"0_theo_{i}.wav" for i in range(5)] + [
        "1_theo_0.wav"
    ]
    x = joined["theo"].double().numpy()
    mu = 255.0
    coded = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    coded = np.round(coded * 127) / 127
    y = np.sign(coded) * np.expm1(np.abs(coded) * np.log1p(mu)) / mu
    delayed = np.concatenate([np.zeros(200), y])
    got = am.align(x, delayed)
    assert got.lag == 200
    assert 25 < am.si_sdr(x, got.degraded) < 45  # 8-bit mu-law: about 35-38 dB
    assert 0 < am.mel_distance(x, got.degraded) < 0.5
    if importlib.util.find_spec("pesq") and importlib.util.find_spec("pystoi"):
        assert 3.5 < am.pesq_nb(x, got.degraded) < 4.6
        assert am.stoi(x, got.degraded) > 0.95
