"""vqkit.data.audio: WAV decoding (exact values for 8/16/24/32-bit PCM), mono handling,
bad files in one line, crops and whole clips."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.data.audio import AudioData, decode_wav, pad_clips
from vqkit.errors import UserError


def write_wav(path: Path, frames: bytes, *, width: int, channels: int = 1, rate: int = 8000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return path


def test_16bit_values_exact(tmp_path):
    ints = np.array([0, 1, -1, 32767, -32768, 12345], dtype="<i2")
    wav = decode_wav(write_wav(tmp_path / "a.wav", ints.tobytes(), width=2, rate=16000))
    assert wav.rate == 16000 and wav.channels == 1 and wav.samples.dtype == torch.float32
    assert torch.equal(wav.samples, torch.from_numpy(ints.astype(np.float32) / 32768))


def test_8bit_is_unsigned(tmp_path):
    raw = bytes([128, 0, 255, 192])
    wav = decode_wav(write_wav(tmp_path / "a.wav", raw, width=1))
    assert wav.samples.tolist() == [0.0, -1.0, 127 / 128, 0.5]


def test_24bit_little_endian_signed(tmp_path):
    values = [0, 1, -1, (1 << 23) - 1, -(1 << 23), 0x123456, -0x123456]
    raw = b"".join(struct.pack("<i", v)[:3] for v in values)
    wav = decode_wav(write_wav(tmp_path / "a.wav", raw, width=3))
    expected = torch.tensor(values, dtype=torch.float64) / (1 << 23)
    assert torch.equal(wav.samples, expected.float())


def test_32bit(tmp_path):
    ints = np.array([0, -(1 << 31), (1 << 31) - 1, 1 << 20], dtype="<i4")
    wav = decode_wav(write_wav(tmp_path / "a.wav", ints.tobytes(), width=4))
    assert torch.equal(wav.samples, torch.from_numpy((ints / 2.0**31).astype(np.float32)))


def test_stereo_is_averaged_to_mono(tmp_path):
    left = np.array([1000, -2000, 300], dtype="<i2")
    right = np.array([3000, 2000, -301], dtype="<i2")
    raw = np.stack([left, right], 1).tobytes()  # interleaved L R L R
    wav = decode_wav(write_wav(tmp_path / "s.wav", raw, width=2, channels=2))
    assert wav.channels == 2
    expected = (left.astype(np.float64) + right) / 2 / 32768
    assert torch.equal(wav.samples, torch.from_numpy(expected.astype(np.float32)))


def test_bytes_source_and_empty_file(tmp_path):
    path = write_wav(tmp_path / "e.wav", b"", width=2)
    wav = decode_wav(path.read_bytes(), name="e.wav")
    assert wav.samples.shape == (0,) and wav.rate == 8000


def _one_line(excinfo, *parts: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, msg


def test_bad_files_one_line(tmp_path):
    good = write_wav(tmp_path / "g.wav", np.arange(100, dtype="<i2").tobytes(), width=2)
    data = good.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[:-50])  # the data chunk cut short
    with pytest.raises(UserError) as e:
        decode_wav(cut)
    _one_line(e, str(cut), "truncated", "100 frames")
    header = tmp_path / "header.wav"
    header.write_bytes(data[:20])
    with pytest.raises(UserError) as e:
        decode_wav(header)
    _one_line(e, str(header))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not a wav file at all" * 4)
    with pytest.raises(UserError) as e:
        decode_wav(junk)
    _one_line(e, str(junk), "not a valid WAV")
    with pytest.raises(UserError) as e:
        decode_wav(tmp_path / "missing.wav")
    _one_line(e, "missing.wav")


def _float_wav(path: Path) -> Path:
    """An IEEE-float WAV (format tag 3) written by hand: wave writes PCM only."""
    samples = np.array([0.0, 0.5, -0.25], dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 8000 * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(samples)) + samples
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_non_pcm_refused_in_one_line(tmp_path):
    path = _float_wav(tmp_path / "f.wav")
    with pytest.raises(UserError) as e:
        decode_wav(path)
    _one_line(e, str(path), "IEEE float", "not PCM", "sox")


def _data(clips: list[list[float]]) -> AudioData:
    lengths = torch.tensor([len(c) for c in clips])
    offsets = torch.zeros(len(clips) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    samples = torch.tensor([v for c in clips for v in c], dtype=torch.float32)
    return AudioData(samples, offsets, 8000, torch.arange(len(clips)), speakers=None)


def test_whole_clips_padded_with_lengths():
    data = _data([[1.0, 2.0, 3.0], [4.0], [5.0, 6.0]])
    x, lengths = data.whole([2, 0, 1])
    assert x.shape == (3, 1, 3) and lengths.tolist() == [2, 3, 1]
    assert x[:, 0].tolist() == [[5, 6, 0], [1, 2, 3], [4, 0, 0]]
    assert pad_clips([data.clip(0)], 2)[0, 0].tolist() == [1, 2]


def test_crops_shape_determinism_padding():
    long = torch.arange(1, 101, dtype=torch.float32).tolist()
    data = _data([long, [7.0, 8.0], long])
    g = torch.Generator().manual_seed(3)
    x, lengths = data.crops([0, 1, 2, 0], 10, g)
    assert x.shape == (4, 1, 10) and x.dtype == torch.float32
    assert lengths.tolist() == [10, 2, 10, 10]
    assert x[1, 0].tolist() == [7, 8] + [0] * 8  # short clip: whole, zero-padded
    for b in (0, 2, 3):  # a contiguous window of the clip
        row = x[b, 0]
        assert row[0] >= 1 and row[-1] <= 100 and torch.equal(row - row[0], torch.arange(10.0))
    again = data.crops([0, 1, 2, 0], 10, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], x) and torch.equal(again[1], lengths)
    other = data.crops([0, 1, 2, 0], 10, torch.Generator().manual_seed(4))[0]
    assert not torch.equal(other, x)


def test_crop_starts_cover_the_clip():
    data = _data([torch.arange(1, 13, dtype=torch.float32).tolist()])
    g = torch.Generator().manual_seed(0)
    starts = {int(data.crops([0], 10, g)[0][0, 0, 0]) for _ in range(200)}
    assert starts == {1, 2, 3}  # starts 0..2, each reachable, none beyond
    assert data.crops([0], 12, g)[0][0, 0].tolist() == list(range(1, 13))
    with pytest.raises(UserError, match="crop length"):
        data.crops([0], 0, g)


def test_subset_and_speakers():
    data = AudioData(
        torch.arange(6, dtype=torch.float32),
        torch.tensor([0, 1, 3, 6]),
        8000,
        torch.tensor([5, 6, 7]),
        speakers=torch.tensor([0, 1, 0]),
        speaker_names=("ann", "bob"),
        names=("a", "b", "c"),
    )
    sub = data.select_speakers(exclude=["bob"])
    assert sub.names == ("a", "c") and sub.labels.tolist() == [5, 7]
    assert sub.clip(1).tolist() == [3, 4, 5]
    assert data.select_speakers(["bob"]).names == ("b",)
    with pytest.raises(UserError, match="no speaker 'eve'.*ann, bob"):
        data.select_speakers(["eve"])
    assert data.speaker_labels([2, 1]) == ["ann", "bob"]
    assert data.speaker_labels(range(3)) == ["ann", "bob", "ann"]
    unnamed = AudioData(data.samples, data.offsets, 8000, data.labels)
    assert unnamed.speaker_labels(range(3)) == ["all"] * 3


# -- writing and the crop loader -------------------------------------------------------


def test_write_wav_round_trip_16bit(tmp_path):
    from vqkit.data.audio import write_wav as save

    x = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 1 / 32768, -3 / 65536])
    save(tmp_path / "w.wav", x, 8000)
    wav = decode_wav(tmp_path / "w.wav")
    assert wav.rate == 8000 and wav.channels == 1
    # round(x * 32768) clipped to int16: 1.0 and 2.0 -> 32767, -1.0 -> -32768; -1.5 -> -2
    ints = np.array([0, 16384, -16384, 32767, -32768, 32767, 1, -2])
    np.testing.assert_array_equal(wav.samples.numpy(), (ints / 32768.0).astype(np.float32))


def _set(lengths: list[int]) -> AudioData:
    clips = [torch.arange(n, dtype=torch.float32) + 1000 * i for i, n in enumerate(lengths)]
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()])
    return AudioData(torch.cat(clips), offsets, 8000, torch.zeros(len(lengths), dtype=torch.long))


def test_crop_loader_resumes_exactly_and_crops_are_pieces_of_clips():
    from vqkit.data.audio import CropLoader

    data = _set([50, 7, 30, 64, 12, 40])
    full = CropLoader(data, 2, 16, seed=5)
    batches = [full.next_batch() for _ in range(8)]  # 3 batches an epoch: crosses epochs
    part = CropLoader(data, 2, 16, seed=5)
    for _ in range(4):
        part.next_batch()
    state = part.state_dict()
    again = CropLoader(data, 2, 16, seed=5)
    again.load_state_dict(state)
    assert again.epoch == 1
    for x, lengths in batches[4:]:
        y, m = again.next_batch()
        assert torch.equal(x, y) and torch.equal(lengths, m)
    for x, lengths in batches:
        assert x.shape == (2, 1, 16)
        for row, n in zip(x[:, 0], lengths, strict=True):
            clip = int(row[0]) // 1000
            start = int(row[0]) - 1000 * clip
            # a contiguous piece of one clip, zero-padded past a short clip's end
            assert torch.equal(row[:n], torch.arange(start, start + n) + 1000.0 * clip)
            assert int(n) == min(16, data.lengths[clip].item())
            assert not row[n:].any()
    with pytest.raises(UserError, match="crops of 16 samples in the state, 8 here"):
        CropLoader(data, 2, 8, seed=5).load_state_dict(state)
