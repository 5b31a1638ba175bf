"""vqkit.data.audiofolder: WAV folders and tars, split folders, the hash split, FSDD's
official split on the shared archive, bad and empty files, mixed sources refused."""

from __future__ import annotations

import io
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import vqkit.data as vd
from vqkit.data.audiofolder import audio_splits, detect_modality, hash_split, load_audio
from vqkit.errors import UserError


def wav_bytes(values, *, rate: int = 8000, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(values, dtype="<i2").tobytes())
    return buf.getvalue()


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_split_folders_and_classes(tmp_path):
    files = {
        "set/train/yes/a.wav": wav_bytes([1, 2, 3]),
        "set/train/no/b.wav": wav_bytes([4, 5]),
        "set/test/yes/c.wav": wav_bytes([6]),
    }
    root = make_tree(tmp_path / "tree", files)
    assert audio_splits(root) == ["test", "train"]
    train = load_audio(root, "train")
    assert train.classes == ("no", "yes") and train.labels.tolist() == [0, 1]
    assert [round(v * 32768) for v in train.samples.tolist()] == [4, 5, 1, 2, 3]
    assert train.lengths.tolist() == [2, 3] and train.rate == 8000
    test = load_audio(root, "test")
    assert len(test) == 1 and test.names[0].endswith("c.wav")
    with pytest.raises(UserError, match="no 'val' split folder"):
        load_audio(root, "val")
    # the same tree in a tar, read member by member, gives the same clips
    tar = load_audio(make_tar(tmp_path / "t.tar.gz", files), "train")
    assert torch.equal(tar.samples, train.samples) and tar.classes == train.classes
    assert tar.names[0].endswith("t.tar.gz:set/train/no/b.wav")


def test_hash_split_deterministic(tmp_path):
    files = {f"clips/spk{i % 3}/{i:03d}.wav": wav_bytes([i]) for i in range(200)}
    root = make_tree(tmp_path / "tree", files)
    train, test = load_audio(root, "train"), load_audio(root, "test")
    assert len(train) + len(test) == 200 and 8 <= len(test) <= 35  # about 10%
    got = {n.split("clips/")[1] for n in test.names}
    # the documented rule, computed here independently of the loader's order
    import hashlib

    want = {
        rel.split("clips/")[1]
        for rel in files
        if int(hashlib.sha256(("vqkit-audio-split:" + rel[6:]).encode()).hexdigest()[:16], 16) % 100
        < 10
    }
    assert got == want and hash_split("spk0/000.wav", 10) in ("train", "test")
    # stable: a tar of the same tree (another top folder name) splits alike
    tar = make_tar(tmp_path / "other.tar", {f"x/{k[6:]}": v for k, v in files.items()})
    assert [n.split(":x/")[1] for n in load_audio(tar, "test").names] == sorted(
        got, key=lambda p: p.split("/")
    )
    assert len(load_audio(root, "test", test_percent=50)) > len(test)
    with pytest.raises(UserError, match="no 'val' split"):
        load_audio(root, "val")


def test_bad_and_empty_files(tmp_path):
    files = {
        "a.wav": wav_bytes([1, 2]),
        "empty.wav": wav_bytes([]),
        "bad.wav": b"RIFF junk",
        "stereo.wav": wav_bytes([100, 300, -100, -300], channels=2),
    }
    root = make_tree(tmp_path / "t", {k: v for k, v in files.items() if k.endswith("wav")})
    with pytest.warns(UserWarning) as record:
        data = load_audio(root, "train", test_percent=0)
    msgs = [str(w.message) for w in record]
    assert any("skipped 2 of 4" in m and "empty WAV" in m and "bad.wav" in m for m in msgs)
    assert any("1 of 2 files have several channels" in m for m in msgs)
    assert len(data) == 2 and data.converted == 1
    assert [round(v * 32768) for v in data.clip(1).tolist()] == [200, -200]  # mean of L, R
    with pytest.raises(UserError) as e:
        load_audio(root, "train", test_percent=0, on_error="raise")
    assert "\n" not in str(e.value) and str(root) in str(e.value)


def test_rates_resampled_or_refused(tmp_path):
    root = make_tree(
        tmp_path / "t",
        {"a.wav": wav_bytes([0] * 80, rate=8000), "b.wav": wav_bytes([0] * 160, rate=16000)},
    )
    with pytest.raises(UserError, match="different rates.*8000 Hz.*16000 Hz"):
        load_audio(root, "train", test_percent=0)
    data = load_audio(root, "train", rate=16000, test_percent=0)
    assert data.rate == 16000 and data.lengths.tolist() == [160, 160]


def test_mixed_images_and_audio_refused(tmp_path):
    root = make_tree(tmp_path / "m", {"a.wav": wav_bytes([1]), "sub/b.png": b"\x89PNG"})
    with pytest.raises(UserError, match="both images .* and audio"):
        detect_modality(root)
    with pytest.raises(UserError, match="both images"):
        vd.detect_format(root)
    with pytest.raises(UserError, match="both images"):
        load_audio(root)
    tar = make_tar(tmp_path / "m.tar", {"a.wav": wav_bytes([1]), "b.jpg": b"x"})
    with pytest.raises(UserError, match="both images"):
        vd.detect_format(tar)


def test_detection(tmp_path):
    audio = make_tree(tmp_path / "a", {"x/a.wav": wav_bytes([1])})
    images = make_tree(tmp_path / "i", {"x/a.png": b"x", ".hidden.wav": b""})
    assert detect_modality(audio) == "audio" and vd.detect_format(audio) == "audio"
    assert detect_modality(images) == "image" and vd.detect_format(images) == "imagefolder"
    assert vd.available_splits(audio) == ["test", "train"]
    with pytest.raises(UserError, match="audio dataset.*load_audio"):
        vd.load_dataset(audio)


def test_fsdd_official_split(fsdd_archive):
    assert vd.detect_format(fsdd_archive) == "audio"
    assert audio_splits(fsdd_archive) == ["test", "train"]
    test, train = load_audio(fsdd_archive, "test"), load_audio(fsdd_archive, "train")
    assert (len(test), len(train)) == (300, 2700)
    for data, per in ((test, 5), (train, 45)):
        assert data.rate == 8000 and data.classes == tuple("0123456789")
        assert len(data.speaker_names) == 6 and "theo" in data.speaker_names
        assert data.labels.bincount().tolist() == [6 * per] * 10
        assert data.speakers.bincount().tolist() == [10 * per] * 6
        assert data.samples.abs().max() <= 1 and data.lengths.min() > 0
    indices = {int(Path(n).stem.split("_")[2]) for n in test.names}
    assert indices == set(range(5))
    assert all(
        int(Path(n).stem.split("_")[0]) == y
        for n, y in zip(test.names, test.labels.tolist(), strict=True)
    )
    held = load_audio(fsdd_archive, "train", exclude_speakers=["theo"])
    assert len(held) == 2250 and not any("_theo_" in n for n in held.names)
    only = load_audio(fsdd_archive, "test", speakers=["theo"])
    assert len(only) == 50 and all("_theo_" in n for n in only.names)
    x, lengths = only.crops(torch.arange(4), 4000, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 4000) and (lengths <= 4000).all()
