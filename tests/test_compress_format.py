"""vqkit.compress.format: the .vqz container (version 2, version 3 for audio clips, and
version 1 still read) round
trip, its layout as docs/format.md specifies it, and one clear one-line FormatError for
every truncation, every flipped bit, a foreign file, an unknown version or model, and
every header field out of its bounds (crafted with a valid CRC), also under an
address-space limit."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vqkit.compress.format import (
    AUDIO_VERSION,
    FLAG_AUDIO,
    FLAG_BATCH_AXIS,
    FLAG_CODES,
    MAGIC,
    MAX_SYMBOLS,
    MODEL_EXACT_NEXT_SCALE,
    MODEL_EXACT_V1,
    MODEL_FLOAT,
    MODELS,
    READ_VERSIONS,
    VERSION,
    AudioInfo,
    FormatError,
    Header,
    code_checksum,
    pack,
    unpack,
)

SRC = Path(__file__).resolve().parents[1] / "src"

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
HEADER_V1 = replace(HEADER, version=1, model=MODEL_FLOAT)
PAYLOAD = bytes(range(37))


def craft(
    *,
    version: int = 2,
    flags: int = 0,
    dtype: int = 0,
    model: int = 1,
    ndim: int | None = None,
    shape: tuple[int, ...] = (7, 7),
    k: int = 32,
    n: int | None = None,
    labels: tuple[int, ...] = (0,),
    payload: bytes = b"\x12\x34\x56",
    audio: tuple[int, int, int] | None = None,
) -> bytes:
    """A file's bytes written field by field as docs/format.md lays them out, with any
    value (no bounds) and a valid CRC: only the reader's own checks can refuse it."""
    head = b"".join([
        MAGIC,
        bytes([version, flags, dtype]),
        b"" if version == 1 else bytes([model]),
        bytes(range(16)),
        struct.pack(f"<B{len(shape)}H", len(shape) if ndim is None else ndim, *shape),
        struct.pack("<II", k, len(labels) if n is None else n),
        struct.pack("<III", *audio) if audio is not None else b"",
        struct.pack(f"<{len(labels)}H", *labels),
        b"\xab" * 8,
    ])  # fmt: skip
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def refused(data: bytes, match: str) -> str:
    with pytest.raises(FormatError, match=match) as e:
        unpack(data)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_constants():
    assert VERSION == 2 and READ_VERSIONS == (1, 2, 3) and AUDIO_VERSION == 3
    assert FLAG_AUDIO == 4
    assert (MODEL_FLOAT, MODEL_EXACT_V1, MODEL_EXACT_NEXT_SCALE) == (0, 1, 2)
    assert set(MODELS) == {0, 1, 2}
    assert MAX_SYMBOLS == 2**24 - 2
    assert HEADER.version == VERSION and HEADER.model == MODEL_EXACT_V1


def test_round_trip_and_layout():
    data = pack(HEADER, PAYLOAD)
    header, payload = unpack(data)
    assert header == HEADER and payload == PAYLOAD
    assert header.num_maps == 2 and header.is_codes
    # the layout of docs/format.md (version 2), read independently
    assert data[:4] == MAGIC and data[4:8] == bytes([2, 3, 6, 1])
    assert data[8:16].hex() == "0123456789abcdef" and data[16:24].hex() == "fedcba9876543210"
    assert data[24] == 3 and struct.unpack("<3H", data[25:31]) == (8, 8, 4)
    assert struct.unpack("<II2H", data[31:43]) == (4096, 2, 3, 10)
    assert data[43:51] == HEADER.checksum
    (crc,) = struct.unpack("<I", data[51:55])
    assert crc == zlib.crc32(data[:51] + PAYLOAD) and data[55:] == PAYLOAD
    # the smallest header: one (h, w) map
    one = Header("00" * 8, "11" * 8, (7, 7), 512, (0,), b"\0" * 8)
    assert len(pack(one, b"")) == 51
    # the test's own writer agrees with pack
    assert unpack(craft())[0] == Header(
        bytes(range(8)).hex(), bytes(range(8, 16)).hex(), (7, 7), 32, (0,), b"\xab" * 8
    )


