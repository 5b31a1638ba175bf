"""vqkit.compress.codec: the API round trips (code maps of every shape and dtype,
images), the bits against a float64 teacher-forced reference (the coding order is the
prior's flattening order), decoding in a fresh process with another thread count, the
identity checks, and a changed distribution refused by the checksum."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("constriction")

from vqkit.compress import (  # noqa: E402
    DecodeError,
    codes_to_images,
    decode,
    decode_codes,
    encode,
    encode_codes,
    images_to_codes,
    load_codec,
)
from vqkit.compress.codec import Codec  # noqa: E402
from vqkit.prior import Prior, PriorConfig, load_tokenizer  # noqa: E402
from vqkit.storage.checkpoint import save_checkpoint  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


def make_tokenizer(out: Path) -> Path:
    """A tokenizer run directory holding an untrained seeded VQ-VAE (28 x 28 gray ->
    7 x 7 maps of 32 codes): coding does not care how good its codes are."""
    from vqkit.models import VQVAE
    from vqkit.models.io import export_safetensors

    torch.manual_seed(0)
    model = VQVAE(in_channels=1, image_size=28, hidden=32, res_hidden=8, res_layers=1,
                  num_embeddings=32, embedding_dim=8)  # fmt: skip
    out.mkdir(parents=True)
    export_safetensors(model, out / "model.safetensors")
    return out


def make_prior(out: Path, tok_dir: Path, *, classes: int = 10, seed: int = 0) -> Path:
    """A prior run directory without training: a seeded 1-layer prior whose embeddings
    are scaled up so that its distributions are far from uniform (peaked and varied, as
    a trained prior's are), saved as ``vqkit prior`` saves its checkpoints."""
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    shape = list(tok.model.encode(torch.zeros(1, 1, 28, 28)).shape[1:])
    cfg = PriorConfig(
        n_layer=1, n_head=2, n_embd=32, vocab_size=tok.num_codes, code_shape=shape,
        num_classes=classes, dropout=0.0,
    )  # fmt: skip
    model = Prior(cfg)
    with torch.no_grad():
        model.tok_emb.weight.mul_(6.0)  # tied head: about 3 bits per code of 5
    names = [f"class{i}" for i in range(classes)]
    save_checkpoint(
        out / "checkpoints" / "best.pt",
        {
            "kind": "vqkit-prior",
            "model_config": cfg.to_dict(),
            "model": model.state_dict(),
            "tokenizer": tok.describe(),
            "classes": names,
        },
    )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread_module):
    """(tokenizer dir, prior dir) shared by this module's tests."""
    root = tmp_path_factory.mktemp("compress")
    tok = make_tokenizer(root / "tok")
    yield tok, make_prior(root / "prior", tok)


@pytest.fixture(scope="module")
def codec(runs):
    return load_codec(runs[1])


def _maps(codec: Codec, n: int, seed: int = 0) -> np.ndarray:
    """Maps drawn from the prior itself (null class): as likely as real codes are."""
    g = torch.Generator().manual_seed(seed)
    return codec.prior.sample(n, generator=g).numpy()


def test_code_maps_round_trip_with_dtype_shape_and_classes(codec):
    maps = _maps(codec, 3)
    torch.set_num_threads(2)  # the coding loop runs on one thread and gives this back
    encode_codes(maps, codec)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    for arr in (maps, maps[0], maps.astype(np.uint16), maps[1].astype(np.int32)):
        data = encode_codes(arr, codec, labels=[2, 5, 10][: 1 if arr.ndim == 2 else 3])
        back = decode_codes(data, codec)
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)
    # the null class (None) and one class for all
    for labels in (None, 7):
        np.testing.assert_array_equal(
            decode_codes(encode_codes(maps, codec, labels=labels), codec), maps
        )


def test_bits_match_a_float64_teacher_forced_reference(codec):
    """The coded distributions are the prior's p(c_t | c_<t, y) in flatten_codes
    order: the encoder's ideal bits equal -log2 p(c | y) of a float64 copy of the prior
    run teacher-forced (a different path), and the file is that plus little."""
    maps = _maps(codec, 4, seed=1)
    labels = torch.tensor([0, 3, 10, 9])
    stats: dict = {}
    data = encode_codes(maps, codec, labels=labels, stats=stats)
    ref = Prior(codec.prior.config).double().eval()
    ref.load_state_dict(codec.prior.state_dict())
    with torch.no_grad():
        nats = -ref.log_prob(torch.from_numpy(maps), labels).sum().item()
    ref_bits = nats / np.log(2.0)
    assert stats["ideal_bits"] == pytest.approx(ref_bits, rel=1e-5)
    payload_bits = 8 * stats["payload_bytes"]
    assert ref_bits - 1 <= payload_bits <= ref_bits * 1.005 + 64  # termination: < 64 bits
    assert stats["header_bytes"] + stats["payload_bytes"] == len(data)
    # the maps are far from uniform under this prior: the test can tell orders apart
    shuffled = np.ascontiguousarray(np.swapaxes(maps, 1, 2))
    with torch.no_grad():
        other = -ref.log_prob(torch.from_numpy(shuffled), labels).sum().item() / np.log(2.0)
    assert abs(other - ref_bits) > 1.0


