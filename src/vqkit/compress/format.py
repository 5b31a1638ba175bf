"""The container of a compressed code map (``.vqz``), format versions 2 and 3 (3: a
speech codec's clip, the ``AUDIO`` flag and its block); version 1 is still read. The
byte layout, the bounds of every field and the checks a decoder makes, in order, are
specified in ``docs/format.md``.

A file is a header (magic, version, flags, dtype, the coding model, tokenizer and prior
hashes, code-map shape, symbol count K, the class of each of the N maps, a checksum of
the codes) and a CRC-32 of every byte but its own, followed by the range coder's
payload (:mod:`.coder`). :func:`unpack` trusts no field: each is bounded before
anything is sized by it (a count of maps must have its label bytes present), so memory
grows with the file, not with what its header claims, and every bad file is one
:class:`FormatError` line. The CRC tells a damaged file from one that is intact but
decodes to other codes than were written (the checksum: refused rather than decoded to
a wrong image).

A clip of a speech codec (:mod:`.audio`) is a version-3 file with the ``AUDIO`` flag:
its maps are the windows (W, Q) of the clip's F frames, and an audio block after N
carries the WAV's rate and length in samples and F, bounded here (N must be
``ceil(F / W)``) and checked against the codec by the decoder. Image files stay version
2 (the lowest version that holds a file is written), so older readers still read them.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

__all__ = [
    "AUDIO_VERSION",
    "DTYPES",
    "FLAG_AUDIO",
    "FLAG_BATCH_AXIS",
    "FLAG_CODES",
    "MAGIC",
    "MAX_SYMBOLS",
    "MODELS",
    "MODEL_EXACT_NEXT_SCALE",
    "MODEL_EXACT_V1",
    "MODEL_FLOAT",
    "READ_VERSIONS",
    "VERSION",
    "AudioInfo",
    "FormatError",
    "Header",
    "code_checksum",
    "pack",
    "unpack",
]

MAGIC = b"VQKZ"
VERSION = 2
"""The version this vqkit writes for a tokenizer's code maps."""
AUDIO_VERSION = 3
"""The version of a speech codec's clip (the ``AUDIO`` flag and its block)."""
READ_VERSIONS = (1, 2, 3)
"""The versions this vqkit reads."""
FLAG_CODES = 1
FLAG_BATCH_AXIS = 2
FLAG_AUDIO = 4
"""Version 3: the maps are the windows of one clip; an audio block follows N."""
MAX_RATE = 768_000
"""Largest sample rate (Hz) an audio block may state."""
# the integer dtypes a --codes .npy may have (little-endian), by their stored index
DTYPES = ("<i8", "<i4", "<i2", "<i1", "<u8", "<u4", "<u2", "<u1")
HASH_BYTES = 8
MODEL_FLOAT = 0
"""Version-1 files (no model byte): the float prior on the writing machine's kernels."""
MODEL_EXACT_V1 = 1
"""vqkit's exact integer model, version 1 (:mod:`vqkit.compress.exact`)."""
MODEL_EXACT_NEXT_SCALE = 2
"""vqkit's exact integer next-scale model (:mod:`vqkit.compress.exact_nextscale`): a
next-scale prior over a multi-scale tokenizer's ``(L,)`` codes."""
MODELS = {
    MODEL_FLOAT: "the float prior (version-1 files; decodes only where it computes the same bits)",
    MODEL_EXACT_V1: "vqkit's exact integer model, version 1",
    MODEL_EXACT_NEXT_SCALE: "vqkit's exact integer next-scale model",
}
"""Model byte -> what computed the coding probabilities."""
# the model a file of each version may name (version 1 has no model byte)
_VERSION_MODELS = {
    1: (MODEL_FLOAT,),
    2: (MODEL_EXACT_V1, MODEL_EXACT_NEXT_SCALE),
    3: (MODEL_EXACT_V1, MODEL_EXACT_NEXT_SCALE),
}
MIN_SYMBOLS = 2
MAX_SYMBOLS = 2**24 - 2
"""Largest K: constriction's 24-bit categorical needs ``2 <= K < 2**24 - 1``."""
MAX_MAPS = 2**32 - 1
# the bytes after the labels: checksum and CRC
_TAIL = 8 + 4


class FormatError(UserError):
    """A file that is not a readable ``.vqz`` (message: one line, names the problem)."""


@dataclass(frozen=True)
class AudioInfo:
    """A clip's audio block: ``rate`` (Hz) and ``length`` (samples) of the WAV that was
    compressed, and ``frames`` F, the codec's frames of it (its windows: the maps)."""

    rate: int
    length: int
    frames: int


