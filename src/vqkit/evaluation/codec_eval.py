"""The speech codec's evaluation: per stage count, its bitrate and what it sounds like.

For each stage count ``n`` (the first ``n`` residual stages decode; every ``n`` in
``1..Q`` by default, or a declared list), on whole clips of an
:class:`~vqkit.data.AudioData` split:

* ``kbps``: the uncoded bitrate, ``frames_per_second * n * log2 K / 1000``
  (:meth:`vqkit.models.AudioCodec.bitrate`);
* ``si_sdr``: SI-SDR in dB (:func:`~vqkit.evaluation.audio_metrics.si_sdr`), the mean over
  the clips (a silent clip, where it is undefined, is left out and counted);
* ``mel_distance``: the log-mel distance (:func:`~.audio_metrics.mel_distance`), the mean
  over the clips longer than its window's half (257 samples; shorter ones counted);
* ``pesq_nb`` and ``stoi`` (when asked, and the ``audio-eval`` extra is installed): per
  speaker, that speaker's clips joined in split order (:func:`~.audio_metrics.join_by_speaker`)
  and the decoded clips joined the same way, the decoded signal lined up with the
  original by :func:`~.audio_metrics.align` (lag within one frame), scored, and the
  mean over the speakers reported, and each speaker's under ``per_speaker`` (keyed by
  name; a source without speakers is one "speaker", ``"all"``). FSDD's
  clips last about 0.4 s, too short for PESQ and STOI alone; joined, a speaker's 50 test
  clips make about 20 s. PESQ works at 8 or 16 kHz only; elsewhere it is left out.

Every clip is encoded once, alone (no padding from other clips reaches it), and decoded
once for all stage counts together: the stage counts' code prefixes are one batch, the
stages past ``n`` set to -1 (no code). Codebook health (:func:`codes_used`): the codes
each stage uses on the clips, from ``encode``'s indices and ``num_codes`` alone (the
quantizer contract).

:func:`codec_report` is what an ``eval.json`` of the codec holds (the training job's
final one and ``vqkit eval``'s); :func:`write_samples` the spectrograms and WAV samples
beside it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.audio import AudioData, write_wav
from ..errors import UserError
from ..models.audio_codec import AudioCodec
from .audio_metrics import (
    align,
    audio_eval_available,
    join_by_speaker,
    mel_distance,
    pesq_nb,
    si_sdr,
    stoi,
)

__all__ = [
    "codec_report",
    "codes_used",
    "decode_clip",
    "evaluate_codec",
    "parse_stages",
    "pick_clips",
    "write_samples",
]

MEL_MIN_SAMPLES = 257  # mel_distance's n_fft 512 needs more than 256 samples


def parse_stages(text: str, num_stages: int) -> list[int]:
    """``""`` -> ``[1, ..., Q]``; ``"1,2,8"`` -> ``[1, 2, 8]`` (sorted, each in 1..Q);
    one line otherwise."""
    if not text.strip():
        return list(range(1, num_stages + 1))
    try:
        out = sorted({int(s) for s in text.split(",")})
    except ValueError:
        out = []
    if not out or out[0] < 1 or out[-1] > num_stages:
        raise UserError(
            f"eval stages must be comma-separated stage counts in 1..{num_stages}; got {text!r}"
        )
    return out


def pick_clips(data: AudioData, limit: int) -> list[int]:
    """``limit`` clip indices evenly strided over the split (0 or more than it: all), so
    a split sorted by class or speaker is still covered."""
    n = len(data)
    if limit <= 0 or limit >= n:
        return list(range(n))
    return torch.linspace(0, n - 1, limit).round().long().tolist()


@torch.no_grad()
def decode_clip(
    model: AudioCodec, clip: torch.Tensor, stages: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (T, Q) or (T,), decoded float32 (len(stages), L)) of one clip (L,): the clip
    encoded alone and decoded with the first ``stages[i]`` stages in row i."""
    device = next(model.parameters()).device
    x = clip.reshape(1, 1, -1).to(device)
    codes = model.encode(x)  # (1, T, Q) or (1, T)
    if codes.dim() == 3:
        batch = codes.expand(len(stages), -1, -1).clone()
        for i, n in enumerate(stages):
            batch[i, :, n:] = -1  # the stages past n: no code
    else:
        batch = codes.expand(len(stages), -1)
    decoded = model.decode(batch, length=x.shape[-1])[:, 0].float().cpu()
    return codes[0].cpu(), decoded


def codes_used(codes: list[torch.Tensor], num_codes: int) -> list[int]:
    """Distinct codes per stage over the clips' code arrays ((T, Q) each, or (T,))."""
    flat = torch.cat([c.reshape(c.shape[0], -1) for c in codes])  # (sum T, Q)
    return [int(torch.bincount(col, minlength=num_codes).gt(0).sum()) for col in flat.T]


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _speech_scores(
    originals: list[torch.Tensor],
    decoded: list[torch.Tensor],
    speakers: list[int],
    rate: int,
    max_lag: int,
) -> dict[str, Any]:
    """Mean narrowband PESQ and STOI over the speakers, and each speaker's under
    ``per_speaker`` (module docstring)."""
    refs = join_by_speaker(originals, speakers)
    decs = join_by_speaker(decoded, speakers)
    pesq_values, stoi_values, failed, each = [], [], [], {}
    for who, ref in refs.items():
        deg = align(ref, decs[who], max_lag=max_lag).degraded
        each[str(who)] = {"stoi": stoi(ref, deg, rate)}
        stoi_values.append(each[str(who)]["stoi"])
        if rate in (8000, 16000):
            try:
                each[str(who)]["pesq_nb"] = pesq_nb(ref, deg, rate)
                pesq_values.append(each[str(who)]["pesq_nb"])
            except UserError as e:  # e.g. no utterance found in a near-silent signal
                failed.append(f"{who}: {e}")
    out: dict[str, Any] = {"stoi": _mean(stoi_values)}
    if rate in (8000, 16000):
        out["pesq_nb"] = _mean(pesq_values) if pesq_values else None
        if failed:
            out["pesq_failed"] = failed
    out["per_speaker"] = each
    return out