def test_residual_maps_follow_the_flattening_order(runs, tmp_path):
    """(h, w, Q) maps: coded position by position, the Q stages of a position in turn
    (flatten_codes); bits equal the teacher-forced float64 reference."""
    tok, _ = runs
    src = load_codec(runs[1])
    cfg = PriorConfig.from_dict({**src.prior.config.to_dict(), "code_shape": [7, 7, 2]})
    model = Prior(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(6.0)
    codec = Codec(model, None, src.tokenizer_hash, "ab" * 32, src.classes)
    maps = _maps(codec, 2, seed=3)
    stats: dict = {}
    data = encode_codes(maps, codec, stats=stats)
    np.testing.assert_array_equal(decode_codes(data, codec), maps)
    ref = Prior(cfg).double().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        bits = -ref.log_prob(torch.from_numpy(maps)).sum().item() / np.log(2.0)
    assert stats["ideal_bits"] == pytest.approx(bits, rel=1e-5)


def test_images_round_trip_to_the_tokenizers_reconstruction(codec):
    from vqkit.data import load_dataset

    images = load_dataset(None, "test").images[:3]
    data = encode(images, codec, labels=[0, 1, 2])
    out = decode(data, codec)
    expect = codes_to_images(codec, images_to_codes(codec, images).numpy())
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, expect)
    with pytest.raises(ValueError, match=r"expected uint8 images \(N, 1, 28, 28\)"):
        encode(torch.zeros(1, 1, 32, 32, dtype=torch.uint8), codec)
    with pytest.raises(ValueError, match="expected uint8"):
        encode(images.float(), codec)


def test_bad_code_maps_and_classes(codec):
    maps = _maps(codec, 1)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 32\)"):
        encode_codes(maps + codec.num_symbols, codec)
    with pytest.raises(ValueError, match=r"expected code maps \(N, 7, 7\)"):
        encode_codes(maps[:, :6], codec)
    with pytest.raises(ValueError, match="must be integers"):
        encode_codes(maps.astype(np.float32), codec)
    with pytest.raises(ValueError, match="class id 11 out of range"):
        encode_codes(maps, codec, labels=11)


def test_another_prior_or_tokenizer_is_refused_naming_both(codec, runs, tmp_path):
    data = encode_codes(_maps(codec, 1), codec)
    other = load_codec(make_prior(tmp_path / "p2", runs[0], seed=1))
    with pytest.raises(DecodeError) as e:
        decode_codes(data, other)
    msg = str(e.value)
    assert codec.prior_hash[:16] in msg and other.prior_hash[:16] in msg
    assert codec.tokenizer_hash[:16] in msg and "\n" not in msg
    moved = Codec(codec.prior, None, "cd" * 32, codec.prior_hash, codec.classes)
    with pytest.raises(DecodeError, match=f"tokenizer {codec.tokenizer_hash[:16]}"):
        decode_codes(data, moved)


def test_changed_distributions_fail_the_checksum_not_a_wrong_map(codec):
    """What a platform computing other floating-point results would see: the same
    hashes, other distributions. Decoding goes astray and the checksum refuses it."""
    maps = _maps(codec, 2, seed=5)
    data = encode_codes(maps, codec)
    model = Prior(codec.prior.config).eval()
    model.load_state_dict(codec.prior.state_dict())
    with torch.no_grad():
        model.blocks[0].mlp[0].weight.add_(0.5 * torch.randn_like(model.blocks[0].mlp[0].weight))
    drifted = Codec(model, None, codec.tokenizer_hash, codec.prior_hash, codec.classes)
    with pytest.raises(DecodeError, match="cannot be decoded here: the decoded codes fail"):
        decode_codes(data, drifted)


def test_a_payload_that_is_not_the_codes_is_refused(codec):
    """Intact container (CRC recomputed), other payload: an error, not other codes."""
    import struct
    import zlib

    from vqkit.compress.format import unpack

    data = encode_codes(_maps(codec, 2, seed=9), codec)
    _, payload = unpack(data)
    head = data[: len(data) - len(payload) - 4]
    for junk in (b"\xff" * 12, b"", bytes(range(40))):
        forged = head + struct.pack("<I", zlib.crc32(junk, zlib.crc32(head))) + junk
        with pytest.raises(DecodeError, match="cannot decode the payload|cannot be decoded here"):
            decode_codes(forged, codec)


def test_fresh_process_with_other_thread_count_decodes_the_same(codec, runs, tmp_path):
    """Encoded here with 1 thread; decoded in a new interpreter with 2 threads."""
    maps = _maps(codec, 4, seed=7)
    (tmp_path / "m.vqz").write_bytes(encode_codes(maps, codec, labels=[1, 2, 3, 4]))
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        torch.set_num_threads(2)
        from vqkit.compress import decode_codes, load_codec
        codec = load_codec({str(runs[1])!r}, images=False)
        out = decode_codes(open({str(tmp_path / "m.vqz")!r}, "rb").read(), codec)
        np.save({str(tmp_path / "out.npy")!r}, out)
        print(torch.get_num_threads())
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=100
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), maps)
