"""The speech codec's reconstruction losses: waveform L1, multi-resolution STFT, mel L1.

Signals ``x`` (the codec's output) and ``y`` (the target) are ``(B, T)`` or ``(B, 1, T)``
float tensors of one shape; ``lengths`` (B,) optionally gives each row's true length in
a right-padded batch. Every term is 0 for identical signals.

* :func:`waveform_l1`: ``mean |x - y|`` over the valid samples.
* :class:`MultiResolutionSTFTLoss` (Yamamoto et al. 2020, Parallel WaveGAN; the
  definition of its reference code and of ``auraloss``): per resolution
  ``(n_fft, hop, win)``, with ``|X| = sqrt(max(Re² + Im², 1e-7))`` of a Hann-window STFT
  (centred, reflect padding), spectral convergence ``||Y| - |X||_F / ||Y||_F`` (over the
  whole batch) plus the log-magnitude L1 ``mean |log|Y| - log|X||``; the two summed and
  averaged over resolutions. Parallel WaveGAN's windows at 24 kHz last 10, 25 and 50 ms;
  the default here at 8 kHz, ``128:32:128,256:64:256,512:128:512``, 16, 32 and 64 ms
  (so clips of 257 samples or more work).
* :class:`MelL1Loss`: DAC's multi-scale mel loss in kind (Kumar et al. 2023: several
  window lengths, the mel count growing with the window), L1 of
  ``log10(mel + 1e-5)``, mel = :func:`mel_filterbank` @ STFT magnitude, averaged over
  scales ``(n_fft, hop, n_mels)``; default ``128:32:20,256:64:40,512:128:80``. At
  ``512:128:80`` on one float64 signal it equals ``vqkit.evaluation``'s
  ``mel_distance`` (same filters, same STFT, same floor), so the trained term and the
  reported figure are one definition.

Padded batches: the samples past each row's length are zeroed in both signals, and only
the frames an unpadded row of that length would have, ``i < 1 + length // hop`` (centre
``i * hop`` at most the length), count in every sum and mean; full lengths are the
unmasked result (the frames near a short row's end see zeros, not its reflection).

The STFT and ``auraloss`` (Apache-2.0, torch + numpy) were weighed: its mel option needs
librosa and it has no padding mask, so these few lines are vqkit's own, checked against
an independent numpy computation and (where installed) ``auraloss`` in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..options import Options, nonneg, option

__all__ = [
    "AudioLossOptions",
    "AudioReconstructionLoss",
    "MelL1Loss",
    "MultiResolutionSTFTLoss",
    "mel_filterbank",
    "parse_triples",
    "waveform_l1",
    "zero_padding",
]

STFT_EPS = 1e-7  # Parallel WaveGAN's floor of the power before sqrt and log
MEL_EPS = 1e-5  # the floor inside log10(mel + eps): -100 dB of a full-scale magnitude
MEL_POWER_EPS = 1e-12  # power floor before sqrt: keeps d|X| finite at silence, far below MEL_EPS


def mel_filterbank(
    n_mels: int = 80,
    n_fft: int = 512,
    rate: int = 8000,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """Triangular HTK-mel filters, float64 (n_mels, n_fft // 2 + 1), unnormalised (peak 1):
    filter m rises from mel point m to m + 1 and falls to m + 2, the n_mels + 2 points
    evenly spaced in mel (``mel(f) = 2595 log10(1 + f / 700)``) from ``f_min`` to
    ``f_max`` (Nyquist when None); torchaudio's ``melscale_fbanks(norm=None,
    mel_scale="htk")``. A filter that no FFT bin reaches (too many mels for ``n_fft``)
    is one line."""
    f_max = rate / 2 if f_max is None else float(f_max)
    if n_mels < 1 or n_fft < 2 or not 0 <= f_min < f_max <= rate / 2:
        raise UserError(
            f"mel filterbank: need n_mels >= 1, n_fft >= 2 and 0 <= f_min < f_max <= "
            f"rate / 2, got n_mels={n_mels}, n_fft={n_fft}, f_min={f_min}, f_max={f_max}, "
            f"rate={rate}"
        )

    def mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    freqs = torch.linspace(0.0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64)
    points = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    left, centre, right = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (freqs - left) / (centre - left)
    falling = (right - freqs) / (right - centre)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    empty = (fb.sum(1) == 0).nonzero().flatten()
    if empty.numel():
        raise UserError(
            f"mel filterbank: {empty.numel()} of {n_mels} filters hold no FFT bin "
            f"(n_fft={n_fft} at {rate} Hz is too coarse for {n_mels} mels)"
        )
    return fb


def parse_triples(text: str, what: str = "resolutions") -> list[tuple[int, int, int]]:
    """``"a:b:c,d:e:f"`` as [(a, b, c), (d, e, f)] of positive ints; one line otherwise."""
    out = []
    for part in str(text).split(","):
        bits = part.strip().split(":")
        try:
            vals = tuple(int(b) for b in bits)
        except ValueError:
            vals = ()
        if len(vals) != 3 or min(vals) < 1:
            raise UserError(f"{what}: expected 'a:b:c' triples of positive ints, got {text!r}")
        out.append(vals)
    return out


def _triples_check(v: str) -> str | None:
    try:
        parse_triples(v)
    except UserError:
        return "comma-separated a:b:c triples of positive ints"
    return None


def _prepare(
    x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, T) views of x, y (padding zeroed) and lengths as a (B,) long tensor."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise UserError("audio loss: x and y must be tensors")
    if x.shape != y.shape:
        raise UserError(f"audio loss: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    if x.dim() == 3 and x.shape[1] == 1:
        x, y = x[:, 0], y[:, 0]
    if x.dim() != 2 or x.shape[1] == 0:
        raise UserError(f"audio loss: expected (B, T) or (B, 1, T) signals, got {tuple(x.shape)}")
    if not (x.is_floating_point() and y.is_floating_point()) or x.dtype != y.dtype:
        raise UserError(f"audio loss: x and y must share a float dtype, got {x.dtype}, {y.dtype}")
    if lengths is None:
        return x, y, None
    lengths = torch.as_tensor(lengths, device=x.device).long()
    if lengths.shape != (x.shape[0],) or bool((lengths < 1).any() | (lengths > x.shape[1]).any()):
        raise UserError(
            f"audio loss: lengths must be (B,) = ({x.shape[0]},) ints in [1, {x.shape[1]}]"
        )
    return zero_padding(x, lengths), zero_padding(y, lengths), lengths


def zero_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T) or (B, 1, T) with the samples past each row's length (``lengths``,
    (B,)) set to 0."""
    keep = torch.arange(x.shape[-1], device=x.device) < lengths.to(x.device)[:, None]
    return x * (keep if x.dim() == 2 else keep[:, None, :])