def test_version_1_is_still_read():
    """Version 1: today's files before the model byte; read as model 0 (the float prior)."""
    data = pack(HEADER_V1, PAYLOAD)
    header, payload = unpack(data)
    assert header == HEADER_V1 and payload == PAYLOAD
    assert header.version == 1 and header.model == MODEL_FLOAT
    # the version-1 layout, read independently: no model byte
    assert data[:4] == MAGIC and data[4:7] == bytes([1, 3, 6])
    assert data[7:15].hex() == "0123456789abcdef" and data[15:23].hex() == "fedcba9876543210"
    assert data[23] == 3 and struct.unpack("<3H", data[24:30]) == (8, 8, 4)
    assert struct.unpack("<II2H", data[30:42]) == (4096, 2, 3, 10)
    assert data[42:50] == HEADER.checksum
    (crc,) = struct.unpack("<I", data[50:54])
    assert crc == zlib.crc32(data[:50] + PAYLOAD) and data[54:] == PAYLOAD
    assert unpack(craft(version=1))[0].model == MODEL_FLOAT


def test_checksum_is_of_the_int64_values():
    a = np.arange(12).reshape(3, 4)
    assert code_checksum(a) == code_checksum(a.astype(np.uint16))
    assert code_checksum(a) != code_checksum(a[::-1])
    assert len(code_checksum(a)) == 8


@pytest.mark.parametrize("header", [HEADER, HEADER_V1], ids=["v2", "v1"])
def test_every_truncation_is_refused(header):
    data = pack(header, PAYLOAD)
    for n in range(len(data)):
        with pytest.raises(FormatError) as e:
            unpack(data[:n])
        assert "\n" not in str(e.value)
        if n >= 4:
            assert "truncated" in str(e.value) or "corrupt" in str(e.value)


@pytest.mark.parametrize("header", [HEADER, HEADER_V1], ids=["v2", "v1"])
def test_every_flipped_bit_is_refused(header):
    data = bytearray(pack(header, PAYLOAD))
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(FormatError) as e:
                unpack(bytes(bad))
            assert "\n" not in str(e.value)


def test_appended_bytes_are_refused():
    data = pack(HEADER, PAYLOAD)
    for junk in (b"\0", b"junk", bytes(4096)):
        refused(data + junk, "corrupt or truncated file: its CRC-32")


def test_foreign_files_and_unknown_versions():
    refused(b"\x89PNG\r\n\x1a\n" + bytes(60), "not a vqkit compressed file")
    refused(b"", "not a vqkit compressed file")
    refused(b"VQK", "not a vqkit compressed file")
    data = bytearray(pack(HEADER, PAYLOAD))
    data[4] = 4
    msg = refused(bytes(data), r"unknown format version 4 \(this vqkit reads versions 1, 2, 3\)")
    assert "written by a newer vqkit" in msg
    for v in (0, 255):
        msg = refused(craft(version=v), f"unknown format version {v} ")
        assert ("newer" in msg) == (v > 3)


def test_unknown_models_are_refused_by_name():
    for model in (0, 3, 255):
        msg = refused(craft(model=model), f"unknown coding model {model} in a version-2 file")
        assert "1 (vqkit's exact integer model, version 1)" in msg
        assert "2 (vqkit's exact integer next-scale model)" in msg


