"""vqkit.compress.format: the .vqz container round trip, its documented layout, and
one clear FormatError for every truncation, every flipped bit, a foreign file and an
unknown version."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from vqkit.compress.format import (
    FLAG_BATCH_AXIS,
    FLAG_CODES,
    MAGIC,
    FormatError,
    Header,
    code_checksum,
    pack,
    unpack,
)

HEADER = Header(
    tokenizer_hash="0123456789abcdef",
    prior_hash="fedcba9876543210",
    code_shape=(8, 8, 4),
    num_symbols=4096,
    labels=(3, 10),
    checksum=code_checksum(np.arange(512).reshape(2, 256)),
    flags=FLAG_CODES | FLAG_BATCH_AXIS,
    dtype=6,
)
PAYLOAD = bytes(range(37))


def test_round_trip_and_layout():
    data = pack(HEADER, PAYLOAD)
    header, payload = unpack(data)
    assert header == HEADER and payload == PAYLOAD
    assert header.num_maps == 2 and header.is_codes
    # the layout of the module docstring, read independently
    assert data[:4] == MAGIC and data[4:7] == bytes([1, 3, 6])
    assert data[7:15].hex() == "0123456789abcdef" and data[15:23].hex() == "fedcba9876543210"
    assert data[23] == 3 and struct.unpack("<3H", data[24:30]) == (8, 8, 4)
    assert struct.unpack("<II2H", data[30:42]) == (4096, 2, 3, 10)
    assert data[42:50] == HEADER.checksum
    (crc,) = struct.unpack("<I", data[50:54])
    assert crc == zlib.crc32(data[:50] + PAYLOAD) and data[54:] == PAYLOAD
    # the smallest header: one (h, w) map
    one = Header("00" * 8, "11" * 8, (7, 7), 512, (0,), b"\0" * 8)
    assert len(pack(one, b"")) == 50


def test_checksum_is_of_the_int64_values():
    a = np.arange(12).reshape(3, 4)
    assert code_checksum(a) == code_checksum(a.astype(np.uint16))
    assert code_checksum(a) != code_checksum(a[::-1])
    assert len(code_checksum(a)) == 8


def test_every_truncation_is_refused():
    data = pack(HEADER, PAYLOAD)
    for n in range(len(data)):
        with pytest.raises(FormatError) as e:
            unpack(data[:n])
        assert "\n" not in str(e.value)
        if n >= 4:
            assert "truncated" in str(e.value) or "corrupt" in str(e.value)


def test_every_flipped_bit_is_refused():
    data = bytearray(pack(HEADER, PAYLOAD))
    for i in range(len(data)):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(FormatError):
                unpack(bytes(bad))


def test_foreign_files_and_unknown_versions():
    with pytest.raises(FormatError, match="not a vqkit compressed file"):
        unpack(b"\x89PNG\r\n\x1a\n" + bytes(60))
    with pytest.raises(FormatError, match="not a vqkit compressed file"):
        unpack(b"")
    data = bytearray(pack(HEADER, PAYLOAD))
    data[4] = 2
    with pytest.raises(FormatError, match="unknown format version 2 .this vqkit reads version 1"):
        unpack(bytes(data))


def test_values_that_do_not_fit_are_refused_when_packing():
    with pytest.raises(ValueError, match="shape"):
        pack(Header("00" * 8, "11" * 8, (70000, 1), 4, (0,), b"\0" * 8), b"")
    with pytest.raises(ValueError, match="class ids"):
        pack(Header("00" * 8, "11" * 8, (2, 2), 4, (70000,), b"\0" * 8), b"")
    with pytest.raises(ValueError, match="hash"):
        pack(Header("00", "11" * 8, (2, 2), 4, (0,), b"\0" * 8), b"")
