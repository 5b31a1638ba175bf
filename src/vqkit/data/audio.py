"""Audio clips: WAV decoding (the standard library's ``wave``), the in-memory clip set
:class:`AudioData`, random fixed-length training crops and whole clips for evaluation.

Decoding: PCM WAV only, 8-bit (unsigned), 16-, 24- and 32-bit (little-endian signed), at
any rate, scaled to float32 in [-1, 1): ``s / 2^(bits-1)`` (8-bit: ``(u - 128) / 128``).
A file of several channels is averaged to mono (the codec is mono; averaging keeps the
level of a centred voice), and the clip records how many channels it had. Anything else
is one line naming the file (:class:`~vqkit.errors.UserError`): a corrupt or truncated
file, a non-PCM format (IEEE float, compressed, WAVE_FORMAT_EXTENSIBLE where this
Python's ``wave`` does not read it), an unsupported sample width. An empty WAV (0 frames)
decodes to an empty clip; the dataset loaders refuse it for training data (see
:mod:`vqkit.data.audiofolder`).

Writing (:func:`write_wav`): mono 16-bit PCM, ``round(x * 32768)`` clipped to the int16
range. Training batches (:class:`CropLoader`): random crops of shuffled clips, resumable
from two integers and a count (no RNG state is saved).
"""

from __future__ import annotations

import hashlib
import io
import os
import wave
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..storage.fileio import atomic_write
from .loader import BatchLoader

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioData",
    "CropLoader",
    "Wav",
    "decode_wav",
    "pad_clips",
    "write_wav",
]

AUDIO_EXTENSIONS = (".wav", ".wave")

# wave's "unknown format: N" tags, named for the error line
_FORMAT_NAMES = {
    3: "IEEE float",
    6: "A-law",
    7: "mu-law",
    0x11: "IMA ADPCM",
    0x55: "MP3",
    0xFFFE: "WAVE_FORMAT_EXTENSIBLE",
}


@dataclass(frozen=True, eq=False)
class Wav:
    """One decoded WAV: ``samples`` float32 (T,) mono in [-1, 1), ``rate`` in Hz,
    ``channels`` the file's channel count (> 1: the samples are the channels' mean)."""

    samples: torch.Tensor
    rate: int
    channels: int


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Interleaved little-endian PCM bytes -> float64 in [-1, 1)."""
    if width == 1:  # WAV's 8-bit PCM is unsigned, 128 the zero
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)  # sign of the 24-bit two's complement
        return v.astype(np.float64) / float(1 << 23)
    if width == 4:
        return np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)
    raise AssertionError(width)


def decode_wav(source: bytes | str | os.PathLike[str], name: str | None = None) -> Wav:
    """Decode a PCM WAV file (a path, or its bytes) into a mono float32 :class:`Wav`.

    ``name``: what an error calls the file (default: the path, or "WAV data"). Raises a
    one-line UserError naming it for a corrupt, truncated, non-PCM or unsupported file.
    """
    where = name or (str(source) if not isinstance(source, bytes) else "WAV data")
    try:
        f = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror or e})") from e
    try:
        with f, wave.open(f, "rb") as w:
            channels, width = w.getnchannels(), w.getsampwidth()
            rate, frames = w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except wave.Error as e:
        msg = str(e)
        if msg.startswith("unknown format:"):
            tag = int(msg.split(":", 1)[1].strip())
            kind = _FORMAT_NAMES.get(tag, "compressed")
            extra = (
                " (this Python's wave module reads plain PCM headers only)" if tag == 0xFFFE else ""
            )
            raise UserError(
                f"{where}: {kind} WAV (format tag {tag}), not PCM{extra}; convert it to "
                "16-bit PCM, e.g. 'sox IN -e signed-integer -b 16 OUT.wav'"
            ) from e
        raise UserError(f"{where}: not a valid WAV file ({msg})") from e
    except (EOFError, OSError, ValueError) as e:  # header cut short, or unreadable
        raise UserError(f"{where}: corrupt or truncated WAV ({e or type(e).__name__})") from e
    if width not in (1, 2, 3, 4):
        raise UserError(f"{where}: unsupported sample width {8 * width} bits (8/16/24/32 read)")
    if channels < 1 or rate < 1:
        raise UserError(f"{where}: invalid WAV header ({channels} channels, {rate} Hz)")
    frame = width * channels
    if len(raw) < frames * frame:
        raise UserError(
            f"{where}: truncated WAV: the header says {frames} frames, the file holds "
            f"{len(raw) // frame}"
        )
    x = _pcm_to_float(raw, width).reshape(frames, channels)
    mono = x.mean(axis=1) if channels > 1 else x[:, 0]
    return Wav(torch.from_numpy(mono.astype(np.float32)), rate, channels)


def pad_clips(clips: list[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Clips (T_i,) zero-padded (or cut) to one length: (B, 1, length or max T_i)."""
    n = max((c.numel() for c in clips), default=0) if length is None else length
    out = torch.zeros(len(clips), 1, n, dtype=torch.float32)
    for i, c in enumerate(clips):
        m = min(n, c.numel())
        out[i, 0, :m] = c[:m]
    return out