def test_sequences_of_a_multiscale_tokenizer():
    """An (L,) code shape: model 2 (next-scale) files hold only that; model 1 files take
    it too (an autoregressive prior over the scales); version-1 files never had it."""
    for model in (MODEL_EXACT_V1, MODEL_EXACT_NEXT_SCALE):
        header = replace(HEADER, code_shape=(70,), model=model)
        data = pack(header, PAYLOAD)
        assert data[7] == model and data[24] == 1 and struct.unpack("<H", data[25:27]) == (70,)
        assert unpack(data) == (header, PAYLOAD)
        assert unpack(craft(model=model, shape=(65535,)))[0].code_shape == (65535,)
    for shape in ((7, 7), (7, 7, 2)):
        msg = refused(craft(model=2, shape=shape), f"a code map of {len(shape)} dimensions")
        assert msg == f"corrupt header: a code map of {len(shape)} dimensions (1 for model 2)"
    refused(craft(model=2, shape=(0,)), r"corrupt header: code map shape .* got \(0,\)")
    refused(craft(version=1, shape=(49,)), r"a code map of 1 dimensions \(2 or 3 for model 0\)")
    with pytest.raises(ValueError, match="shape must be 1 sizes"):
        pack(replace(HEADER, model=MODEL_EXACT_NEXT_SCALE), b"")
    with pytest.raises(ValueError, match="shape must be 2 or 3 sizes"):
        pack(replace(HEADER_V1, code_shape=(70,)), b"")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"flags": 4}, "flags 0x04"),
        ({"flags": 0x80 | FLAG_CODES}, "flags 0x81"),
        ({"flags": FLAG_BATCH_AXIS}, "batch-axis flag without the codes flag"),
        ({"flags": FLAG_CODES, "dtype": 8}, "dtype 8"),
        ({"flags": FLAG_CODES, "dtype": 255}, "dtype 255"),
        ({"dtype": 3}, "dtype 3"),
        ({"ndim": 4, "shape": (7, 7, 2, 2)}, "a code map of 4 dimensions"),
        ({"ndim": 0, "shape": ()}, "a code map of 0 dimensions"),
        ({"ndim": 255, "shape": (7, 7)}, "a code map of 255 dimensions"),
        ({"shape": (0, 7)}, r"shape .* got \(0, 7\)"),
        ({"shape": (7, 7, 0)}, r"shape .* got \(7, 7, 0\)"),
        ({"k": 0}, r"K = 0 outside \[2, 16777214\]"),
        ({"k": 1}, "K = 1 outside"),
        ({"k": 2**24 - 1}, "K = 16777215 outside"),
        ({"k": 2**24}, "K = 16777216 outside"),
        ({"k": 2**32 - 1}, "K = 4294967295 outside"),
        ({"labels": ()}, "0 code maps"),
        ({"labels": (), "payload": bytes(200_000), "n": 2**31}, "2147483648 code maps need"),
        ({"labels": (), "payload": bytes(64), "n": 2**32 - 1}, "4294967295 code maps need"),
        ({"labels": (0,) * 10, "n": 11, "payload": b""}, "11 code maps need"),
        ({"flags": FLAG_CODES, "labels": (0, 0)}, "2 code maps for one .npy map"),
    ],
)
def test_fields_out_of_bounds_are_refused(fields, match):
    """Each file has a valid CRC: the bound itself refuses it, with one line."""
    msg = refused(craft(**fields), match)
    assert msg.startswith(("corrupt header", "truncated or corrupt header"))


def test_fields_at_their_bounds_are_read():
    for fields in (
        {"k": 2},
        {"k": MAX_SYMBOLS},
        {"shape": (65535, 65535, 65535)},
        {"labels": (65535,) * 3},
        {"flags": FLAG_CODES | FLAG_BATCH_AXIS, "dtype": 7, "labels": (0, 1)},
    ):
        header, payload = unpack(craft(**fields))
        assert payload == b"\x12\x34\x56"
    # labels that fill the file exactly: the count is bounded by the bytes, not refused
    header, payload = unpack(craft(labels=(1,) * 1000, payload=b""))
    assert header.num_maps == 1000 and payload == b""


def test_values_that_do_not_fit_are_refused_when_packing():
    base = Header("00" * 8, "11" * 8, (2, 2), 4, (0,), b"\0" * 8)

    for kw, match in (
        ({"code_shape": (70000, 1)}, "shape"),
        ({"code_shape": (2, 0)}, "shape"),
        ({"code_shape": (2, 2, 2, 2)}, "shape"),
        ({"labels": (70000,)}, "class ids"),
        ({"labels": ()}, "0 code maps"),
        ({"num_symbols": 1}, "K = 1 outside"),
        ({"num_symbols": 2**24}, "K = 16777216 outside"),
        ({"tokenizer_hash": "00"}, "hash"),
        ({"version": 4}, "cannot write format version 4"),
        ({"version": 1}, "unknown coding model 1 in a version-1 file"),  # no model byte
        ({"model": MODEL_FLOAT}, "unknown coding model 0 in a version-2 file"),
        ({"flags": 4}, "flags"),
        ({"dtype": 2}, "dtype"),
        ({"flags": FLAG_CODES, "labels": (0, 0)}, "2 code maps for one .npy map"),
    ):
        with pytest.raises(ValueError, match=match):
            pack(replace(base, **kw), b"")


_UNPACK_UNDER_LIMIT = """
import resource, sys
from vqkit.compress.format import FormatError, unpack
resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))  # 1.5 GiB from here on
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        header, _ = unpack(data)
    except FormatError as e:
        print(f"FormatError: {e}")
    else:
        print(f"read: {header.num_maps} maps")
"""


