"""vqkit.compress.codec: the API round trips (code maps of every shape and dtype,
images), the bits against a float64 teacher-forced reference of the float prior (the
coding order is the prior's flattening order), decoding in fresh processes under other
CPU kernel sets and thread counts, several files decoded side by side, the identity
checks, and a changed distribution refused by the checksum."""

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
from vqkit.errors import UserError  # noqa: E402
from vqkit.prior import Prior, PriorConfig, load_tokenizer  # noqa: E402
from vqkit.storage.checkpoint import save_checkpoint  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


def make_tokenizer(out: Path, **overrides) -> Path:
    """A tokenizer run directory holding an untrained seeded VQ-VAE (28 x 28 gray ->
    7 x 7 maps of 32 codes; ``quantizer="multiscale", scales="1,2,4,7"``: (70,)
    sequences): coding does not care how good its codes are."""
    from vqkit.models import VQVAE
    from vqkit.models.io import export_safetensors

    torch.manual_seed(0)
    model = VQVAE(in_channels=1, image_size=28, hidden=32, res_hidden=8, res_layers=1,
                  num_embeddings=32, embedding_dim=8, **overrides)  # fmt: skip
    out.mkdir(parents=True)
    export_safetensors(model, out / "model.safetensors")
    return out


def make_prior(
    out: Path, tok_dir: Path, *, classes: int = 10, seed: int = 0, kind: str = "autoregressive"
) -> Path:
    """A prior run directory without training: a seeded 1-layer prior (of ``kind``, the
    tokenizer's scales recorded as ``vqkit prior`` records them) whose embeddings are
    scaled up so that its distributions are far from uniform (peaked and varied, as a
    trained prior's are), saved as ``vqkit prior`` saves its checkpoints."""
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    shape = list(tok.model.encode(torch.zeros(1, 1, 28, 28)).shape[1:])
    cfg = PriorConfig(
        kind=kind, n_layer=1, n_head=2, n_embd=32, vocab_size=tok.num_codes, code_shape=shape,
        num_classes=classes, dropout=0.0, scales=tok.scales,
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
    order, through the exact integer twin: the encoder's ideal bits are -log2 p(c | y)
    of a float64 copy of the float prior run teacher-forced (another path, other
    arithmetic) within 0.1%, and the file is that plus little."""
    maps = _maps(codec, 4, seed=1)
    labels = torch.tensor([0, 3, 10, 9])
    stats: dict = {}
    data = encode_codes(maps, codec, labels=labels, stats=stats)
    ref = Prior(codec.prior.config).double().eval()
    ref.load_state_dict(codec.prior.state_dict())
    with torch.no_grad():
        nats = -ref.log_prob(torch.from_numpy(maps), labels).sum().item()
    ref_bits = nats / np.log(2.0)
    assert stats["ideal_bits"] == pytest.approx(ref_bits, rel=1e-3)
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
    assert stats["ideal_bits"] == pytest.approx(bits, rel=1e-3)


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
    assert codec.exact_hash[:16] in msg and other.exact_hash[:16] in msg
    assert codec.tokenizer_hash[:16] in msg and "\n" not in msg
    moved = Codec(codec.prior, None, "cd" * 32, codec.prior_hash, codec.classes)
    assert moved.exact_hash == codec.exact_hash  # the twin is a function of the weights
    with pytest.raises(DecodeError, match=f"tokenizer {codec.tokenizer_hash[:16]}"):
        decode_codes(data, moved)


def test_changed_distributions_fail_the_checksum_not_a_wrong_map(codec):
    """What a decoder computing other distributions under the same hashes would see
    (a bug, or a tampered payload): decoding goes astray and the checksum (or the
    payload's bit budget) refuses it."""
    maps = _maps(codec, 2, seed=5)
    data = encode_codes(maps, codec)
    model = Prior(codec.prior.config).eval()
    model.load_state_dict(codec.prior.state_dict())
    with torch.no_grad():
        model.blocks[0].mlp[0].weight.add_(0.5 * torch.randn_like(model.blocks[0].mlp[0].weight))
    drifted = Codec(model, None, codec.tokenizer_hash, codec.prior_hash, codec.classes)
    assert drifted.exact_hash != codec.exact_hash
    with pytest.raises(DecodeError, match="compressed with prior"):
        decode_codes(data, drifted)
    drifted.exact_hash = codec.exact_hash  # same name, other integers
    with pytest.raises(DecodeError, match="fail the file's checksum|cannot decode the payload"):
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
        with pytest.raises(DecodeError, match="cannot decode the payload|fail the file's checksum"):
            decode_codes(forged, codec)


KERNELS = {
    "default kernels": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2 kernels, 2 threads": {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"},
    "oneDNN capped at AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def test_fresh_processes_under_other_kernels_and_threads_decode_the_same(codec, runs, tmp_path):
    """Encoded here (this machine's best kernels, 1 thread); decoded in new interpreters
    under ATen's default (scalar) and AVX2 kernels, oneDNN capped at AVX2, and 2
    threads: the same codes (the float path of version 1 failed exactly this)."""
    maps = _maps(codec, 70, seed=7)  # two groups
    labels = [i % 11 for i in range(70)]
    (tmp_path / "m.vqz").write_bytes(encode_codes(maps, codec, labels=labels))
    script = textwrap.dedent(
        f"""
        import os, numpy as np, torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from vqkit.compress import decode_codes, load_codec
        codec = load_codec({str(runs[1])!r}, images=False)
        out = decode_codes(open({str(tmp_path / "m.vqz")!r}, "rb").read(), codec)
        np.save(os.environ["OUT"], out)
        print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
        """
    )
    for i, (name, extra) in enumerate(KERNELS.items()):
        out = tmp_path / f"out{i}.npy"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **extra, "OUT": str(out)}
        res = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=100
        )
        assert res.returncode == 0, (name, res.stderr)
        if "ATEN_CPU_CAPABILITY" in extra:
            assert res.stdout.split()[0].lower() == extra["ATEN_CPU_CAPABILITY"], res.stdout
        np.testing.assert_array_equal(np.load(out), maps, err_msg=name)


