"""vqkit.prior.audio_codes: a speech codec's clips as a prior's windows (encoded alone,
cut from the start, the last padded with PAD, frame-major), a prior trained on them
(``vqkit prior --tokenizer CODEC``) whose padded loss equals a float64 cross-entropy
over the real codes, and its eval record's bitrates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqkit.data import load_audio, write_wav
from vqkit.errors import UserError
from vqkit.models import AudioCodec
from vqkit.prior import Prior, PriorConfig, load_tokenizer
from vqkit.prior.audio_codes import (
    audio_rates,
    clip_codes,
    encode_clips,
    load_audio_codes,
    stage_bits,
    windows,
)
from vqkit.prior.cli import main as prior_main
from vqkit.prior.sampling import PAD

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 kHz, hop 8 (250 frames/s), 3 stages of 16 codes: 1 kbit/s a stage uncoded
CODEC = dict(sample_rate=2000, seanet_channels=4, strides="2,4", embedding_dim=8,
             num_quantizers=3, num_embeddings=16)  # fmt: skip
WINDOW = 16
TINY_PRIOR = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--batch-size", "4",
              "--steps", "4", "--eval-every", "4", "--num-samples", "1", "--no-progress",
              "--audio-window", str(WINDOW)]  # fmt: skip


def write_clips(root: Path, rate: int = 2000) -> Path:
    """train/ (6 clips) and test/ (3) of chirps of different lengths (0.05 to 0.3 s)."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 3)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            t = torch.arange(int((0.05 + 0.05 * i) * rate)) / rate
            x = 0.4 * torch.sin(2 * math.pi * (80 + 30 * i) * t * (1 + t))
            write_wav(
                root / split / f"c{i}.wav", x + 0.02 * torch.randn(t.shape, generator=g), rate
            )
    return root


def make_codec(root: Path, data: Path, seed: int = 0) -> Path:
    """A speech codec's export directory (random weights), recording ``data``."""
    torch.manual_seed(seed)
    model = AudioCodec(**CODEC).eval()
    model.pretrained_info = {"data": str(data)}
    model.save_pretrained(root)
    return root


def make_prior(root: Path, codec: Path, *extra: str) -> Path:
    assert prior_main(["prior", "--tokenizer", str(codec), "--out", str(root), *TINY_PRIOR,
                       *extra]) == 0  # fmt: skip
    return root


@pytest.fixture(scope="module")
def audio(tmp_path_factory, one_thread_module):
    """(clips folder, codec dir, prior dir)."""
    root = tmp_path_factory.mktemp("audio_prior")
    data = write_clips(root / "wavs")
    codec = make_codec(root / "codec", data)
    return data, codec, make_prior(root / "prior", codec)


def test_windows_cut_from_the_start_and_pad_the_last():
    codes = torch.arange(7 * 2).reshape(7, 2)
    w = windows(codes, 3)
    assert w.shape == (3, 3, 2)
    assert torch.equal(w.reshape(-1, 2)[:7], codes)
    assert bool((w[2, 1:] == PAD).all()) and torch.equal(w[2, 0], codes[6])
    assert windows(codes[:6], 3).shape == (2, 3, 2)  # no padded window


def test_clips_are_encoded_alone_in_frame_major_windows(audio):
    data, codec_dir, _ = audio
    tok = load_tokenizer(codec_dir)
    model = tok.model
    clips = load_audio(data, "test", rate=2000)
    got = encode_clips(model, clips, WINDOW, 2)
    parts = []
    for i in range(len(clips)):
        wav = clips.clip(i)
        one = model.encode(wav.view(1, 1, -1), 2)[0]  # (F, 2): this clip alone
        assert one.shape[0] == math.ceil(wav.numel() / model.hop)
        assert torch.equal(clip_codes(model, wav, 2), one)
        parts.append(windows(one, WINDOW))
    assert torch.equal(got.codes, torch.cat(parts))
    assert got.code_shape == (WINDOW, 2) and not got.classes
    # a sequence reads frame by frame, stage 0 first: (W, n) row-major
    assert torch.equal(got.sequences()[0, :4], got.codes[0, :2].reshape(-1))


def test_prior_trains_on_a_codec_and_reports_bitrates(audio):
    _, _, prior = audio
    ev = json.loads((prior / "eval.json").read_text())
    stages = [ev[f"test_bits_stage{s}"] for s in range(3)]
    assert all(0 < b < 8 for b in stages)
    fps = 250.0
    assert ev["raw_kbps"] == pytest.approx(fps * 3 * 4 / 1000)  # log2 16 = 4 bits
    assert ev["test_kbps"] == pytest.approx(ev["test_bits"] * fps * 3 / 1000)
    assert ev["kbps_ratio"] == pytest.approx(ev["test_kbps"] / ev["raw_kbps"])
    assert ev["data"]["modality"] == "audio" and ev["data"]["audio_window"] == WINDOW
    assert list((prior / "samples").glob("step_*_0.wav"))  # its samples are WAVs
    cfg = json.loads((prior / "config.json").read_text())
    assert cfg["prior"]["code_shape"] == [WINDOW, 3]
    assert cfg["tokenizer"]["modality"] == "audio"


def test_padded_loss_matches_a_float64_reference():
    torch.manual_seed(0)
    cfg = PriorConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=5, code_shape=[4, 2], dropout=0.0)
    model = Prior(cfg).double().eval()
    codes = torch.randint(0, 5, (3, 4, 2))
    codes[0, 3:] = PAD  # windows of 3, 4 and 1 frames
    codes[2, 1:] = PAD
    seq = codes.reshape(3, -1)
    # reference: every real code's -log p given its real prefix, each sequence cut short
    total, count = 0.0, 0
    for b in range(3):
        n = int((seq[b] != PAD).sum())
        with torch.no_grad():
            logits = model(seq[b : b + 1, :n]).double()  # a prefix: no padding at all
        total += float(F.cross_entropy(logits[0], seq[b, :n], reduction="sum"))
        count += n
    with torch.no_grad():
        assert float(model.loss(codes)) == pytest.approx(total / count, rel=1e-12)
        assert float(-model.log_prob(codes).sum()) == pytest.approx(total, rel=1e-12)
        per = -model.log_probs(codes).sum(0) / math.log(2)
    bits = stage_bits(per, (seq != PAD).sum(0).double(), 2)
    assert sum(b * c for b, c in zip(bits, [3 + 4 + 1] * 2, strict=True)) == pytest.approx(
        total / math.log(2), rel=1e-12
    )


def test_rates_and_refusals(audio, tmp_path, capsys):
    data, codec_dir, _ = audio
    tok = load_tokenizer(codec_dir)
    r = audio_rates(tok.model, 2, 2.0)
    assert r == {"kbps": 1.0, "raw_kbps": 2.0, "kbps_ratio": 0.5}
    with pytest.raises(UserError, match=r"num_stages must be in \[1, 3\]"):
        load_audio_codes(tok, window=8, stages=4)
    tok.model.pretrained_info = {}
    with pytest.raises(UserError, match="records no training data; pass --data"):
        load_audio_codes(tok, window=8)
    argv = ["prior", "--tokenizer", str(codec_dir), "--out", str(tmp_path / "m"), *TINY_PRIOR]
    assert prior_main([*argv, "--kind", "masked"]) == 2
    assert "take an autoregressive prior (--kind autoregressive)" in capsys.readouterr().err
