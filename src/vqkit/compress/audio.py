"""A speech codec's clips to ``.vqz`` files and back (format version 3, the ``AUDIO`` flag).

A WAV (any rate; several channels averaged to mono by :func:`vqkit.data.decode_wav`) is
resampled to the codec's rate (:mod:`vqkit.data.resample`), encoded whole by the codec
(:func:`vqkit.prior.audio_codes.clip_codes`: F frames of the n stages the prior models)
and cut into ``N = ceil(F / W)`` windows (W, n), the prior's code shape, at the cuts its
training data had (:mod:`vqkit.prior.audio_codes`). The windows are one stream, coded
under the prior's exact integer twin (:class:`.exact.ExactPrior`, model 1) in the
symbol order of image maps (:mod:`.streams`: groups of 64 windows, each window from a
fresh context, frame-major: per frame stage 0 first), the last window only as far as the
clip goes, its ``(F - (N - 1) W) n`` first positions (the ``tails`` of the coding loops).
The header's audio block carries the WAV's rate and length and F; the checksum covers
the clip's codes (F, n) (docs/format.md).

Decoding returns the codes exactly (any machine: the twin's integers), and the WAV: the
codec's decoding at its rate, trimmed to the resampled length, resampled back to the
file's rate and trimmed or zero-padded to its length. The waveform is the codec's float
decoder's output (the codes, not the samples, are what decode bit-identically).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..data.resample import resample, resampled_length
from ..errors import UserError
from ..prior.audio_codes import clip_codes, windows
from . import format as fmt
from .codec import Codec, DecodeError, load_codec, unpack_checked
from .coder import CoderError
from .streams import StreamStats, decode_streams, encode_streams

__all__ = [
    "check_clip",
    "codes_to_wav",
    "decode_audio",
    "decode_clips",
    "encode_audio",
    "encode_clips",
    "wav_codes",
]


def _codec(prior: Codec | str | os.PathLike[str]) -> Codec:
    codec = prior if isinstance(prior, Codec) else load_codec(prior)
    if not codec.audio:
        raise UserError("this prior models an image tokenizer's codes, not a speech codec's")
    return codec


def _shape(codec: Codec) -> tuple[int, int]:
    window, stages = codec.code_shape
    return int(window), int(stages)


def wav_codes(
    codec: Codec, samples: torch.Tensor | np.ndarray, rate: int
) -> tuple[torch.Tensor, fmt.AudioInfo]:
    """A clip (L,) float in [-1, 1] at ``rate`` Hz -> (its codes (F, n) int64, the
    audio block of its file)."""
    model = codec.tokenizer
    x = torch.as_tensor(np.asarray(samples) if not torch.is_tensor(samples) else samples)
    if not x.is_floating_point() or x.dim() != 1 or x.numel() == 0:
        raise UserError(
            f"expected one mono clip (L,) of float samples; got {x.dtype} {tuple(x.shape)}"
        )
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= fmt.MAX_RATE:
        raise UserError(f"sample rate must be an int in [1, {fmt.MAX_RATE}] Hz; got {rate!r}")
    if x.numel() >= 1 << 32:
        raise UserError(f"a clip of {x.numel()} samples does not fit the format")
    wav = resample(x.float(), rate, model.config.sample_rate)
    codes = clip_codes(model, wav, _shape(codec)[1])
    return codes, fmt.AudioInfo(rate, int(x.numel()), int(codes.shape[0]))


def encode_clips(
    codec: Codec,
    clips: Sequence[tuple[torch.Tensor, fmt.AudioInfo]],
    stats: list[dict[str, float]] | None = None,
) -> list[bytes]:
    """Clips' codes ((F, n), audio block) -> one file's bytes each, coded side by side."""
    window, stages = _shape(codec)
    streams, tails, sums = [], [], []
    for codes, info in clips:
        codes = torch.as_tensor(codes).long()
        if codes.dim() != 2 or codes.shape[1] != stages or codes.shape[0] != info.frames:
            raise UserError(f"expected codes ({info.frames}, {stages}); got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codec.num_symbols):
            raise UserError(f"codes must be in [0, {codec.num_symbols}) for this prior")
        # the prior's training cuts; its padding read as code 0 here, never coded
        cut = windows(codes, window).clamp_min(0)
        n = cut.shape[0]
        streams.append((cut.reshape(n, window * stages).numpy(), codec.labels(None, n)))
        tails.append((info.frames - (n - 1) * window) * stages)
        sums.append(fmt.code_checksum(codes.numpy()))
    st = [StreamStats() for _ in clips]
    payloads = encode_streams(codec.exact, streams, st, tails)
    return [
        codec.pack(payload, y, sums[i], st[i], stats[i] if stats else None, audio=info)
        for i, ((_, info), (_, y), payload) in enumerate(zip(clips, streams, payloads, strict=True))
    ]


def check_clip(codec: Codec, header: fmt.Header, where: str) -> fmt.AudioInfo:
    """The audio block of a clip's file, checked against the codec (after
    :meth:`Codec.check`): its frame count is the codec's for a WAV of that rate and
    length. DecodeError (one line) otherwise."""
    info = header.audio
    if info is None:
        raise DecodeError(f"{where} holds image code maps, not a speech codec's clip")
    model = codec.tokenizer
    frames = model.frames(resampled_length(info.length, info.rate, model.config.sample_rate))
    if frames != info.frames:
        raise DecodeError(
            f"{where}: {info.frames} frames stated for {info.length} samples at {info.rate} Hz; "
            f"the codec makes {frames} (a corrupt or crafted header)"
        )
    return info


def decode_clips(
    codec: Codec, datas: Sequence[bytes], wheres: Sequence[str] | None = None
) -> list[tuple[torch.Tensor, fmt.Header]]:
    """Files -> (codes (F, n) int64, header) each, decoded side by side; DecodeError /
    FormatError (one line, naming the file) for one that cannot be decoded here."""
    wheres = list(wheres) if wheres is not None else ["the data"] * len(datas)
    window, stages = _shape(codec)
    parsed = []
    for (header, payload), where in zip(unpack_checked(codec, datas, wheres), wheres, strict=True):
        info = check_clip(codec, header, where)
        tail = (info.frames - (header.num_maps - 1) * window) * stages
        parsed.append((header, (payload, torch.tensor(header.labels)), tail))
    streams, tails = [p[1] for p in parsed], [p[2] for p in parsed]
    try:
        decoded = decode_streams(codec.exact, streams, tails=tails)
    except CoderError as e:
        for (_, stream, tail), where in zip(parsed, wheres, strict=True):
            try:  # which file: one at a time (rare: a corrupt payload)
                decode_streams(codec.exact, [stream], tails=[tail])
            except CoderError:
                raise DecodeError(f"{where}: {e}") from None
        raise DecodeError(f"{wheres[0]}: {e}") from None
    out = []
    for (header, _, _), seqs, where in zip(parsed, decoded, wheres, strict=True):
        codes = torch.from_numpy(seqs).reshape(-1, stages)[: header.audio.frames]
        if fmt.code_checksum(codes.numpy()) != header.checksum:
            raise DecodeError(f"{where}: the decoded codes fail the file's checksum")
        out.append((codes, header))
    return out


@torch.no_grad()
def codes_to_wav(codec: Codec, codes: torch.Tensor, info: fmt.AudioInfo) -> torch.Tensor:
    """A clip's codes (F, n) -> its samples (length,) float32 at the file's rate."""
    model = codec.tokenizer
    rate = model.config.sample_rate
    length = resampled_length(info.length, info.rate, rate)
    x = codes.to(next(model.parameters()).device)[None]
    wav = model.decode(x if model.num_stages > 1 else x[..., 0], length=length)[0, 0].cpu()
    back = resample(wav, rate, info.rate)[: info.length]
    return torch.nn.functional.pad(back, (0, info.length - back.numel()))


def encode_audio(
    samples: torch.Tensor | np.ndarray,
    rate: int,
    prior: Codec | str | os.PathLike[str],
    *,
    stats: dict[str, float] | None = None,
) -> bytes:
    """A mono clip (L,) at ``rate`` Hz -> the bytes of its ``.vqz`` file (``stats``, when
    given: ``ideal_bits``, ``payload_bytes``, ``header_bytes``, ``codes``)."""
    codec = _codec(prior)
    box = [stats] if stats is not None else None
    return encode_clips(codec, [wav_codes(codec, samples, rate)], box)[0]


def decode_audio(
    data: bytes, prior: Codec | str | os.PathLike[str]
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The bytes of :func:`encode_audio` -> (samples (length,), rate, codes (F, n))."""
    codec = _codec(prior)
    codes, header = decode_clips(codec, [data])[0]
    return codes_to_wav(codec, codes, header.audio), header.audio.rate, codes
