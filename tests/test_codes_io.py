"""vqkit.models.codes_io: an audio codec's codes files (``(stages, frames)`` + sidecar)
round trip with the clip's rate and length, their frame count agrees with the resampler
and the encoder, and every mismatch (another codec, the other modality, a sidecar that
does not fit the array, codes out of range) is one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vqkit.data.resample import resampled_length
from vqkit.errors import UserError
from vqkit.models import VQVAE, AudioCodec
from vqkit.models.codes_io import (
    codec_frames,
    codec_identity,
    model_identity,
    read_audio_codes,
    read_codes,
    save_audio_codes,
    save_codes,
    sidecar_path,
    weights_hash,
)

SMALL = dict(sample_rate=2000, seanet_channels=4, strides="2,4", embedding_dim=8,
             num_quantizers=3, num_embeddings=16)  # fmt: skip


@pytest.fixture(scope="module")
def codec() -> AudioCodec:
    torch.manual_seed(0)
    return AudioCodec(**SMALL).eval()


def test_identity_names_the_weights(codec):
    ident = codec_identity(codec)
    assert ident == {"modality": "audio", "tokenizer": weights_hash(codec), "num_codes": 16,
                     "codes_per_position": 3, "sample_rate": 2000, "hop": 8}  # fmt: skip
    other = AudioCodec(**SMALL)
    other.load_state_dict(codec.state_dict())
    assert codec_identity(other) == ident  # the same weights: the same identity
    with torch.no_grad():
        next(other.parameters()).add_(1e-6)
    assert codec_identity(other)["tokenizer"] != ident["tokenizer"]


@pytest.mark.parametrize(
    ("length", "rate"), [(0, 2000), (1, 2000), (8, 2000), (9, 2000), (1234, 4000), (777, 3000),
                         (5, 44100), (1000, 1000)]
)  # fmt: skip
def test_frames_agree_with_the_resampler_and_the_encoder(codec, length, rate):
    ident = codec_identity(codec)
    samples = resampled_length(length, rate, 2000)
    assert codec_frames(length, rate, ident) == math.ceil(samples / 8)
    if samples:
        frames = codec.encode(torch.zeros(1, 1, samples)).shape[1]
        assert frames == codec_frames(length, rate, ident)


def test_audio_codes_round_trip(codec, tmp_path):
    ident = codec_identity(codec)
    codes = np.arange(3 * 155).reshape(3, 155) % 16
    save_audio_codes(tmp_path / "a.npy", codes, ident, original_rate=4000, length=2469, channels=2)
    meta = json.loads(sidecar_path(tmp_path / "a.npy").read_text())
    assert meta == {"format": "vqkit-codes", "version": 1, **ident, "stages": 3, "frames": 155,
                    "original_rate": 4000, "length": 2469, "channels": 2}  # fmt: skip
    got = read_audio_codes(tmp_path / "a.npy", ident)
    assert np.array_equal(got.codes, codes) and got.codes.dtype == np.int64
    assert (got.original_rate, got.length, got.channels) == (4000, 2469, 2)
    save_audio_codes(tmp_path / "e.npy", np.zeros((2, 0)), ident, original_rate=8000, length=0)
    empty = read_audio_codes(tmp_path / "e.npy", ident)
    assert empty.codes.shape == (2, 0) and empty.length == 0


def test_writing_refuses_codes_that_do_not_fit(codec, tmp_path):
    ident = codec_identity(codec)
    with pytest.raises(UserError, match=r"stages <= 3"):
        save_audio_codes(tmp_path / "a.npy", np.zeros((4, 2)), ident, original_rate=2000, length=16)
    with pytest.raises(UserError, match="the codec makes 2"):
        save_audio_codes(tmp_path / "a.npy", np.zeros((3, 3)), ident, original_rate=2000, length=16)
    assert not (tmp_path / "a.npy").exists()


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_reading_refuses_what_does_not_belong(codec, tmp_path):
    ident = codec_identity(codec)
    path = tmp_path / "a.npy"
    save_audio_codes(path, np.ones((3, 2), dtype=np.int64), ident, original_rate=2000, length=16)
    torch.manual_seed(1)
    other = codec_identity(AudioCodec(**SMALL))
    with pytest.raises(UserError) as e:
        read_audio_codes(path, other)
    assert "written by another codec (codec weights: sha256" in _one_line(e)
    assert np.array_equal(read_audio_codes(path, other, unchecked=True).codes, np.ones((3, 2)))
    # an image tokenizer's map for a codec, and a codec's codes for an image tokenizer
    torch.manual_seed(0)
    image = VQVAE(in_channels=1, image_size=8, downsample=4, hidden=8, res_hidden=4,
                  res_layers=1, num_embeddings=16, embedding_dim=4)  # fmt: skip
    save_codes(tmp_path / "img.npy", np.zeros((2, 2)), model_identity(image))
    with pytest.raises(UserError) as e:
        read_audio_codes(tmp_path / "img.npy", ident)
    assert "holds an image tokenizer's index map, not an audio codec's codes" in _one_line(e)
    with pytest.raises(UserError) as e:
        read_codes(path, model_identity(image))
    assert "holds an audio codec's codes, not an image tokenizer's index map" in _one_line(e)
    # the array replaced behind the sidecar's back; codes out of range; wrong rank
    np.save(path, np.ones((3, 5), dtype=np.int64))
    with pytest.raises(UserError) as e:
        read_audio_codes(path, ident)
    assert "do not belong together" in _one_line(e)
    np.save(path, np.full((3, 2), 16))
    with pytest.raises(UserError, match=r"indices 16\.\.16 outside \[0, 16\)"):
        read_audio_codes(path, ident)
    np.save(path, np.ones((3, 2, 1), dtype=np.int64))
    with pytest.raises(UserError, match=r"expected integer audio codes \(stages <= 3, frames\)"):
        read_audio_codes(path, ident)
    sidecar_path(path).write_text(json.dumps({**json.loads(sidecar_path(path).read_text()),
                                              "length": -1}))  # fmt: skip
    np.save(path, np.ones((3, 2), dtype=np.int64))
    with pytest.raises(UserError, match="length must be an integer >= 0"):
        read_audio_codes(path, ident)


def test_codes_without_a_sidecar(codec, tmp_path):
    ident = codec_identity(codec)
    np.save(tmp_path / "raw.npy", np.ones((2, 7), dtype=np.int64))
    with pytest.warns(UserWarning, match="no tokenizer identity"):
        got = read_audio_codes(tmp_path / "raw.npy", ident)
    assert (got.original_rate, got.length) == (2000, 7 * 8)  # the codec's rate, T x hop
    np.save(tmp_path / "none.npy", np.ones((2, 0), dtype=np.int64))
    with pytest.raises(UserError, match="nothing to decode"):
        read_audio_codes(tmp_path / "none.npy", ident, unchecked=True)
