"""vqkit.evaluation.codec_eval: the stage counts, the one batched decode against
decoding each prefix, codes used, and every figure against its definition computed
independently (float64 numpy), clip by clip; the spectrogram picture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vqkit.data.audio import AudioData
from vqkit.errors import UserError
from vqkit.evaluation.audio_metrics import mel_distance
from vqkit.evaluation.codec_eval import (
    codes_used,
    decode_clip,
    evaluate_codec,
    parse_stages,
    pick_clips,
)
from vqkit.models import AudioCodec

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(
    sample_rate=2000, seanet_channels=4, strides="2,4", embedding_dim=8, num_quantizers=3,
    num_embeddings=16,
)  # fmt: skip


def _codec() -> AudioCodec:
    torch.manual_seed(0)
    return AudioCodec(**SMALL).eval()


def _data(lengths: list[int], silent: int | None = None) -> AudioData:
    g = torch.Generator().manual_seed(1)
    clips = [0.3 * torch.randn(n, generator=g) for n in lengths]
    if silent is not None:
        clips[silent].zero_()
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()])
    n = len(lengths)
    return AudioData(
        torch.cat(clips), offsets, 2000, torch.zeros(n, dtype=torch.long),
        speakers=torch.tensor([i % 2 for i in range(n)]), speaker_names=("a", "b"),
    )  # fmt: skip


def test_parse_stages():
    assert parse_stages("", 3) == [1, 2, 3]
    assert parse_stages("3,1,1", 3) == [1, 3]
    for bad in ("0", "4", "x", "1,,2"):
        with pytest.raises(UserError, match="stage counts in 1..3"):
            parse_stages(bad, 3)


def test_pick_clips_strided():
    data = _data([300] * 10)
    assert pick_clips(data, 0) == list(range(10)) == pick_clips(data, 20)
    assert pick_clips(data, 4) == [0, 3, 6, 9]


def test_one_decode_equals_each_prefix_decoded():
    model = _codec()
    clip = 0.3 * torch.randn(333, generator=torch.Generator().manual_seed(2))
    codes, decoded = decode_clip(model, clip, [1, 3])
    assert codes.shape == (42, 3) and decoded.shape == (2, 333)
    x = clip.reshape(1, 1, -1)
    for row, n in zip(decoded, (1, 3), strict=True):
        want = model.decode(model.encode(x, num_stages=n), length=333)[0, 0]
        torch.testing.assert_close(row, want)


def test_codes_used_per_stage():
    a = torch.tensor([[0, 1], [0, 2], [3, 2]])
    b = torch.tensor([[5, 1]])
    assert codes_used([a, b], 8) == [3, 2]


def _si_sdr(ref: np.ndarray, est: np.ndarray) -> float:
    """Le Roux et al.'s definition, written out (zero-mean)."""
    s, e = ref - ref.mean(), est - est.mean()
    target = (s @ e) / (s @ s) * s
    return 10 * math.log10((target @ target) / ((e - target) @ (e - target)))


def test_figures_are_the_clip_means_of_their_definitions():
    """Clip 1 is silent (left out of SI-SDR), clip 2 is too short for the mel distance
    (left out of it); the bitrate is frames/s * n * log2 K."""
    model = _codec()
    data = _data([700, 500, 200, 900], silent=1)
    ev = evaluate_codec(model, data, stages=[1, 3])
    assert (ev["clips"], ev["silent_clips"], ev["short_clips"]) == (4, 1, 1)
    assert [r["kbps"] for r in ev["stages"]] == [250 * 1 * 4 / 1000, 250 * 3 * 4 / 1000]
    for row, n in zip(ev["stages"], (1, 3), strict=True):
        sdr, mel = [], []
        for i in range(4):
            x = data.clip(i).reshape(1, 1, -1)
            y = model.decode(model.encode(x, num_stages=n), length=x.shape[-1])[0, 0]
            ref, est = data.clip(i).double().numpy(), y.double().numpy()
            if i != 1:
                sdr.append(_si_sdr(ref, est))
            if i != 2:
                mel.append(mel_distance(ref, est, 2000))
        assert row["si_sdr"] == pytest.approx(np.mean(sdr), rel=1e-4)
        assert row["mel_distance"] == pytest.approx(np.mean(mel), rel=1e-5)
    codes = [model.encode(data.clip(i).reshape(1, 1, -1))[0] for i in range(4)]
    assert ev["codes_used"] == [len(set(torch.cat(codes)[:, q].tolist())) for q in range(3)]