@torch.no_grad()
def evaluate_codec(
    model: AudioCodec,
    data: AudioData,
    *,
    stages: Sequence[int] | None = None,
    limit: int = 0,
    speech_scores: bool = False,
) -> dict[str, Any]:
    """The figures of the module docstring on ``limit`` clips of ``data`` (0: all), at
    the model's rate (``data.rate`` must be it), in eval mode (restored after).

    Returns ``{"clips", "stages": [{"num_stages", "kbps", "si_sdr", "mel_distance"[,
    "pesq_nb", "stoi", "per_speaker"]}, ...], "codes_used": [per stage], "num_codes",
    "silent_clips", "short_clips"}``. ``speech_scores``: PESQ / STOI too (one line naming the
    ``audio-eval`` extra when it is absent)."""
    rate = model.config.sample_rate
    if data.rate != rate:
        raise UserError(f"clips at {data.rate} Hz for a codec at {rate} Hz: resample them")
    stages = list(stages) if stages else list(range(1, model.num_stages + 1))
    pick = pick_clips(data, limit)
    was_training = model.training
    model.eval()
    try:
        originals, codes, decoded = [], [], []
        for i in pick:
            clip = data.clip(i)
            c, d = decode_clip(model, clip, stages)
            originals.append(clip)
            codes.append(c)
            decoded.append(d)
    finally:
        model.train(was_training)
    silent = sum(float(c.double().pow(2).sum()) == 0.0 for c in originals)
    short = sum(c.numel() < MEL_MIN_SAMPLES for c in originals)
    speakers = data.speaker_labels(pick)  # per_speaker is keyed by these names
    rows = []
    for j, n in enumerate(stages):
        sdr, mel = [], []
        for ref, dec in zip(originals, decoded, strict=True):
            if float(ref.double().pow(2).sum()) > 0.0:
                sdr.append(si_sdr(ref, dec[j]))
            if ref.numel() >= MEL_MIN_SAMPLES:
                mel.append(mel_distance(ref, dec[j], rate))
        row: dict[str, Any] = {
            "num_stages": n,
            "kbps": model.bitrate(n if model.num_stages > 1 else None) / 1000.0,
            "si_sdr": _mean(sdr),
            "mel_distance": _mean(mel),
        }
        if speech_scores:
            row.update(
                _speech_scores(originals, [d[j] for d in decoded], speakers, rate, model.hop)
            )
        rows.append(row)
    return {
        "clips": len(pick),
        "stages": rows,
        "num_codes": model.num_codes,
        "codes_used": codes_used(codes, model.num_codes),
        "silent_clips": int(silent),
        "short_clips": int(short),
    }


def codec_report(
    model: AudioCodec, data: AudioData, *, stages: Sequence[int] | None = None, limit: int = 0
) -> dict[str, Any]:
    """:func:`evaluate_codec` with PESQ / STOI when the ``audio-eval`` extra is installed,
    headed by the codec's ``sample_rate``, ``frames_per_second`` and what ``speech_scores``
    are: the body of the codec's ``eval.json``."""
    speech = audio_eval_available()
    result = evaluate_codec(model, data, stages=stages, limit=limit, speech_scores=speech)
    return {
        "sample_rate": model.config.sample_rate,
        "frames_per_second": model.frames_per_second,
        "speech_scores": "joined per speaker, aligned"
        if speech
        else "absent: pip install 'vqkit[audio-eval]' for PESQ and STOI",
        **result,
    }


def write_samples(
    model: AudioCodec,
    data: AudioData,
    stages: Sequence[int],
    count: int,
    out: str | os.PathLike[str],
) -> list[Path]:
    """``count`` strided clips of ``data`` as ``out/samples/clipI_original.wav`` and
    ``clipI_q{n}.wav`` (decoded with the lowest and the highest of ``stages``), and their
    log-mel spectrograms as ``out/spectrograms.png`` (in eval mode, restored after);
    returns the files written (none for ``count`` 0)."""
    from .plots import plot_spectrograms

    if count == 0 or len(data) == 0:
        return []
    out = Path(out)
    shown = sorted({min(stages), max(stages)})
    rate, rows, written = model.config.sample_rate, [], []
    (out / "samples").mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        for i in pick_clips(data, count):
            clip = data.clip(i)
            _, decoded = decode_clip(model, clip, shown)
            row = {"original": clip}
            written.append(out / "samples" / f"clip{i}_original.wav")
            write_wav(written[-1], clip, rate)
            for q, dec in zip(shown, decoded, strict=True):
                kbps = model.bitrate(q if model.num_stages > 1 else None) / 1000
                row[f"{q} stage{'s' * (q > 1)}, {kbps:.2g} kbps"] = dec
                written.append(out / "samples" / f"clip{i}_q{q}.wav")
                write_wav(written[-1], dec, rate)
            rows.append(row)
    finally:
        model.train(was_training)
    plot_spectrograms(rows, rate, out / "spectrograms.png")
    return [*written, out / "spectrograms.png"]