@dataclass(frozen=True)
class Header:
    """Everything but the payload. ``tokenizer_hash``/``prior_hash``: 16 hex digits;
    ``labels``: the class of each of the N maps; ``checksum``: :func:`code_checksum` of
    the (N, T) codes; ``version``: the format version the file has (or :func:`pack`
    writes); ``model``: what computed the coding probabilities (:data:`MODELS`)."""

    tokenizer_hash: str
    prior_hash: str
    code_shape: tuple[int, ...]
    num_symbols: int
    labels: tuple[int, ...]
    checksum: bytes
    flags: int = 0
    dtype: int = 0
    version: int = VERSION
    model: int = MODEL_EXACT_V1
    audio: AudioInfo | None = None

    @property
    def num_maps(self) -> int:
        return len(self.labels)

    @property
    def is_codes(self) -> bool:
        return bool(self.flags & FLAG_CODES)

    @property
    def is_audio(self) -> bool:
        return bool(self.flags & FLAG_AUDIO)


def code_checksum(codes: np.ndarray) -> bytes:
    """BLAKE2b-64 of code maps (N, ...) as C-ordered int64 little-endian bytes."""
    arr = np.ascontiguousarray(codes, dtype="<i8")
    return hashlib.blake2b(arr.tobytes(), digest_size=8).digest()


def _hash_bytes(hex_digest: str, what: str) -> bytes:
    raw = bytes.fromhex(hex_digest[: 2 * HASH_BYTES])
    if len(raw) != HASH_BYTES:
        raise UserError(f"{what} hash must have at least {2 * HASH_BYTES} hex digits")
    return raw


def _model_problem(version: int, model: int) -> str | None:
    if model in _VERSION_MODELS[version]:
        return None
    known = ", ".join(f"{m} ({MODELS[m]})" for m in _VERSION_MODELS[version])
    return f"unknown coding model {model} in a version-{version} file (this vqkit knows {known})"


def _flags_problem(flags: int, dtype: int, version: int) -> str | None:
    known = FLAG_CODES | FLAG_BATCH_AXIS | (FLAG_AUDIO if version >= AUDIO_VERSION else 0)
    if flags & ~known:
        return f"flags {flags:#04x} set bits version {version} does not define"
    if flags & FLAG_BATCH_AXIS and not flags & FLAG_CODES:
        return "the batch-axis flag without the codes flag"
    if flags & FLAG_AUDIO and flags & FLAG_BATCH_AXIS:
        return "the batch-axis flag on an audio clip"
    if dtype >= len(DTYPES) or (dtype and not flags & FLAG_CODES):
        return f"dtype {dtype} (an index into {len(DTYPES)} dtypes; 0 unless the codes flag)"
    return None


def _ndims(version: int, model: int, flags: int = 0) -> tuple[int, ...]:
    """The code-map ranks a file may state: an (L,) sequence (a multi-scale tokenizer's
    scales) since version 2, and only that for the next-scale model; a clip's windows
    (W, Q) under model 1."""
    if flags & FLAG_AUDIO:
        return (2,) if model == MODEL_EXACT_V1 else ()
    if model == MODEL_EXACT_NEXT_SCALE:
        return (1,)
    return (2, 3) if version == 1 else (1, 2, 3)


def _shape_problem(shape: tuple[int, ...], version: int, model: int, flags: int) -> str | None:
    ndims = _ndims(version, model, flags)
    if not ndims:
        return f"an audio clip coded by model {model} (clips take model {MODEL_EXACT_V1})"
    if len(shape) not in ndims or not all(0 < s < 1 << 16 for s in shape):
        what = " or ".join(map(str, ndims))
        return f"code map shape must be {what} sizes in [1, 65535] (model {model}); got {shape}"
    return None