@pytest.mark.timeout(120)
def test_crafted_headers_under_an_address_space_limit(tmp_path):
    """A fresh process capped at 1.5 GiB of address space reads crafted files whose
    counts would ask for gigabytes: each ends in its one line, no MemoryError, no
    traceback; a file whose million labels are present is read."""
    pytest.importorskip("resource")
    files = {
        "maps_2e31.vqz": craft(labels=(), n=2**31, payload=bytes(200_000)),
        "maps_max.vqz": craft(labels=(), n=2**32 - 1, payload=bytes(2_000_000)),
        "maps_0.vqz": craft(labels=()),
        "k_max.vqz": craft(k=2**32 - 1, shape=(65535, 65535, 65535)),
        "ndim_4.vqz": craft(ndim=4, shape=(65535,) * 4),
        "junk.vqz": pack(HEADER, PAYLOAD) + bytes(1 << 20),
        "million.vqz": craft(labels=(0,) * 1_000_000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", _UNPACK_UNDER_LIMIT, *(str(tmp_path / n) for n in files)],
        env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(files), run.stdout
    got = dict(zip(files, lines, strict=True))
    assert got.pop("million.vqz") == "read: 1000000 maps"
    assert got["maps_2e31.vqz"].startswith("FormatError: truncated or corrupt header: 2147483648")
    assert (
        got["maps_0.vqz"] == "FormatError: corrupt header: 0 code maps (a file holds at least one)"
    )
    assert all(line.startswith("FormatError: ") for line in got.values()), got


AUDIO = Header("00" * 8, "11" * 8, (16, 3), 512, (0, 0, 0), b"\0" * 8, flags=FLAG_AUDIO,
               version=AUDIO_VERSION, audio=AudioInfo(8000, 14000, 44))  # fmt: skip


def test_audio_clips_round_trip_in_version_3():
    data = pack(AUDIO, PAYLOAD)
    assert data[4] == 3 and data[5] == FLAG_AUDIO
    assert unpack(data) == (AUDIO, PAYLOAD)
    # the audio block sits between N and the labels: rate, length, frames (u32 each)
    at = 4 + 4 + 16 + 1 + 2 * 2 + 4 + 4
    assert struct.unpack("<III", data[at : at + 12]) == (8000, 14000, 44)
    assert len(data) == 61 + 2 * 3 + len(PAYLOAD)  # the header: 61 + 2N bytes
    assert len(pack(replace(AUDIO, labels=(0,), audio=AudioInfo(8000, 10, 2)), b"")) == 63


def test_crafted_audio_headers_are_refused_in_one_line():
    one = {"version": 3, "flags": FLAG_AUDIO, "shape": (16, 3), "labels": (0, 0)}
    assert unpack(craft(**one, audio=(8000, 9000, 20)))[0].audio == AudioInfo(8000, 9000, 20)
    for kw, match in (
        ({"version": 2}, r"flags 0x04 set bits version 2 does not define"),
        ({"audio": (0, 9000, 20)}, r"sample rate 0 Hz outside \[1, 768000\]"),
        ({"audio": (768001, 9000, 20)}, "sample rate 768001 Hz outside"),
        ({"audio": (8000, 0, 20)}, "an audio clip of 0 samples"),
        ({"audio": (8000, 9000, 0)}, "0 frames"),
        ({"audio": (8000, 9000, 33)}, "2 windows of 16 frames for a clip of 33 frames"),
        ({"audio": (8000, 9000, 2**32 - 1)}, "2 windows of 16 frames for a clip of 4294967295"),
        ({"shape": (16, 3, 2)}, r"a code map of 3 dimensions \(2 for model 1 and an audio clip\)"),
        ({"model": 2}, "a code map of 2 dimensions"),
        ({"flags": FLAG_AUDIO | FLAG_CODES | FLAG_BATCH_AXIS}, "batch-axis flag on an audio"),
        ({"audio": None, "labels": ()}, "0 code maps"),
    ):
        args = {**one, "audio": (8000, 9000, 20), **kw}
        if args["audio"] is None:
            args["n"] = 0
        msg = refused(craft(**args), match)
        assert "\n" not in msg
    # the audio block cut short: truncated, never read past the bytes present
    head = craft(**one, audio=(8000, 9000, 20))
    refused(head[: 4 + 4 + 16 + 1 + 4 + 8 + 6], "truncated")
    with pytest.raises(ValueError, match="audio block without the audio flag"):
        pack(replace(AUDIO, flags=0), b"")
    with pytest.raises(ValueError, match="audio flag, or the flag without it"):
        pack(replace(AUDIO, audio=None), b"")
