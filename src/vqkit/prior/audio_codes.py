"""A speech codec's codes as a prior's sequences: clips encoded whole, cut into windows.

A speech codec (:class:`~vqkit.models.AudioCodec`) turns a clip of L samples into
``F = ceil(L / hop)`` frames of Q codes (residual stages, coarse to fine). A prior
models **windows** of W frames (``audio_window``, a training option): a clip's codes
(F, Q) are cut from its start into ``ceil(F / W)`` windows (W, Q), the last one holding
the ``F - (ceil(F / W) - 1) W`` frames left and padded with :data:`~vqkit.prior.PAD`,
which the loss and the log-likelihood leave out. ``vqkit compress`` codes a clip window
by window at the same cuts, each window from a fresh context, the last one only as far
as the clip goes (:mod:`vqkit.compress.audio`): training and coding see the same
windows. The default, 32 frames (1.28 s at the default codec's 25 frames/s), keeps
every FSDD clip but one in 1000 whole (their median is 11 frames, the longest 58), so
almost no clip loses context at a cut; the price is padding (about 2/3 of a window on
FSDD), compute the masked loss wastes but no bit.

**Order: frame-major**, per frame stage 0 first, then the finer stages: the row-major
order of (W, Q), exactly the raster order of an image tokenizer's (h, w, Q) residual
codes (:func:`~vqkit.prior.flatten_codes`). Every code is predicted from the coarser
stages of its own frame (the residual stages depend on each other most) and from every
earlier frame; the order is causal in time (a decoder has a frame's codes before the
next frame's: streaming); and the exact integer twin and the coding loops take it as
they are. Its cost: a prefix of the stages is not a prefix of the sequence, so the
bitrate at fewer stages is that of a prior trained on those stages (``audio_stages``),
not a truncation of this one; the per-stage figures of :func:`stage_bits` say what each
stage costs given everything before it.

Clips are encoded one at a time, not in zero-padded batches: a non-causal encoder's last
frames would see the padding, and the codes would differ from those ``vqkit compress``
gets for the same clip alone. Labels: none (the prior is unconditional; a speech codec's
clips have no class it should code with).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import AudioCodec
from .codes import CodeData, Tokenizer
from .sampling import PAD

__all__ = [
    "audio_rates",
    "audio_source",
    "clip_codes",
    "decode_windows",
    "encode_clips",
    "load_audio_codes",
    "stage_bits",
    "stage_count",
    "window_count",
    "windows",
]


def stage_count(model: AudioCodec, stages: int) -> int:
    """The stages a prior models: ``stages`` (``audio_stages``; 0: all), checked
    against the codec in one line."""
    if stages == 0:
        return model.num_stages
    model.bitrate(stages)  # the codec's own one-line check of a stage count
    return stages


def clip_codes(model: AudioCodec, wav: torch.Tensor, stages: int) -> torch.Tensor:
    """One clip (L,) at the codec's rate -> its codes (F, n) int64 on the CPU, F =
    ``ceil(L / hop)``, the first n = ``stages`` stages (one column for a codec of one
    code per frame). Encoded alone (the module docstring says why)."""
    device = next(model.parameters()).device
    x = wav.reshape(1, 1, -1).to(device=device, dtype=torch.float32)
    codes = model.encode(x, stages if model.num_stages > 1 else None)[0].cpu()
    return codes if codes.dim() == 2 else codes[:, None]


def window_count(frames: int, window: int) -> int:
    """Windows of ``window`` frames a clip of ``frames`` frames is cut into."""
    return -(-int(frames) // int(window))


def windows(codes: torch.Tensor, window: int) -> torch.Tensor:
    """A clip's codes (F, n) -> (ceil(F / W), W, n) windows, the last padded with PAD."""
    f, n = codes.shape
    count = window_count(f, window)
    out = torch.full((count * window, n), PAD, dtype=torch.long)
    out[:f] = codes
    return out.reshape(count, window, n)