@dataclass(frozen=True, eq=False)
class AudioData:
    """One split of an audio dataset, held in memory: N mono clips at one rate.

    Attributes:
        samples: float32 (S,), every clip's samples one after another, in [-1, 1].
        offsets: int64 (N + 1,); clip i is ``samples[offsets[i]:offsets[i+1]]``.
        rate: the clips' sample rate (Hz).
        labels: int64 (N,) class index per clip (0 when the source has no classes).
        classes: class names (label i -> classes[i]); empty without classes.
        speakers: int64 (N,) speaker index per clip (0 when the source names none).
        speaker_names: speaker names (speaker i -> speaker_names[i]); empty without them.
        names: each clip's file (a path, or ``archive:member``).
        source, split: where it came from.
        converted: clips averaged to mono from several channels.
    """

    samples: torch.Tensor
    offsets: torch.Tensor
    rate: int
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    speakers: torch.Tensor | None = None
    speaker_names: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    source: str = ""
    split: str = ""
    converted: int = 0

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 (N,): each clip's length in samples."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def seconds(self) -> float:
        """The set's total duration."""
        return self.samples.numel() / self.rate

    def clip(self, i: int) -> torch.Tensor:
        """Clip ``i`` whole: float32 (T_i,) (a view of ``samples``)."""
        return self.samples[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def subset(self, index: torch.Tensor | list[int]) -> AudioData:
        """The clips at ``index`` (int indices or a bool mask of N), in that order."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64)
        clips = [self.clip(int(i)) for i in idx]
        lengths = torch.tensor([c.numel() for c in clips], dtype=torch.int64)
        offsets = torch.zeros(len(clips) + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        samples = torch.cat(clips) if clips else torch.zeros(0, dtype=torch.float32)
        speakers = None if self.speakers is None else self.speakers[idx]
        names = tuple(self.names[int(i)] for i in idx) if self.names else ()
        return AudioData(
            samples, offsets, self.rate, self.labels[idx], self.classes, speakers,
            self.speaker_names, names, self.source, self.split, self.converted,
        )  # fmt: skip

    def speaker_labels(self, index: torch.Tensor | list[int]) -> list[str]:
        """The speaker of each clip at ``index`` by name; ``"all"`` for every clip of a
        source that names no speakers (one speaker)."""
        if self.speakers is None or not self.speaker_names:
            return ["all"] * len(torch.as_tensor(index).reshape(-1))
        return [self.speaker_names[int(self.speakers[int(i)])] for i in index]

    def select_speakers(
        self, speakers: list[str] | None = None, *, exclude: list[str] | None = None
    ) -> AudioData:
        """The clips of the named ``speakers`` (all when None), less those of ``exclude``:
        e.g. a held-out-speaker run trains on ``exclude=["theo"]`` and tests on
        ``speakers=["theo"]``. An unknown name is one line listing the known ones."""
        known = set(self.speaker_names)
        for name in [*(speakers or []), *(exclude or [])]:
            if name not in known:
                listed = ", ".join(self.speaker_names) or "none: the source names no speakers"
                raise UserError(f"{self.source}: no speaker {name!r} (speakers: {listed})")
        assert self.speakers is not None or not known
        keep = torch.ones(len(self), dtype=torch.bool)
        index = {n: i for i, n in enumerate(self.speaker_names)}
        if speakers is not None:
            keep &= torch.isin(self.speakers, torch.tensor([index[n] for n in speakers]))
        if exclude:
            keep &= ~torch.isin(self.speakers, torch.tensor([index[n] for n in exclude]))
        return self.subset(keep)

    def whole(self, index: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole clips for evaluation: ``(x, lengths)``, x float32 (B, 1, max T_i) zero-padded
        after each clip's end, lengths int64 (B,) (``x[b, 0, lengths[b]:] == 0``)."""
        clips = [self.clip(int(i)) for i in torch.as_tensor(index)]
        return pad_clips(clips), torch.tensor([c.numel() for c in clips], dtype=torch.int64)

    def crops(
        self,
        index: torch.Tensor | list[int],
        length: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random fixed-length training crops: ``(x, lengths)``, x float32 (B, 1, length),
        lengths int64 (B,) the real samples in each row (``min(T_i, length)``).

        A clip of T >= length samples is cut at a start uniform in 0 .. T - length; a
        shorter one is taken whole from 0 and zero-padded. One uniform draw per clip from
        ``generator`` whatever the lengths, so the same generator state gives the same
        crops and consumes the same amount of randomness."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise UserError(f"crop length must be a positive number of samples, got {length!r}")
        idx = torch.as_tensor(index, dtype=torch.int64)
        u = torch.rand(idx.numel(), generator=generator, dtype=torch.float64)
        x = torch.zeros(idx.numel(), 1, length, dtype=torch.float32)
        lengths = torch.empty(idx.numel(), dtype=torch.int64)
        for b, i in enumerate(idx.tolist()):
            clip = self.clip(i)
            room = clip.numel() - length
            start = min(int(u[b] * (room + 1)), room) if room > 0 else 0
            piece = clip[start : start + length]
            x[b, 0, : piece.numel()] = piece
            lengths[b] = piece.numel()
        return x, lengths


def write_wav(path: str | os.PathLike[str], samples: torch.Tensor, rate: int) -> None:
    """Write mono ``samples`` (T,) float in [-1, 1] as a 16-bit PCM WAV at ``rate`` Hz
    (``round(x * 32768)`` clipped to [-32768, 32767]; atomically)."""
    x = samples.detach().reshape(-1).double().cpu().numpy()
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes()

    def write(tmp: str) -> None:
        with wave.open(tmp, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(rate))
            w.writeframes(pcm)

    atomic_write(path, write)


def _crop_seed(seed: int, rank: int, batch: int) -> int:
    # a hash, not a sum: (seed 1, batch 0) and (seed 0, batch 1) must draw differently
    digest = hashlib.sha256(f"vqkit-audio-crop:{seed}:{rank}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class CropLoader:
    """Endless batches of random ``length``-sample crops (:meth:`AudioData.crops`) of the
    clips of ``data``: ``(x, lengths)``, x float32 (B, 1, length), lengths int64 (B,).

    The clip order is :class:`~vqkit.data.loader.BatchLoader`'s (a seeded permutation per
    epoch, this rank's share of it, whole batches only); batch ``n`` of this rank draws
    its crop starts from a generator seeded by a hash of (seed, rank, n). The state is
    the order's (epoch, position) and ``n``, so a resumed loader yields exactly the
    batches an uninterrupted one would."""

    def __init__(
        self,
        data: AudioData,
        batch_size: int,
        length: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        self.data, self.length, self.seed, self.rank = data, int(length), int(seed), rank
        self.order = BatchLoader(len(data), batch_size, seed=seed, rank=rank, world_size=world_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batches = 0  # batches this rank drew: the crop generator's counter

    @property
    def epoch(self) -> int:
        """Epoch the next batch belongs to (0-based)."""
        return self.order.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.order.next_indices()
        g = torch.Generator()
        g.manual_seed(_crop_seed(self.seed, self.rank, self.batches))
        self.batches += 1
        x, lengths = self.data.crops(idx, self.length, generator=g)
        return x.to(self.device), lengths.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), "batches": self.batches, "length": self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the clip count, batch and crop length must
        match: one line otherwise)."""
        if int(state.get("length", self.length)) != self.length:
            raise UserError(
                f"loader state does not match: crops of {state['length']} samples in the "
                f"state, {self.length} here"
            )
        self.order.load_state_dict(state)
        self.batches = int(state.get("batches", 0))
