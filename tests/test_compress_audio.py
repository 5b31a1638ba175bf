"""vqkit.compress.audio: a speech codec's clips compressed with its prior (format version
3) and back: the decoded codes are exactly the encoder's, the WAV has the original rate
and length (``vqkit compress x.wav`` / ``vqkit decompress``, ``--codes``), a clip longer
than a window spans several; a header whose frame count the codec would not make, a
prior of another codec or of an image tokenizer: one line, no output."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

pytest.importorskip("constriction")

from vqkit.cli import main  # noqa: E402
from vqkit.compress import format as fmt  # noqa: E402
from vqkit.compress import load_codec  # noqa: E402
from vqkit.compress.audio import decode_audio, decode_clips, encode_audio, wav_codes  # noqa: E402
from vqkit.compress.codec import DecodeError  # noqa: E402
from vqkit.data import decode_wav, write_wav  # noqa: E402
from vqkit.models.codes_io import codec_identity, read_audio_codes  # noqa: E402

from .test_compress_codec import make_prior as make_image_prior  # noqa: E402
from .test_compress_codec import make_tokenizer  # noqa: E402
from .test_prior_audio_codes import WINDOW, make_codec, make_prior, write_clips  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread_module):
    """(prior dir, its codec loaded, a 3 kHz WAV of 0.4 s: 100 frames at the codec's 2 kHz,
    7 windows of 16)."""
    root = tmp_path_factory.mktemp("compress_audio")
    data = write_clips(root / "wavs")
    prior = make_prior(root / "prior", make_codec(root / "codec", data))
    t = torch.arange(1200) / 3000
    write_wav(root / "in" / "long.wav", 0.3 * torch.sin(2 * math.pi * 150 * t), 3000)
    return prior, load_codec(prior), root / "in" / "long.wav"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_round_trip_gives_the_codes_and_the_wav_back(setup, tmp_path, capsys):
    prior, codec, wav_path = setup
    wav = decode_wav(wav_path)
    want, info = wav_codes(codec, wav.samples, wav.rate)
    assert info == fmt.AudioInfo(3000, 1200, 100) and want.shape == (100, 3)
    stats: dict[str, float] = {}
    data = encode_audio(wav.samples, wav.rate, codec, stats=stats)
    header, payload = fmt.unpack(data)
    assert header.version == 3 and header.is_audio and header.num_maps == 7  # ceil(100 / 16)
    assert header.code_shape == (WINDOW, 3) and stats["codes"] == 100 * 3
    samples, rate, codes = decode_audio(data, codec)
    assert torch.equal(codes, want) and rate == 3000 and samples.shape == (1200,)
    # the CLI: the same bytes, the WAV at its rate and length, the codes (stages, frames)
    code, out, _ = _run(capsys, "compress", str(wav_path), "--prior", str(prior), "--out",
                        str(tmp_path / "c"))  # fmt: skip
    assert code == 0 and "kbit/s" in out and "raw at 3 stages" in out
    assert (tmp_path / "c" / "long.vqz").read_bytes() == data
    for extra, name in (((), "long.wav"), (("--codes",), "long.npy")):
        code, _, _ = _run(capsys, "decompress", str(tmp_path / "c" / "long.vqz"), "--prior",
                          str(prior), "--out", str(tmp_path / "d"), *extra)  # fmt: skip
        assert code == 0 and (tmp_path / "d" / name).is_file()
    back = decode_wav(tmp_path / "d" / "long.wav")
    assert back.rate == 3000 and back.samples.shape == (1200,)
    assert np.array_equal(np.load(tmp_path / "d" / "long.npy"), want.T.numpy())
    # the codes file is `vqkit encode`'s: its reader checks it against the codec
    got = read_audio_codes(tmp_path / "d" / "long.npy", codec_identity(codec.tokenizer))
    assert np.array_equal(got.codes, want.T.numpy())
    assert (got.original_rate, got.length) == (3000, 1200)


def test_clips_of_one_frame_and_of_exactly_a_window(setup):
    _, codec, _ = setup
    for length in (1, 8 * WINDOW, 8 * WINDOW + 1):  # hop 8 at the codec's own rate
        x = torch.linspace(-0.5, 0.5, length)
        data = encode_audio(x, 2000, codec)
        codes, header = decode_clips(codec, [data])[0]
        assert torch.equal(codes, wav_codes(codec, x, 2000)[0])
        assert header.num_maps == math.ceil(math.ceil(length / 8) / WINDOW)


def _recrc(data: bytes, head_len: int) -> bytes:
    """``data`` with its CRC recomputed (a crafted header, not a damaged one)."""
    head, payload = data[:head_len], data[head_len + 4 :]
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


def test_crafted_headers_and_other_priors_are_refused(setup, tmp_path, capsys):
    prior, codec, wav_path = setup
    data = encode_audio(torch.zeros(300), 2000, codec)
    (tmp_path / "x.vqz").write_bytes(data)
    head_len = len(data) - len(fmt.unpack(data)[1]) - 4
    at = 4 + 4 + 16 + 1 + 4 + 4 + 4  # magic, version..model, hashes, ndim, shape, K, N
    # 300 samples make 38 frames; 40 frames still need 3 windows, but the codec makes 38
    bad = bytearray(data)
    bad[at : at + 12] = struct.pack("<III", 2000, 300, 40)
    with pytest.raises(DecodeError, match="40 frames stated for 300 samples at 2000 Hz"):
        decode_clips(codec, [_recrc(bytes(bad), head_len)])
    bad[at : at + 12] = struct.pack("<III", 2000, 300, 60)  # 4 windows of 16 for 3 maps
    with pytest.raises(fmt.FormatError, match="3 windows of 16 frames for a clip of 60"):
        fmt.unpack(_recrc(bytes(bad), head_len))
    # a prior of another codec, a prior of an image tokenizer: one line each, no output
    other = make_prior(
        tmp_path / "other", make_codec(tmp_path / "codec2", wav_path.parents[1] / "wavs", seed=1)
    )
    image = make_image_prior(tmp_path / "iprior", make_tokenizer(tmp_path / "tok"))
    for p, match in ((other, "was compressed with prior"), (image, "a speech codec's codes")):
        code, _, err = _run(capsys, "decompress", str(tmp_path / "x.vqz"), "--prior", str(p),
                            "--out", str(tmp_path / "d"))  # fmt: skip
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "d").exists()
    code, _, err = _run(capsys, "compress", str(wav_path), "--prior", str(prior), "--out",
                        str(tmp_path / "e"), "--codes")  # fmt: skip
    assert code == 2 and "compresses WAV clips" in err