def waveform_l1(
    x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean ``|x - y|`` over the valid samples (a scalar)."""
    x, y, lengths = _prepare(x, y, lengths)
    diff = (x - y).abs()  # padding is 0 in both
    count = x.numel() if lengths is None else lengths.sum()
    return diff.sum() / count


def _power(x: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    """|STFT|² of (B, T): (B, n_fft // 2 + 1, 1 + T // hop), Hann(win), centred, reflect."""
    if x.shape[1] <= n_fft // 2:
        raise UserError(
            f"audio loss: signals of {x.shape[1]} samples are too short for n_fft={n_fft} "
            f"(needs more than {n_fft // 2})"
        )
    window = torch.hann_window(win, dtype=x.dtype, device=x.device)
    spec = torch.stft(
        x, n_fft, hop, win, window=window, center=True, pad_mode="reflect", return_complex=True
    )
    return spec.real.square() + spec.imag.square()


def _frame_mask(lengths: torch.Tensor | None, frames: int, hop: int) -> torch.Tensor | None:
    """(B, 1, frames) float mask of the frames a row of its length has: i <= length // hop."""
    if lengths is None:
        return None
    index = torch.arange(frames, device=lengths.device)
    return (index <= lengths[:, None] // hop).to(torch.float32)[:, None, :]


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over ``resolutions``
    ``[(n_fft, hop, win), ...]`` (module docstring). ``forward(x, y, lengths=None)``
    returns a scalar; ``terms(x, y, lengths)`` the two parts, each averaged."""

    def __init__(
        self, resolutions: str | list[tuple[int, int, int]] = "128:32:128,256:64:256,512:128:512"
    ) -> None:
        super().__init__()
        res = (
            parse_triples(resolutions, "stft resolutions")
            if isinstance(resolutions, str)
            else list(resolutions)
        )
        for n_fft, hop, win in res:
            if win > n_fft:
                raise UserError(f"stft resolution {n_fft}:{hop}:{win}: win must be <= n_fft")
        self.resolutions = res

    def terms(
        self, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, lengths = _prepare(x, y, lengths)
        sc_sum = x.new_zeros(())
        mag_sum = x.new_zeros(())
        for n_fft, hop, win in self.resolutions:
            xm = _power(x, n_fft, hop, win).clamp(min=STFT_EPS).sqrt()
            ym = _power(y, n_fft, hop, win).clamp(min=STFT_EPS).sqrt()
            m = _frame_mask(lengths, xm.shape[-1], hop)
            diff2 = (ym - xm).square()
            ref2 = ym.square()
            logd = (ym.log() - xm.log()).abs()
            if m is None:
                sc = diff2.sum().sqrt() / ref2.sum().sqrt()
                mag = logd.mean()
            else:
                m = m.to(x.dtype)
                sc = (diff2 * m).sum().sqrt() / (ref2 * m).sum().sqrt()
                mag = (logd * m).sum() / (m.sum() * xm.shape[1])
            sc_sum = sc_sum + sc
            mag_sum = mag_sum + mag
        n = len(self.resolutions)
        return sc_sum / n, mag_sum / n

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        sc, mag = self.terms(x, y, lengths)
        return sc + mag


class MelL1Loss(nn.Module):
    """Mean ``|log10(mel_x + 1e-5) - log10(mel_y + 1e-5)|``, averaged over ``scales``
    ``[(n_fft, hop, n_mels), ...]`` (window = n_fft), at ``rate`` Hz (module docstring).
    The filterbanks are float64 buffers, cast to the signal's dtype in use."""

    def __init__(
        self,
        rate: int = 8000,
        scales: str | list[tuple[int, int, int]] = "128:32:20,256:64:40,512:128:80",
    ) -> None:
        super().__init__()
        self.scales = (
            parse_triples(scales, "mel scales") if isinstance(scales, str) else list(scales)
        )
        for i, (n_fft, _, n_mels) in enumerate(self.scales):
            self.register_buffer(f"fb{i}", mel_filterbank(n_mels, n_fft, rate), persistent=False)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        x, y, lengths = _prepare(x, y, lengths)
        total = x.new_zeros(())
        for i, (n_fft, hop, n_mels) in enumerate(self.scales):
            fb = getattr(self, f"fb{i}").to(x.dtype)
            # the magnitude floor only guards sqrt's gradient at silence; log10's own floor
            # is MEL_EPS (1e7 times larger), so the value is the evaluation's log mel
            lx = torch.log10(
                fb @ _power(x, n_fft, hop, n_fft).clamp(min=MEL_POWER_EPS).sqrt() + MEL_EPS
            )
            ly = torch.log10(
                fb @ _power(y, n_fft, hop, n_fft).clamp(min=MEL_POWER_EPS).sqrt() + MEL_EPS
            )
            d = (lx - ly).abs()
            m = _frame_mask(lengths, d.shape[-1], hop)
            total = total + (
                d.mean() if m is None else (d * m.to(x.dtype)).sum() / (m.sum() * n_mels)
            )
        return total / len(self.scales)


@dataclass
class AudioLossOptions(Options):
    """The speech codec's reconstruction terms. Default weights are starting points, not
    tuned: EnCodec's time-domain weight 0.1 against 1 for each spectral term."""

    wave_l1_weight: float = option(0.1, "weight of the waveform L1 term", check=nonneg)
    stft_weight: float = option(
        1.0,
        "weight of the multi-resolution STFT loss (spectral convergence + log magnitude)",
        check=nonneg,
    )
    stft_resolutions: str = option(
        "128:32:128,256:64:256,512:128:512",
        "STFT loss resolutions, n_fft:hop:win, comma-separated",
        check=_triples_check,
    )
    mel_weight: float = option(1.0, "weight of the multi-scale log-mel L1 term", check=nonneg)
    mel_scales: str = option(
        "128:32:20,256:64:40,512:128:80",
        "mel loss scales, n_fft:hop:n_mels, comma-separated",
        check=_triples_check,
    )


class AudioReconstructionLoss(nn.Module):
    """``wave_l1_weight * waveform_l1 + stft_weight * STFT + mel_weight * mel`` at ``rate``
    Hz. ``forward(x, y, lengths=None)`` returns ``(total, {"wave_l1", "stft", "mel"})``,
    a term of weight 0 left out (not computed)."""

    def __init__(self, options: AudioLossOptions | None = None, rate: int = 8000) -> None:
        super().__init__()
        self.options = options or AudioLossOptions()
        o = self.options
        self.stft = MultiResolutionSTFTLoss(o.stft_resolutions) if o.stft_weight > 0 else None
        self.mel = MelL1Loss(rate, o.mel_scales) if o.mel_weight > 0 else None

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        terms: dict[str, torch.Tensor] = {}
        if o.wave_l1_weight > 0:
            terms["wave_l1"] = waveform_l1(x, y, lengths)
        if self.stft is not None:
            terms["stft"] = self.stft(x, y, lengths)
        if self.mel is not None:
            terms["mel"] = self.mel(x, y, lengths)
        weights = {"wave_l1": o.wave_l1_weight, "stft": o.stft_weight, "mel": o.mel_weight}
        total = sum((weights[k] * v for k, v in terms.items()), x.new_zeros(()))
        return total, terms
