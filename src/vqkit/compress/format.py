"""The container of a compressed code map (``.vqz``), version 1.

All integers little-endian; ``ndim`` is 2 for (h, w) maps and 3 for (h, w, Q)::

    offset  size        field
    0       4           magic b"VQKZ"
    4       1           version (1)
    5       1           flags: bit 0 CODES (made by --codes: decompress writes .npy),
                        bit 1 BATCH_AXIS (that .npy had a leading batch axis)
    6       1           dtype of that .npy (index into DTYPES; 0 for images)
    7       8           tokenizer hash: first 8 bytes of the SHA-256 of its weights file
    15      8           prior hash: first 8 bytes of the prior's content hash
    23      1           ndim
    24      2 * ndim    code map shape (u16 each)
    .       4           K, the symbols one code takes (the prior's vocabulary; u32)
    .       4           N, the code maps in the stream (decoded as one batch; u32)
    .       2 * N       class of each map (u16; the prior's null class: unconditional)
    .       8           checksum of the code maps: BLAKE2b-64 of the (N, T) int64 codes
    .       4           CRC-32 of every byte before it and of the payload
    .       ...         payload: the range coder's stream (see :mod:`.coder`)

The CRC tells a damaged file (one clear error) from a file that is intact but decodes
to other codes than were written (the checksum: a platform whose floating-point results
differ from the encoder's; refused rather than decoded to a wrong image).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

__all__ = [
    "DTYPES",
    "FLAG_BATCH_AXIS",
    "FLAG_CODES",
    "MAGIC",
    "VERSION",
    "FormatError",
    "Header",
    "code_checksum",
    "pack",
    "unpack",
]

MAGIC = b"VQKZ"
VERSION = 1
FLAG_CODES = 1
FLAG_BATCH_AXIS = 2
# the integer dtypes a --codes .npy may have (little-endian), by their stored index
DTYPES = ("<i8", "<i4", "<i2", "<i1", "<u8", "<u4", "<u2", "<u1")
HASH_BYTES = 8


class FormatError(UserError):
    """A file that is not a readable ``.vqz`` (message: one line, names the problem)."""


@dataclass(frozen=True)
class Header:
    """Everything but the payload. ``tokenizer_hash``/``prior_hash``: 16 hex digits."""

    tokenizer_hash: str
    prior_hash: str
    code_shape: tuple[int, ...]
    num_symbols: int
    labels: tuple[int, ...]
    checksum: bytes
    flags: int = 0
    dtype: int = 0

    @property
    def num_maps(self) -> int:
        return len(self.labels)

    @property
    def is_codes(self) -> bool:
        return bool(self.flags & FLAG_CODES)


def code_checksum(codes: np.ndarray) -> bytes:
    """BLAKE2b-64 of code maps (N, ...) as C-ordered int64 little-endian bytes."""
    arr = np.ascontiguousarray(codes, dtype="<i8")
    return hashlib.blake2b(arr.tobytes(), digest_size=8).digest()


def _hash_bytes(hex_digest: str, what: str) -> bytes:
    raw = bytes.fromhex(hex_digest[: 2 * HASH_BYTES])
    if len(raw) != HASH_BYTES:
        raise UserError(f"{what} hash must have at least {2 * HASH_BYTES} hex digits")
    return raw


def pack(header: Header, payload: bytes) -> bytes:
    """The file's bytes."""
    h = header
    if len(h.code_shape) not in (2, 3) or not all(0 < s < 1 << 16 for s in h.code_shape):
        raise UserError(f"code map shape must be 2 or 3 sizes in [1, 65535]; got {h.code_shape}")
    if not 0 < h.num_symbols < 1 << 32:
        raise UserError(f"symbol count {h.num_symbols} does not fit the format")
    if not all(0 <= y < 1 << 16 for y in h.labels):
        raise UserError("class ids must be in [0, 65535]")
    if len(h.checksum) != 8:
        raise UserError("checksum must be 8 bytes")
    parts = [
        MAGIC,
        struct.pack("<BBB", VERSION, h.flags, h.dtype),
        _hash_bytes(h.tokenizer_hash, "tokenizer"),
        _hash_bytes(h.prior_hash, "prior"),
        struct.pack(f"<B{len(h.code_shape)}H", len(h.code_shape), *h.code_shape),
        struct.pack(f"<II{len(h.labels)}H", h.num_symbols, len(h.labels), *h.labels),
        h.checksum,
    ]
    head = b"".join(parts)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise FormatError(
                f"truncated: the header needs more than the file's {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def ints(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, payload) of a file's bytes; FormatError when it is not a version-1
    ``.vqz``, is truncated or fails its CRC."""
    r = _Reader(bytes(data))
    if len(data) < len(MAGIC) or r.take(len(MAGIC)) != MAGIC:
        raise FormatError("not a vqkit compressed file (no VQKZ magic number)")
    version, flags, dtype = r.ints("<BBB")
    if version != VERSION:
        raise FormatError(
            f"unknown format version {version} (this vqkit reads version {VERSION}); "
            "decompress it with the vqkit that wrote it"
        )
    if flags & ~(FLAG_CODES | FLAG_BATCH_AXIS) or dtype >= len(DTYPES):
        raise FormatError(f"corrupt header: flags {flags:#x}, dtype {dtype}")
    tok, prior = r.take(HASH_BYTES).hex(), r.take(HASH_BYTES).hex()
    (ndim,) = r.ints("<B")
    if ndim not in (2, 3):
        raise FormatError(f"corrupt header: a code map of {ndim} dimensions")
    shape = r.ints(f"<{ndim}H")
    num_symbols, n = r.ints("<II")
    if n > len(data):  # each map takes at least two bytes: a count this size is damage
        raise FormatError(f"corrupt header: {n} code maps in a file of {len(data)} bytes")
    labels = r.ints(f"<{n}H")
    checksum = r.take(8)
    head_end = r.pos
    (crc,) = r.ints("<I")
    payload = r.data[r.pos :]
    if zlib.crc32(payload, zlib.crc32(r.data[:head_end])) != crc:
        raise FormatError("corrupt or truncated file: its CRC-32 does not match its bytes")
    if min(shape) < 1 or num_symbols < 1:
        raise FormatError(f"corrupt header: shape {shape}, {num_symbols} symbols")
    header = Header(tok, prior, tuple(shape), num_symbols, tuple(labels), checksum, flags, dtype)
    return header, payload