def decode_windows(model: AudioCodec, codes: torch.Tensor) -> torch.Tensor:
    """Windows (B, W, n) of codes (no padding) -> waveforms (B, 1, W hop)."""
    device = next(model.parameters()).device
    codes = codes.to(device)
    return model.decode(codes if model.num_stages > 1 else codes[..., 0])


@torch.no_grad()
def encode_clips(
    model: AudioCodec, clips: Any, window: int, stages: int, *, progress: bool = False
) -> CodeData:
    """Every clip of an :class:`~vqkit.data.AudioData` split as windows (N, W, n), the
    clips in order, each clip's windows in order; unconditional labels."""
    was = model.training
    model.eval()
    order: Any = range(len(clips))
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(order, desc=f"encode {clips.split}", unit="clip")
    parts = [windows(clip_codes(model, clips.clip(i), stages), window) for i in order]
    model.train(was)
    codes = torch.cat(parts) if parts else torch.zeros(0, window, stages, dtype=torch.long)
    return CodeData(codes, torch.zeros(len(codes), dtype=torch.long), (), clips.split)


def audio_source(tok: Tokenizer, data: str | os.PathLike[str] | None = None) -> str:
    """The clips a speech codec's prior is trained on: ``data``, else the data the codec
    was trained on (its run's ``train.data``, or its export's record); one line when it
    records none."""
    if data is not None:
        return str(data)
    train = tok.run_config.get("train")
    recorded = train.get("data") if isinstance(train, dict) else None
    recorded = recorded or getattr(tok.model, "pretrained_info", {}).get("data")
    if not isinstance(recorded, str) or not recorded:
        raise UserError(
            f"speech codec {tok.checkpoint} records no training data; pass --data (a WAV "
            "folder, a tar of one, or FSDD)"
        )
    return recorded


def load_audio_codes(
    tok: Tokenizer,
    *,
    window: int,
    stages: int = 0,
    data: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> tuple[CodeData, CodeData, bool]:
    """(train, test, cached) windows of a speech codec's splits (the codec's data unless
    ``data``), resampled to the codec's rate; ``stages``: the first n stages (0: all).
    Encoded every time (not cached: the windows depend on the prior's options)."""
    from ..data import load_audio

    if not tok.is_audio:
        raise UserError("audio_window / audio_stages apply to a speech codec's codes")
    model = tok.model
    n = stage_count(model, stages)
    source = audio_source(tok, data)
    if not Path(source).exists():
        raise UserError(f"the speech codec's data {source} is not there; pass --data")
    rate = model.config.sample_rate
    out = []
    for split in ("train", "test"):
        clips = load_audio(source, split, rate=rate)
        out.append(encode_clips(model, clips, window, n, progress=progress))
    record = {
        "source": str(Path(source).resolve()),
        "modality": "audio",
        "sample_rate": rate,
        "audio_window": window,
        "audio_stages": n,
        "eval_split": "test",
    }
    out[0].data = out[1].data = record
    return out[0], out[1], False


def audio_rates(model: AudioCodec, stages: int, bits: float) -> dict[str, float]:
    """The bitrates of a prior's NLL ``bits`` per code over ``stages`` stages:
    ``kbps`` (bits x codes per second / 1000: what entropy coding with the prior
    spends), ``raw_kbps`` (the codec's uncoded ``frames/s x n x log2 K``) and their
    ratio."""
    codes_per_s = model.frames_per_second * stages
    raw = model.bitrate(stages) / 1000.0
    kbps = bits * codes_per_s / 1000.0
    return {"kbps": kbps, "raw_kbps": raw, "kbps_ratio": kbps / raw if raw else math.nan}


def stage_bits(nll: torch.Tensor, count: torch.Tensor, stages: int) -> list[float]:
    """Bits per code of each stage from per-position sums over a split: ``nll`` (T,)
    (bits) and ``count`` (T,) (codes present) of frame-major (W, n) windows."""
    per = nll.reshape(-1, stages).sum(0)
    codes = count.reshape(-1, stages).sum(0).clamp_min(1)
    return [float(v) for v in per / codes]