def _audio_problem(audio: AudioInfo | None, flags: int, window: int, n: int) -> str | None:
    """The audio block's bounds: present exactly with the flag, a rate in [1, MAX_RATE],
    a length and F >= 1, and N = ceil(F / W) windows of W frames."""
    if (audio is not None) != bool(flags & FLAG_AUDIO):
        return "an audio block without the audio flag, or the flag without it"
    if audio is None:
        return None
    if not 1 <= audio.rate <= MAX_RATE:
        return f"sample rate {audio.rate} Hz outside [1, {MAX_RATE}]"
    if audio.length < 1 or audio.frames < 1:
        return f"an audio clip of {audio.length} samples, {audio.frames} frames (each >= 1)"
    if n != -(-audio.frames // window):
        return f"{n} windows of {window} frames for a clip of {audio.frames} frames"
    return None


def _symbols_problem(k: int) -> str | None:
    if not MIN_SYMBOLS <= k <= MAX_SYMBOLS:
        return f"symbol count K = {k} outside [{MIN_SYMBOLS}, {MAX_SYMBOLS}]"
    return None


def _maps_problem(n: int, flags: int) -> str | None:
    if n < 1:
        return "0 code maps (a file holds at least one)"
    if n > MAX_MAPS:
        return f"{n} code maps do not fit the format"
    if flags & FLAG_CODES and not flags & FLAG_BATCH_AXIS and n != 1:
        return f"{n} code maps for one .npy map without a batch axis"
    return None


def pack(header: Header, payload: bytes) -> bytes:
    """The file's bytes, in ``header.version`` (the library writes :data:`VERSION`;
    version 1, without the model byte, is for tests of old files). UserError for what
    the format cannot hold."""
    h = header
    if h.version not in READ_VERSIONS:
        raise UserError(f"cannot write format version {h.version}; versions {READ_VERSIONS}")
    problem = (
        _model_problem(h.version, h.model)
        or _flags_problem(h.flags, h.dtype, h.version)
        or _shape_problem(h.code_shape, h.version, h.model, h.flags)
        or _symbols_problem(h.num_symbols)
        or _maps_problem(h.num_maps, h.flags)
        or _audio_problem(h.audio, h.flags, h.code_shape[0], h.num_maps)
    )
    if problem:
        raise UserError(problem)
    if not all(0 <= y < 1 << 16 for y in h.labels):
        raise UserError("class ids must be in [0, 65535]")
    if len(h.checksum) != 8:
        raise UserError("checksum must be 8 bytes")
    model = b"" if h.version == 1 else bytes([h.model])
    a = h.audio
    block = struct.pack("<III", a.rate, a.length, a.frames) if a is not None else b""
    if a is not None and max(a.length, a.frames) >= 1 << 32:
        raise UserError(f"an audio clip of {a.length} samples does not fit the format")
    parts = [
        MAGIC,
        struct.pack("<BBB", h.version, h.flags, h.dtype),
        model,
        _hash_bytes(h.tokenizer_hash, "tokenizer"),
        _hash_bytes(h.prior_hash, "prior"),
        struct.pack(f"<B{len(h.code_shape)}H", len(h.code_shape), *h.code_shape),
        struct.pack("<II", h.num_symbols, len(h.labels)),
        block,
        struct.pack(f"<{len(h.labels)}H", *h.labels),
        h.checksum,
    ]
    head = b"".join(parts)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


class _Reader:
    """Reads fields in order; every read is of a size checked against the bytes left."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise FormatError(
                f"truncated: the header needs more than the file's {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def ints(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def _corrupt(problem: str | None) -> None:
    if problem:
        raise FormatError(f"corrupt header: {problem}")


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, payload) of a file's bytes, version 1 or 2; FormatError (one line) when
    it is not a ``.vqz``, has a version or model this vqkit does not know, a field out
    of its bounds, is truncated or fails its CRC. Checks in the order of docs/format.md;
    nothing is sized by a field before the field is bounded."""
    r = _Reader(bytes(data))
    if len(data) < len(MAGIC) or r.take(len(MAGIC)) != MAGIC:
        raise FormatError("not a vqkit compressed file (no VQKZ magic number)")
    (version,) = r.ints("<B")
    if version not in READ_VERSIONS:
        newer = "; it was written by a newer vqkit" if version > VERSION else ""
        raise FormatError(
            f"unknown format version {version} (this vqkit reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}){newer}"
        )
    flags, dtype = r.ints("<BB")
    model = MODEL_FLOAT if version == 1 else r.ints("<B")[0]
    if problem := _model_problem(version, model):
        raise FormatError(problem)
    _corrupt(_flags_problem(flags, dtype, version))
    tok, prior = r.take(HASH_BYTES).hex(), r.take(HASH_BYTES).hex()
    (ndim,) = r.ints("<B")
    if ndim not in (ndims := _ndims(version, model, flags)):
        what = " or ".join(map(str, ndims)) or "none"
        raise FormatError(
            f"corrupt header: a code map of {ndim} dimensions ({what} for model {model}"
            f"{' and an audio clip' if flags & FLAG_AUDIO else ''})"
        )
    shape = r.ints(f"<{ndim}H")
    _corrupt(_shape_problem(shape, version, model, flags))
    num_symbols, n = r.ints("<II")
    _corrupt(_symbols_problem(num_symbols))
    _corrupt(_maps_problem(n, flags))
    audio = AudioInfo(*r.ints("<III")) if flags & FLAG_AUDIO else None
    _corrupt(_audio_problem(audio, flags, shape[0], n))
    if 2 * n + _TAIL > r.left:  # the labels must be there before they are read
        raise FormatError(
            f"truncated or corrupt header: {n} code maps need {2 * n + _TAIL} more bytes; "
            f"the file has {r.left}"
        )
    labels = r.ints(f"<{n}H")
    checksum = r.take(8)
    head_end = r.pos
    (crc,) = r.ints("<I")
    payload = r.data[r.pos :]
    if zlib.crc32(payload, zlib.crc32(r.data[:head_end])) != crc:
        raise FormatError("corrupt or truncated file: its CRC-32 does not match its bytes")
    header = Header(
        tok, prior, tuple(shape), num_symbols, tuple(labels), checksum, flags, dtype, version,
        model, audio,
    )  # fmt: skip
    return header, payload
