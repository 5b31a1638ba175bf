"""Speech-quality figures of a codec, offline, each on a stated definition.

* :func:`si_sdr`: scale-invariant signal-to-distortion ratio (Le Roux et al. 2019, "SDR -
  half-baked or well done?"), in float64: with ``a = <s, ŝ> / ||s||²``,
  ``SI-SDR = 10 log10(||a s||² / ||a s - ŝ||²)`` dB (``zero_mean=True``: both signals'
  means removed first, as in the paper's code). An identical copy gives +inf, a scaled
  one more than 250 dB (float64 rounding).
* :func:`mel_distance`: mean absolute difference of log10 mel magnitudes (:func:`log_mel`):
  a Hann-window STFT magnitude (``n_fft`` 512, hop 128, centred with reflect padding) at
  8 kHz, mapped by 80 triangular filters on the HTK mel scale
  ``mel(f) = 2595 log10(1 + f / 700)`` from 0 Hz to Nyquist, unnormalised (the filters of
  ``torchaudio.functional.melscale_fbanks(..., norm=None, mel_scale="htk")``), then
  ``log10(mel + 1e-5)``. 0 for identical signals. The filterbank is
  :func:`vqkit.losses.spectral.mel_filterbank` (re-exported here), the one the codec's
  mel loss trains with.
* :func:`stoi`: short-time objective intelligibility (Taal et al. 2011) by ``pystoi``.
* :func:`pesq_nb`: narrowband PESQ (ITU-T P.862; MOS-LQO, as ``pesq``'s 'nb' mode
  returns it) at 8 or 16 kHz.
  ``pesq`` and ``pystoi`` are the optional extra ``vqkit[audio-eval]``; without them these
  two raise one line naming it.

Scoring long signals: FSDD's clips last about 0.4 s, too short for PESQ and STOI alone, so
:func:`join_by_speaker` joins each speaker's clips into one signal (in the order given),
and :func:`align` lines a codec's output up with it by cross-correlation before scoring.

Signals are mono, 1-D, float in [-1, 1] (``torch.Tensor`` or anything ``numpy.asarray``
takes).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..errors import UserError
from ..losses.spectral import MEL_EPS, mel_filterbank

__all__ = [
    "AUDIO_EVAL_EXTRA",
    "Alignment",
    "align",
    "audio_eval_available",
    "join_by_speaker",
    "log_mel",
    "mel_distance",
    "mel_filterbank",
    "pesq_nb",
    "si_sdr",
    "stoi",
]

AUDIO_EVAL_EXTRA = "pip install 'vqkit[audio-eval]'"


def _mono(x: object, what: str) -> np.ndarray:
    """``x`` as a float64 1-D array; one line when it is not one non-empty finite signal."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1:
        raise UserError(f"{what}: expected a mono 1-D signal, got shape {tuple(a.shape)}")
    if a.size == 0:
        raise UserError(f"{what}: empty signal")
    if not np.isfinite(a).all():
        raise UserError(f"{what}: holds NaN or Inf")
    return a


def _pair(reference: object, degraded: object) -> tuple[np.ndarray, np.ndarray]:
    ref, deg = _mono(reference, "reference"), _mono(degraded, "degraded")
    if ref.size != deg.size:
        raise UserError(
            f"reference and degraded differ in length ({ref.size} vs {deg.size} samples); "
            "align() them first"
        )
    return ref, deg


# --------------------------------------------------------------------------- SI-SDR


def si_sdr(reference: object, estimate: object, *, zero_mean: bool = True) -> float:
    """SI-SDR of ``estimate`` against ``reference`` (both (T,)), in dB, float64 (module
    docstring). +inf when the estimate equals it (a scaled copy: > 250 dB); a silent
    reference is one line (the ratio is undefined)."""
    s, e = _pair(reference, estimate)
    if zero_mean:
        s, e = s - s.mean(), e - e.mean()
    energy = float(s @ s)
    if energy == 0.0:
        raise UserError("si_sdr: the reference is silent (zero energy); SI-SDR is undefined")
    target = (float(s @ e) / energy) * s
    noise = float(((e - target) ** 2).sum())
    signal = float(target @ target)
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# --------------------------------------------------------------------------- mel distance


def log_mel(
    signal: object, rate: int = 8000, *, n_mels: int = 80, n_fft: int = 512, hop: int = 128
) -> torch.Tensor:
    """``log10(mel + 1e-5)`` of a mono signal (T,): float64 (n_mels, frames), frames =
    1 + T // hop (a centred, reflect-padded Hann STFT magnitude through
    :func:`mel_filterbank`). A signal shorter than n_fft // 2 + 1 samples is one line."""
    x = torch.from_numpy(_mono(signal, "signal"))
    if x.numel() <= n_fft // 2:
        raise UserError(
            f"log_mel: signal of {x.numel()} samples is too short for n_fft={n_fft} "
            f"(needs more than {n_fft // 2})"
        )
    spec = torch.stft(
        x, n_fft, hop, window=torch.hann_window(n_fft, dtype=torch.float64),
        center=True, pad_mode="reflect", return_complex=True,
    ).abs()  # fmt: skip
    mel = mel_filterbank(n_mels, n_fft, rate) @ spec
    return torch.log10(mel + MEL_EPS)


