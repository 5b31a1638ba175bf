"""Band-limited resampling by a rational factor: a polyphase windowed-sinc filter.

The same filter and alignment as ``scipy.signal.resample_poly`` with its default Kaiser
window (scipy is not a dependency of vqkit, and torchaudio is not one either): for a rate
change ``new / orig`` reduced to ``up / down`` (``g = gcd(orig, new)``), with
``R = max(up, down)``, ``H = 10 R`` and ``h`` the ``2H + 1``-tap low-pass at ``1/R`` of
the up-sampled Nyquist rate (sinc x Kaiser(beta=5), scaled to a DC gain of ``up``),

    y[k] = sum_n x[n] h[H + k down - n up],   k = 0 .. ceil(T up / down) - 1,

i.e. zero-stuffing by ``up``, the zero-phase filter, keeping every ``down``-th sample;
``x`` is zero outside ``0 .. T-1``. Only the ``ceil((2H + 1) / up)`` taps of each output's
phase are computed (a gather, in chunks of outputs), never the zero-stuffed signal.
"""

from __future__ import annotations

import math

import torch

from ..errors import UserError

__all__ = ["lowpass_filter", "resample", "resampled_length"]

KAISER_BETA = 5.0  # scipy.signal.resample_poly's default window ("kaiser", 5.0)
_CHUNK = 1 << 16  # outputs per gather: bounds the (chunk, taps) scratch


def _factors(orig_rate: int, new_rate: int) -> tuple[int, int]:
    for name, r in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise UserError(f"{name} must be a positive integer (Hz), got {r!r}")
    g = math.gcd(orig_rate, new_rate)
    return new_rate // g, orig_rate // g


def resampled_length(length: int, orig_rate: int, new_rate: int) -> int:
    """Samples after resampling ``length`` samples: ``ceil(length * up / down)``."""
    up, down = _factors(orig_rate, new_rate)
    return -(-length * up // down)


def lowpass_filter(up: int, down: int) -> torch.Tensor:
    """The float64 filter ``h`` (2H + 1 taps, H = 10 max(up, down)) of the module docstring:
    ``sinc(f (i - H)) f * kaiser(i)`` with cutoff ``f = 1 / max(up, down)``, scaled to sum to
    ``up`` (the zero-stuffed signal has ``1 / up`` of the energy at DC)."""
    rate = max(up, down)
    half = 10 * rate
    t = torch.arange(-half, half + 1, dtype=torch.float64) / rate
    h = torch.sinc(t) * torch.kaiser_window(
        2 * half + 1, periodic=False, beta=KAISER_BETA, dtype=torch.float64
    )
    return h * (up / h.sum())


def resample(x: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """``x`` (..., T) at ``orig_rate`` Hz resampled to ``new_rate`` Hz: (..., T') with
    ``T' = ceil(T up / down)`` (see the module docstring for the filter). Computed in
    float64, returned in ``x``'s floating dtype; the same rate returns ``x`` itself."""
    up, down = _factors(orig_rate, new_rate)
    if not x.is_floating_point():
        raise UserError(f"resample needs a floating-point waveform, got {x.dtype}")
    if up == down:
        return x
    h = lowpass_filter(up, down)
    half = (h.numel() - 1) // 2
    taps = -(-h.numel() // up)  # taps per phase
    # phases[r, j] = h[r + j up]: output k uses phase r(k) and inputs n(k) - j
    padded = torch.zeros(up * (taps + 1), dtype=torch.float64)
    padded[: h.numel()] = h
    phases = padded.reshape(taps + 1, up).t()[:, :taps].to(x.device)
    shape, length = x.shape[:-1], x.shape[-1]
    n_out = -(-length * up // down)
    flat = x.reshape(-1, length).to(torch.float64)
    # x zero outside 0..T-1: pad so that index n lives at n + taps
    flat = torch.nn.functional.pad(flat, (taps, taps + 1))
    out = torch.empty(flat.shape[0], n_out, dtype=torch.float64, device=x.device)
    j = torch.arange(taps, device=x.device)
    for start in range(0, n_out, _CHUNK):
        k = torch.arange(start, min(n_out, start + _CHUNK), device=x.device)
        pos = k * down + half  # h index of input 0 is pos; of input n it is pos - n up
        last = pos // up  # the last input with a tap: pos - n up >= 0
        phase = pos - last * up
        idx = (last[:, None] - j[None, :]).clamp(min=-taps) + taps  # (chunk, taps)
        # inputs beyond T (or before 0) read the zero padding
        idx = idx.clamp(max=flat.shape[1] - 1)
        out[:, start : start + k.numel()] = (flat[:, idx] * phases[phase]).sum(-1)
    return out.reshape(*shape, n_out).to(x.dtype)