def test_speech_scores_join_each_speaker(monkeypatch):
    """PESQ / STOI score each speaker's clips joined in split order, then average; each
    speaker's score is kept under its name."""
    import vqkit.evaluation.codec_eval as ce

    seen = []
    monkeypatch.setattr(
        ce, "stoi", lambda ref, deg, rate: seen.append(ref.numel()) or ref.numel() / 4000
    )
    model = _codec()
    data = _data([700, 500, 300, 900])  # speakers a, b, a, b
    row = evaluate_codec(model, data, stages=[3], speech_scores=True)["stages"][0]
    assert seen == [700 + 300, 500 + 900]
    assert row["stoi"] == pytest.approx((0.25 + 0.35) / 2) and "pesq_nb" not in row  # 2 kHz
    assert row["per_speaker"] == {"a": {"stoi": 0.25}, "b": {"stoi": 0.35}}
    unnamed = AudioData(data.samples, data.offsets, 2000, data.labels)  # no speakers: one
    row = evaluate_codec(model, unnamed, stages=[3], speech_scores=True)["stages"][0]
    assert row["per_speaker"] == {"all": {"stoi": 2400 / 4000}}


def test_wrong_rate_one_line():
    data = _data([400])
    bad = AudioData(data.samples, data.offsets, 8000, data.labels)
    with pytest.raises(UserError, match="clips at 8000 Hz for a codec at 2000 Hz"):
        evaluate_codec(_codec(), bad)


def test_spectrogram_picture(tmp_path):
    from PIL import Image

    from vqkit.evaluation.plots import plot_spectrograms

    x = torch.randn(900) * 0.1
    plot_spectrograms([{"original": x, "decoded": x * 0.5}, {"short": x[:100]}], 2000,
                      tmp_path / "s.png")  # fmt: skip
    with Image.open(tmp_path / "s.png") as im:
        assert im.size[0] > 300 and im.size[1] > 300


def test_report_and_samples(tmp_path, monkeypatch):
    """codec_report heads evaluate_codec's figures with the rates and says whether PESQ /
    STOI are in; write_samples writes the strided clips, their decodings at the lowest and
    highest stage count (what decode_clip gives), and the picture."""
    import vqkit.evaluation.codec_eval as ce
    from vqkit.data import decode_wav

    model, data = _codec(), _data([700, 500, 300, 900])
    monkeypatch.setattr(ce, "audio_eval_available", lambda: False)
    report = ce.codec_report(model, data, stages=[1, 3], limit=2)
    assert report == {"sample_rate": 2000, "frames_per_second": 250.0,
                      "speech_scores": "absent: pip install 'vqkit[audio-eval]' for PESQ and STOI",
                      **evaluate_codec(model, data, stages=[1, 3], limit=2)}  # fmt: skip
    model.train()
    written = ce.write_samples(model, data, [1, 2, 3], 2, tmp_path)
    assert model.training  # restored
    names = [p.name for p in written]
    assert names == [f"clip{i}_{k}.wav" for i in (0, 3) for k in ("original", "q1", "q3")] + [
        "spectrograms.png"
    ]
    _, decoded = decode_clip(model.eval(), data.clip(3), [1, 3])
    got = decode_wav(tmp_path / "samples" / "clip3_q3.wav").samples
    assert torch.allclose(got, decoded[1], atol=1 / 32768)  # 16-bit PCM of the decoding
    assert ce.write_samples(model, data, [1, 3], 0, tmp_path / "none") == []
