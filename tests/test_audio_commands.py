"""``vqkit encode`` / ``decode`` / ``eval`` on a speech codec (vqkit.training.audio_commands,
through vqkit.cli): a random tiny codec saved as a checkpoint and a pretrained directory,
synthetic WAVs written with the standard library; the round trip keeps the original rate
and length, decoding equals ``AudioCodec.decode`` of the same codes, fewer stages work,
foreign codes and every bad input are one line."""

from __future__ import annotations

import json
import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.cli import main
from vqkit.data import decode_wav, write_wav
from vqkit.data.resample import resampled_length
from vqkit.models import AudioCodec
from vqkit.storage.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# hop 8 at 2 kHz (250 frames/s), 3 stages of K = 16
SMALL = dict(sample_rate=2000, seanet_channels=4, strides="2,4", embedding_dim=8,
             num_quantizers=3, num_embeddings=16)  # fmt: skip


def codec(seed: int = 0) -> AudioCodec:
    torch.manual_seed(seed)
    return AudioCodec(**SMALL).eval()


def tone(n: int, rate: int, hz: float = 130.0) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) / rate
    return (0.5 * torch.sin(2 * math.pi * hz * t)).float()


def write_pcm(path: Path, frames: np.ndarray, rate: int, width: int) -> None:
    """``frames`` (T, C) of ints as a PCM WAV of ``width`` bytes a sample (stdlib)."""
    if width == 3:
        v = frames.astype("<i4").reshape(-1)
        raw = b"".join(int(x & 0xFFFFFF).to_bytes(3, "little") for x in v)
    else:
        raw = frames.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def float_wav(path: Path, values: list[float], rate: int = 2000) -> None:
    """An IEEE-float WAV (format tag 3), which the standard library does not write."""
    data = struct.pack(f"<{len(values)}f", *values)
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(codec, its pretrained directory, a .pt checkpoint recording a WAV folder)."""
    root = tmp_path_factory.mktemp("codec")
    model = codec()
    model.save_pretrained(root / "pretrained")
    data = root / "wavs"
    for split, n in (("train", 2), ("test", 3)):
        (data / split).mkdir(parents=True)
        for i in range(n):
            write_wav(data / split / f"c{i}.wav", tone(600 + 50 * i, 2000, 90 + 40 * i), 2000)
    ckpt = root / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(
        ckpt,
        {
            "kind": "vqkit-audio-codec",
            "model_config": model.config.to_dict(),
            "model": model.state_dict(),
            "step": 0,
            "train_config": {"data": str(data)},
        },
    )
    return model, root / "pretrained", ckpt


def _codes(path: Path) -> tuple[np.ndarray, dict]:
    return np.load(path), json.loads(Path(str(path) + ".json").read_text())


def _expected_pcm(x: torch.Tensor) -> torch.Tensor:
    """What write_wav stores of ``x``, read back: round(x * 32768) clipped, / 32768."""
    return (x.double() * 32768).round().clamp(-32768, 32767).float() / 32768


def test_round_trip_keeps_the_rate_and_length(model_files, tmp_path, capsys):
    model, pretrained, ckpt = model_files
    wavs = tmp_path / "in"
    (wavs / "sub").mkdir(parents=True)
    write_wav(wavs / "same.wav", tone(1001, 2000), 2000)
    write_wav(wavs / "sub" / "high.wav", tone(1234, 4000), 4000)  # resampled
    frames = (tone(777, 3000).numpy() * (1 << 23)).round().astype(np.int64)[:, None]
    write_pcm(wavs / "deep.wav", frames, 3000, 3)  # 24-bit PCM at 3 kHz
    (wavs / "notes.txt").write_text("not audio")  # a folder's other files are not inputs
    out = tmp_path / "codes"
    assert main(["encode", str(ckpt), str(wavs), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "high.wav: 4000 Hz resampled to the codec's 2000 Hz" in text
    assert "same.wav: " not in text.replace("same.wav ->", "")  # no resampling line for it
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert names == ["deep.npy", "same.npy", "sub/high.npy"]
    for name, rate, length in (("same", 2000, 1001), ("sub/high", 4000, 1234), ("deep", 3000, 777)):
        codes, meta = _codes(out / f"{name}.npy")
        frames = -(-resampled_length(length, rate, 2000) // 8)
        assert codes.shape == (3, frames) and codes.dtype == np.int64
        assert 0 <= codes.min() and codes.max() < 16
        assert meta["modality"] == "audio" and meta["num_codes"] == 16
        assert (meta["stages"], meta["sample_rate"], meta["hop"]) == (3, 2000, 8)
        assert (meta["original_rate"], meta["length"], meta["channels"]) == (rate, length, 1)
    # a pretrained directory is the same codec: the same codes
    again = tmp_path / "again"
    assert main(["encode", str(pretrained), str(wavs / "same.wav"), "--out", str(again)]) == 0
    assert np.array_equal(np.load(again / "same.npy"), np.load(out / "same.npy"))
    assert _codes(again / "same.npy")[1] == _codes(out / "same.npy")[1]
    dec = tmp_path / "dec"
    assert main(["decode", str(pretrained), *map(str, sorted(out.rglob("*.npy"))),
                 "--out", str(dec)]) == 0  # fmt: skip
    for name, rate, length in (("same", 2000, 1001), ("sub/high", 4000, 1234), ("deep", 3000, 777)):
        wav = decode_wav(dec / f"{name}.wav")
        assert (wav.rate, wav.samples.numel(), wav.channels) == (rate, length, 1)
    # at the codec's rate the WAV is AudioCodec.decode of the same codes, as 16-bit PCM
    codes = torch.from_numpy(np.load(out / "same.npy"))
    want = model.decode(codes.T[None], length=1001)[0, 0]
    assert torch.equal(decode_wav(dec / "same.wav").samples, _expected_pcm(want))
    assert codes.equal(model.encode(decode_wav(wavs / "same.wav").samples.reshape(1, 1, -1))[0].T)


def test_fewer_stages_and_one_output_file(model_files, tmp_path, capsys):
    model, pretrained, _ = model_files
    write_wav(tmp_path / "a.wav", tone(800, 2000), 2000)
    full, two = tmp_path / "full", tmp_path / "two"
    assert main(["encode", str(pretrained), str(tmp_path / "a.wav"), "--out", str(full)]) == 0
    assert main(["encode", str(pretrained), str(tmp_path / "a.wav"), "--out", str(two),
                 "--stages", "2"]) == 0  # fmt: skip
    codes, meta = _codes(two / "a.npy")
    assert meta["stages"] == 2 and np.array_equal(codes, np.load(full / "a.npy")[:2])
    one = tmp_path / "one.wav"
    assert main(["decode", str(pretrained), str(full / "a.npy"), "--out", str(one),
                 "--stages", "1"]) == 0  # fmt: skip
    first = torch.from_numpy(np.load(full / "a.npy")[:1]).T[None]  # (1, T, 1)
    want = _expected_pcm(model.decode(first, length=800)[0, 0])
    assert torch.equal(decode_wav(one).samples, want)
    capsys.readouterr()
    # more stages than the file holds, or than the codec has: one line each
    assert main(["decode", str(pretrained), str(two / "a.npy"), "--out", str(tmp_path / "x"),
                 "--stages", "3"]) == 2  # fmt: skip
    assert "holds 2 stage(s); --stages 3 asks for more" in capsys.readouterr().err
    assert main(["encode", str(pretrained), str(tmp_path / "a.wav"), "--out", str(tmp_path / "y"),
                 "--stages", "4"]) == 2  # fmt: skip
    assert "num_stages must be in [1, 3]" in capsys.readouterr().err
    # --out X.wav takes one input only; an existing output needs --overwrite
    assert main(["decode", str(pretrained), str(full / "a.npy"), str(two / "a.npy"),
                 "--out", str(one)]) == 2  # fmt: skip
    assert "is one WAV file" in capsys.readouterr().err
    assert main(["decode", str(pretrained), str(full / "a.npy"), "--out", str(one)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["decode", str(pretrained), str(full / "a.npy"), "--out", str(one),
                 "--overwrite"]) == 0  # fmt: skip
    assert decode_wav(one).samples.numel() == 800


def test_empty_and_stereo_wavs(model_files, tmp_path, capsys):
    model, pretrained, _ = model_files
    write_wav(tmp_path / "empty.wav", torch.zeros(0), 3000)
    x = tone(500, 2000)
    left = (x.numpy() * 32768).round().clip(-32768, 32767).astype(np.int64)
    write_pcm(tmp_path / "stereo.wav", np.stack([left, left // 2], 1), 2000, 2)
    out = tmp_path / "codes"
    assert main(["encode", str(pretrained), str(tmp_path / "empty.wav"),
                 str(tmp_path / "stereo.wav"), "--out", str(out)]) == 0  # fmt: skip
    assert "stereo.wav: 2 channels averaged to mono (the codec is mono)" in capsys.readouterr().out
    codes, meta = _codes(out / "empty.npy")
    assert codes.shape == (3, 0) and (meta["length"], meta["original_rate"]) == (0, 3000)
    mono = decode_wav(tmp_path / "stereo.wav").samples  # the channels' mean
    want = model.encode(mono.reshape(1, 1, -1))[0].T.numpy()
    codes, meta = _codes(out / "stereo.npy")
    assert np.array_equal(codes, want) and meta["channels"] == 2
    dec = tmp_path / "dec"
    assert main(["decode", str(pretrained), str(out / "empty.npy"), str(out / "stereo.npy"),
                 "--out", str(dec)]) == 0  # fmt: skip
    empty = decode_wav(dec / "empty.wav")
    assert (empty.rate, empty.samples.numel()) == (3000, 0)
    stereo = decode_wav(dec / "stereo.wav")
    assert (stereo.channels, stereo.samples.numel()) == (1, 500)


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_bad_inputs_are_one_line(model_files, tmp_path, capsys):
    _, pretrained, _ = model_files
    write_wav(tmp_path / "good.wav", tone(300, 2000), 2000)
    good = (tmp_path / "good.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(good[:30])  # header cut short
    (tmp_path / "short.wav").write_bytes(good[:-100])  # data cut short
    (tmp_path / "text.wav").write_text("hello, not a WAV")
    float_wav(tmp_path / "nan.wav", [0.1, float("nan"), 0.2])
    (tmp_path / "empty_dir").mkdir()
    out = tmp_path / "out"
    for name, needle in (
        ("cut.wav", "cut.wav"),
        ("short.wav", "truncated WAV"),
        ("text.wav", "not a valid WAV file"),
        ("nan.wav", "IEEE float WAV (format tag 3), not PCM"),
        ("empty_dir", "no WAV files"),
        ("missing.wav", "no such file or folder"),
    ):
        args = ["encode", str(pretrained), str(tmp_path / "good.wav"), str(tmp_path / name)]
        assert main([*args, "--out", str(out)]) == 2, name
        _one_line_error(capsys, needle)
        assert not out.exists(), name  # every input is read before anything is written
    assert main(["encode", str(pretrained), str(tmp_path / "good.wav"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["decode", str(pretrained), str(out / "good.npy"), "--out", str(tmp_path / "d"),
                 "--scales", "1"]) == 2  # fmt: skip
    _one_line_error(capsys, "--scales is for multi-scale image tokenizers")


def test_foreign_codes_are_refused(model_files, tmp_path, capsys):
    model, pretrained, _ = model_files
    write_wav(tmp_path / "a.wav", tone(400, 2000), 2000)
    out = tmp_path / "codes"
    assert main(["encode", str(pretrained), str(tmp_path / "a.wav"), "--out", str(out)]) == 0
    other = tmp_path / "other"
    codec(seed=1).save_pretrained(other)  # the same architecture, other weights
    assert main(["decode", str(other), str(out / "a.npy"), "--out", str(tmp_path / "d")]) == 2
    _one_line_error(capsys, "a.npy was written by another codec (codec weights: sha256")
    assert not (tmp_path / "d").exists()
    # --unchecked decodes the raw array at the codec's rate, frames x hop samples
    assert main(["decode", str(other), str(out / "a.npy"), "--out", str(tmp_path / "u.wav"),
                 "--unchecked"]) == 0  # fmt: skip
    raw = decode_wav(tmp_path / "u.wav")
    assert (raw.rate, raw.samples.numel()) == (2000, np.load(out / "a.npy").shape[1] * 8)
    # an image tokenizer's map, and a map without its sidecar
    from vqkit.models import VQVAE
    from vqkit.models.codes_io import model_identity, save_codes

    torch.manual_seed(0)
    image = VQVAE(in_channels=1, image_size=8, downsample=4, hidden=8, res_hidden=4,
                  res_layers=1, num_embeddings=16, embedding_dim=4)  # fmt: skip
    save_codes(tmp_path / "img.npy", np.zeros((2, 2), dtype=np.int64), model_identity(image))
    assert main(["decode", str(pretrained), str(tmp_path / "img.npy"), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "holds an image tokenizer's index map, not an audio codec's codes")
    image.save_pretrained(tmp_path / "tok")
    assert main(["decode", str(tmp_path / "tok"), str(out / "a.npy"), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "holds an audio codec's codes, not an image tokenizer's index map")
    assert main(["decode", str(tmp_path / "tok"), str(tmp_path / "img.npy"), "--out",
                 str(tmp_path / "i"), "--stages", "1"]) == 2  # fmt: skip
    _one_line_error(capsys, "--stages is for audio codecs")
    np.save(tmp_path / "bare.npy", np.load(out / "a.npy"))
    with pytest.warns(UserWarning, match="no tokenizer identity"):
        assert main(["decode", str(pretrained), str(tmp_path / "bare.npy"), "--out",
                     str(tmp_path / "bare")]) == 0  # fmt: skip


def test_eval_on_the_recorded_data(model_files, tmp_path, capsys):
    model, pretrained, ckpt = model_files
    out = tmp_path / "ev"
    assert main(["eval", str(ckpt), "--out", str(out), "--limit", "2"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["split"] == "test" and result["clips"] == 2 and result["sample_rate"] == 2000
    assert result["data"] == str(ckpt.parents[2] / "wavs")
    assert [r["num_stages"] for r in result["stages"]] == [1, 2, 3]
    assert [r["kbps"] for r in result["stages"]] == [1.0, 2.0, 3.0]  # 250 x n x 4 bits
    assert all(math.isfinite(r["si_sdr"]) for r in result["stages"])
    assert (out / "spectrograms.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        f"clip{i}_{k}.wav" for i in (0, 1, 2) for k in ("original", "q1", "q3")
    ]
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--out", str(out)]) == 2
    _one_line_error(capsys, "eval.json exists", "--overwrite")
    # a pretrained directory that records no data: one line naming --data; --data works
    assert main(["eval", str(pretrained), "--out", str(tmp_path / "no")]) == 2
    _one_line_error(capsys, "records no training data", "--data")
    wavs = str(ckpt.parents[2] / "wavs")
    assert main(["eval", str(pretrained), "--data", wavs, "--split", "train",
                 "--out", str(out), "--overwrite"]) == 0  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    assert (result["split"], result["clips"], result["data"]) == ("train", 2, wavs)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [  # no stale clip2
        f"clip{i}_{k}.wav" for i in (0, 1) for k in ("original", "q1", "q3")
    ]
    capsys.readouterr()
    assert main(["eval", str(pretrained), "--data", wavs, "--inception-weights", "x.pth",
                 "--out", str(tmp_path / "img")]) == 2  # fmt: skip
    _one_line_error(capsys, "--inception-weights: image tokenizers only")
    assert main(["eval", str(ckpt.parents[1] / "gone"), "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