def test_several_files_decode_side_by_side_as_each_alone(codec):
    from vqkit.compress.codec import decode_many

    blobs = [encode_codes(_maps(codec, n, seed=n), codec, labels=n % 11) for n in (1, 3, 66)]
    together = decode_many(codec, blobs, ["a", "b", "c"])
    for blob, (codes, header) in zip(blobs, together, strict=True):
        alone, _ = decode_many(codec, [blob])[0]
        np.testing.assert_array_equal(codes, alone)
        assert header.num_maps == codes.shape[0]
    bad = bytearray(blobs[1])
    bad[20] ^= 1  # the prior hash: refused naming the file, before any decoding
    with pytest.raises(ValueError, match="^b: "):
        decode_many(codec, [blobs[0], bytes(bad)], ["a", "b"])


# ---- a multi-scale tokenizer: the next-scale prior (model 2), an autoregressive one --


@pytest.fixture(scope="module")
def ms(tmp_path_factory, one_thread_module):
    """Codecs of one multi-scale tokenizer (scales 1, 2, 4, 7: (70,) codes of 32):
    ``{"ns": next-scale, "ns2": another next-scale (seed 1), "ar": autoregressive}``."""
    root = tmp_path_factory.mktemp("compress_ms")
    tok = make_tokenizer(root / "tok", quantizer="multiscale", scales="1,2,4,7")
    dirs = {
        "ns": make_prior(root / "ns", tok, kind="next-scale"),
        "ns2": make_prior(root / "ns2", tok, kind="next-scale", seed=1),
        "ar": make_prior(root / "ar", tok),
    }
    return {name: load_codec(d) for name, d in dirs.items()} | {"dirs": dirs}


def _float64_bits(codec: Codec, maps: np.ndarray, labels: torch.Tensor) -> float:
    ref = Prior(codec.prior.config).double().eval()
    ref.load_state_dict(codec.prior.state_dict())
    with torch.no_grad():
        return -ref.log_prob(torch.from_numpy(maps), labels).sum().item() / np.log(2.0)


@pytest.mark.parametrize("name", ["ns", "ar"])
def test_multiscale_codes_round_trip_at_the_float_priors_bits(ms, name):
    """(L,) sequences, two groups of maps: back exactly, under model 2 (next-scale) or
    model 1 (autoregressive over the scales' sequence), at the float64 prior's NLL."""
    from vqkit.compress.format import unpack

    codec = ms[name]
    maps = _maps(codec, 70, seed=2)
    assert maps.shape == (70, 70)
    labels = torch.tensor([i % 11 for i in range(70)])
    stats: dict = {}
    data = encode_codes(maps, codec, labels=labels, stats=stats)
    header, _ = unpack(data)
    assert header.model == {"ns": 2, "ar": 1}[name] and header.code_shape == (70,)
    np.testing.assert_array_equal(decode_codes(data, codec), maps)
    ref = _float64_bits(codec, maps, labels)
    assert stats["ideal_bits"] == pytest.approx(ref, rel=1e-3)
    assert ref < 0.8 * maps.size * 5  # far from uniform: the test can tell models apart