def mel_distance(
    reference: object,
    degraded: object,
    rate: int = 8000,
    *,
    n_mels: int = 80,
    n_fft: int = 512,
    hop: int = 128,
) -> float:
    """Mean |log_mel(reference) - log_mel(degraded)| over mels and frames (float64; both
    signals (T,) of one length; module docstring)."""
    ref, deg = _pair(reference, degraded)
    a = log_mel(ref, rate, n_mels=n_mels, n_fft=n_fft, hop=hop)
    b = log_mel(deg, rate, n_mels=n_mels, n_fft=n_fft, hop=hop)
    return float((a - b).abs().mean())


# --------------------------------------------------------------------------- PESQ, STOI


def _need(module: str, what: str):
    """Import an optional package of the ``audio-eval`` extra, or one line naming it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the '{module}' package: {AUDIO_EVAL_EXTRA}") from None


def audio_eval_available() -> bool:
    """Whether the ``audio-eval`` extra (``pesq`` and ``pystoi``) can be imported."""
    return all(importlib.util.find_spec(m) is not None for m in ("pesq", "pystoi"))


def pesq_nb(reference: object, degraded: object, rate: int = 8000) -> float:
    """Narrowband PESQ (ITU-T P.862) of ``degraded`` against ``reference`` (both (T,), one
    length, at ``rate`` 8000 or 16000 Hz) by ``pesq``'s mode 'nb', which returns MOS-LQO
    (4.55 for identical signals)."""
    pesq = _need("pesq", "PESQ")
    if rate not in (8000, 16000):
        raise UserError(f"PESQ works at 8000 or 16000 Hz, not {rate}: resample first")
    ref, deg = _pair(reference, degraded)
    try:
        return float(pesq.pesq(rate, ref, deg, "nb"))
    except Exception as e:  # pesq's own errors (no utterance found, too short)
        raise UserError(f"PESQ failed: {type(e).__name__}: {e}") from None


def stoi(reference: object, degraded: object, rate: int = 8000, extended: bool = False) -> float:
    """STOI (0..1; ``extended``: ESTOI) of ``degraded`` against ``reference`` (both (T,),
    one length) by ``pystoi`` (which resamples to its 10 kHz internally)."""
    pystoi = _need("pystoi", "STOI")
    ref, deg = _pair(reference, degraded)
    return float(pystoi.stoi(ref, deg, rate, extended=extended))


# --------------------------------------------------------------------------- alignment


class Alignment(NamedTuple):
    """``degraded`` shifted by ``lag`` and cut or zero-padded to the reference's length
    (float64 (T_ref,)); ``lag`` > 0: the degraded signal was late by that many samples;
    ``correlation``: the normalised cross-correlation at that lag (1 for a shifted copy)."""

    degraded: np.ndarray
    lag: int
    correlation: float


def align(reference: object, degraded: object, max_lag: int | None = None) -> Alignment:
    """Line ``degraded`` (T_d,) up with ``reference`` (T_r,) by the integer lag that
    maximises their cross-correlation ``c[k] = Σ_t ref[t] deg[t + k]`` (computed by FFT,
    float64; ``max_lag`` bounds |k|), then return ``deg[t + lag]`` for t in 0..T_r - 1,
    zeros where that falls outside the degraded signal."""
    ref, deg = _mono(reference, "reference"), _mono(degraded, "degraded")
    n_r, n_d = ref.size, deg.size
    size = 1 << (n_r + n_d - 1 - 1).bit_length()
    # corr[k mod size] = Σ_t deg[t + k] ref[t]: lags -(n_r - 1) .. n_d - 1
    corr = np.fft.irfft(np.fft.rfft(deg, size) * np.conj(np.fft.rfft(ref, size)), size)
    lags = np.arange(-(n_r - 1), n_d)
    values = corr[lags % size]
    if max_lag is not None:
        if max_lag < 0:
            raise UserError(f"align: max_lag must be >= 0, got {max_lag}")
        keep = np.abs(lags) <= max_lag
        lags, values = lags[keep], values[keep]
    best = int(np.argmax(values))
    lag = int(lags[best])
    out = np.zeros(n_r)
    lo, hi = max(0, -lag), min(n_r, n_d - lag)
    if hi > lo:
        out[lo:hi] = deg[lo + lag : hi + lag]
    norm = math.sqrt(float(ref @ ref) * float(deg @ deg))
    return Alignment(out, lag, float(values[best]) / norm if norm > 0 else 0.0)


def join_by_speaker(
    clips: Sequence[object], speakers: Sequence[Hashable]
) -> dict[Hashable, torch.Tensor]:
    """One signal per speaker: that speaker's clips (each (T_i,)) concatenated in the order
    given, as float32 (Σ T_i,), keyed in order of first appearance. The caller fixes the
    order: :func:`vqkit.data.load_audio` lists FSDD sorted by file name
    ``{digit}_{speaker}_{index}.wav``, so each speaker's signal runs digit 0..9 and, within
    a digit, index 0..4 (the test split)."""
    if len(clips) != len(speakers):
        raise UserError(f"join_by_speaker: {len(clips)} clips but {len(speakers)} speakers")
    if not clips:
        raise UserError("join_by_speaker: no clips")
    parts: dict[Hashable, list[torch.Tensor]] = {}
    for i, (clip, who) in enumerate(zip(clips, speakers, strict=True)):
        t = torch.as_tensor(clip, dtype=torch.float32)
        if t.ndim != 1:
            raise UserError(f"join_by_speaker: clip {i} is not mono 1-D: {tuple(t.shape)}")
        parts.setdefault(who, []).append(t)
    return {who: torch.cat(ts) for who, ts in parts.items()}