@pytest.mark.parametrize("name", ["ns", "ar"])
def test_the_first_scales_decode_alone_and_preview_the_image(ms, name, monkeypatch):
    """decode(num_scales=N): the first N scales' codes of every map; the range decoder
    stops after them (one pass per scale up to N for model 2); the images are
    VQVAE.decode(codes, num_scales=N) of the full codes."""
    from vqkit.compress.codec import decode_maps
    from vqkit.data import denormalize, load_dataset

    codec = ms[name]
    images = load_dataset(None, "test").images[:2]
    codes = images_to_codes(codec, images)
    data = encode(images, codec, labels=[1, 4])
    full = codec.tokenizer.decode(codes, num_scales=4)
    for n, length in ((1, 1), (2, 5), (3, 21), (4, 70)):
        got, _ = decode_maps(codec, data, num_scales=n)
        np.testing.assert_array_equal(got, codes[:, :length].numpy())
        with torch.no_grad():
            want = codec.tokenizer.decode(codes, num_scales=n)
        assert torch.equal(decode(data, codec, num_scales=n), denormalize(want))
        if n == 4:
            assert torch.equal(want, full)
    assert not torch.equal(decode(data, codec, num_scales=1), decode(data, codec))
    calls = []
    real = type(codec.exact).logits_range
    monkeypatch.setattr(
        type(codec.exact), "logits_range", lambda *a: calls.append(a[4]) or real(*a)
    )
    decode_maps(codec, data, num_scales=2)
    assert calls == ([0, 1] if name == "ns" else [0, 1, 2, 3, 4])
    # a later group is reached only through the earlier groups' every symbol
    maps = _maps(codec, 66, seed=4)
    blob = encode_codes(maps, codec)
    got, _ = decode_maps(codec, blob, num_scales=3)
    np.testing.assert_array_equal(got, maps[:, :21])


def test_scales_of_a_one_map_prior_or_out_of_range_are_refused(codec, ms):
    data = encode_codes(_maps(codec, 1), codec)
    with pytest.raises(
        UserError, match=r"multi-scale tokenizer; this prior's codes \(7, 7\) are"
    ) as e:
        decode(data, codec, num_scales=1)
    assert "\n" not in str(e.value)
    ns_data = encode_codes(_maps(ms["ns"], 1), ms["ns"])
    for bad in (0, 5, True, 2.0):
        with pytest.raises(UserError, match=r"an int in \[1, 4\] \(the scales 1,2,4,7\)"):
            decode(ns_data, ms["ns"], num_scales=bad)


def test_model_2_files_name_their_prior(ms):
    """A model-2 file refused by an autoregressive prior of its tokenizer (naming the
    models) and by another next-scale prior (naming both digests), before decoding."""
    data = encode_codes(_maps(ms["ns"], 2), ms["ns"])
    with pytest.raises(
        DecodeError, match="coded by model 2 .*next-scale.* codes with model 1"
    ) as e:
        decode_codes(data, ms["ar"])
    assert "\n" not in str(e.value)
    with pytest.raises(DecodeError, match="compressed with prior") as e:
        decode_codes(data, ms["ns2"])
    assert ms["ns"].exact_hash[:16] in str(e.value) and ms["ns2"].exact_hash[:16] in str(e.value)
    assert ms["ns"].exact_hash != ms["ar"].exact_hash
    ar_data = encode_codes(_maps(ms["ar"], 1), ms["ar"])
    with pytest.raises(DecodeError, match="coded by model 1 .* codes with model 2"):
        decode_codes(ar_data, ms["ns"])


def test_a_masked_prior_is_refused_for_compression(tmp_path, ms):
    tok = tmp_path / "tok"
    make_tokenizer(tok)
    with pytest.raises(UserError, match="masked prior; compression needs") as e:
        load_codec(make_prior(tmp_path / "m", tok, kind="masked"))
    assert "\n" not in str(e.value)


def test_a_fresh_process_under_default_kernels_decodes_model_2_the_same(ms, tmp_path):
    maps = _maps(ms["ns"], 3, seed=8)
    (tmp_path / "m.vqz").write_bytes(encode_codes(maps, ms["ns"], labels=[0, 5, 10]))
    script = textwrap.dedent(
        f"""
        import os, numpy as np, torch
        from vqkit.compress import decode_codes, load_codec
        codec = load_codec({str(ms["dirs"]["ns"])!r}, images=False)
        data = open({str(tmp_path / "m.vqz")!r}, "rb").read()
        np.save(os.environ["OUT"], decode_codes(data, codec))
        print(torch.backends.cpu.get_cpu_capability())
        """
    )
    out = tmp_path / "out.npy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "OUT": str(out)}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=100
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0].lower() == "default"
    np.testing.assert_array_equal(np.load(out), maps)
