"""``vqkit compress`` / ``vqkit decompress`` end to end: mirrored outputs, PNGs equal to
the tokenizer's reconstruction, ``--codes`` .npy back byte for byte, the printed rates,
and bad input (another prior, damaged files, an unknown version, images the tokenizer
cannot take): one line, exit code 2, no output at all."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("constriction")

from PIL import Image  # noqa: E402

from vqkit.cli import main  # noqa: E402
from vqkit.compress import codes_to_images, images_to_codes, load_codec  # noqa: E402
from vqkit.compress.format import pack, unpack  # noqa: E402

from .test_compress_codec import make_prior, make_tokenizer  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(prior dir, folder of 3 test PNGs in two subfolders, the images (3, 1, 28, 28))."""
    from vqkit.data import load_dataset

    root = tmp_path_factory.mktemp("compress_cli")
    tok = make_tokenizer(root / "tok")
    prior = make_prior(root / "prior", tok)
    images = load_dataset(None, "test").images[:3]
    for i, rel in enumerate(("a/x.png", "b/x.png", "b/y.png")):
        (root / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy()).save(root / "in" / rel)
    return prior, root / "in", images


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_images_compress_and_decompress(setup, tmp_path, capsys):
    prior, src, images = setup
    inputs = [str(src / r) for r in ("a/x.png", "b/x.png", "b/y.png")]
    code, out, _ = _run(capsys, "compress", *inputs, "--prior", str(prior), "--out",
                        str(tmp_path / "c"), "--class", "class3")  # fmt: skip
    assert code == 0
    files = [tmp_path / "c" / r for r in ("a/x.vqz", "b/x.vqz", "b/y.vqz")]
    assert all(f.is_file() for f in files)
    sizes = [f.stat().st_size for f in files]
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("total: 3 files")
    bits = 8 * sum(sizes)
    assert f"{bits / (3 * 28 * 28):.4f} bits/pixel" in lines[-1]
    assert f"{bits / (3 * 49):.3f} bits/code" in lines[-1]
    code, out, _ = _run(capsys, "decompress", *map(str, files), "--prior", str(prior),
                        "--out", str(tmp_path / "d"))  # fmt: skip
    assert code == 0 and "total: 3 files" in out
    codec = load_codec(prior)
    expect = codes_to_images(codec, images_to_codes(codec, images).numpy())
    for i, rel in enumerate(("a/x.png", "b/x.png", "b/y.png")):
        got = np.asarray(Image.open(tmp_path / "d" / rel))
        np.testing.assert_array_equal(got, expect[i, 0].numpy())


def test_codes_come_back_byte_for_byte(setup, tmp_path, capsys):
    """A map with its tokenizer's sidecar (as vqkit encode writes it) and a raw uint16
    array: back byte for byte, each with the tokenizer's identity beside it."""
    from vqkit.models.codes_io import model_identity, save_codes, sidecar_path

    prior, _, _ = setup
    identity = model_identity(load_codec(prior).tokenizer)
    g = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "one.npy", g.integers(0, 32, (7, 7)).astype(np.uint16))
    save_codes(tmp_path / "in" / "many.npy", g.integers(0, 32, (3, 7, 7)), identity)
    inputs = [str(tmp_path / "in" / n) for n in ("one.npy", "many.npy")]
    with pytest.warns(UserWarning, match="one.npy has no tokenizer identity"):
        code, out, _ = _run(capsys, "compress", *inputs, "--codes", "--prior", str(prior),
                            "--out", str(tmp_path / "c"))  # fmt: skip
    assert code == 0 and "total: 2 files" in out
    files = [str(tmp_path / "c" / n) for n in ("one.vqz", "many.vqz")]
    code, _, _ = _run(capsys, "decompress", *files, "--prior", str(prior), "--out",
                      str(tmp_path / "d"))  # fmt: skip
    assert code == 0
    for n in ("one.npy", "many.npy"):
        assert (tmp_path / "d" / n).read_bytes() == (tmp_path / "in" / n).read_bytes()
        meta = json.loads(sidecar_path(tmp_path / "d" / n).read_text())
        assert meta["tokenizer"] == identity["tokenizer"]
    # a map whose sidecar names another tokenizer: refused, or taken with --unchecked
    other = {**identity, "tokenizer": "0" * 64}
    save_codes(tmp_path / "in" / "other.npy", g.integers(0, 32, (7, 7)), other)
    base = [str(tmp_path / "in" / "other.npy"), "--codes", "--prior", str(prior)]
    err = _refused(capsys, tmp_path / "e", "compress", *base, "--out", str(tmp_path / "e"))
    assert "other.npy was written by another tokenizer" in err
    assert main(["compress", *base, "--out", str(tmp_path / "f"), "--unchecked"]) == 0


def _refused(capsys, out_dir, *argv: str) -> str:
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out_dir.exists() or not any(p.is_file() for p in out_dir.rglob("*"))
    return err


def test_existing_outputs_are_replaced_only_with_overwrite(setup, tmp_path, capsys):
    prior, src, _ = setup
    base = [str(src / "a" / "x.png"), "--prior", str(prior), "--out", str(tmp_path / "c")]
    assert main(["compress", *base]) == 0
    vqz = tmp_path / "c" / "x.vqz"
    first = vqz.read_bytes()
    vqz.write_bytes(b"a file of the user's")
    code, _, err = _run(capsys, "compress", *base)
    assert code == 2 and "x.vqz exists; pass --overwrite" in err and err.count("\n") == 1
    assert vqz.read_bytes() == b"a file of the user's"
    assert main(["compress", *base, "--overwrite"]) == 0 and vqz.read_bytes() == first
    dec = ["decompress", str(vqz), "--prior", str(prior), "--out", str(tmp_path / "d")]
    assert main(dec) == 0
    code, _, err = _run(capsys, *dec)
    assert code == 2 and "x.png exists; pass --overwrite" in err
    assert main([*dec, "--overwrite"]) == 0


def test_bad_files_are_refused_with_no_output(setup, tmp_path, capsys):
    prior, src, _ = setup
    good = tmp_path / "good.vqz"
    assert main(["compress", str(src / "a" / "x.png"), "--prior", str(prior), "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    (tmp_path / "x.vqz").rename(good)
    data = good.read_bytes()
    bad = {
        "trunc.vqz": data[:-3],
        "short.vqz": data[:20],
        "flip.vqz": data[:-1] + bytes([data[-1] ^ 0x10]),
        "v9.vqz": data[:4] + b"\x09" + data[5:],
        "png.vqz": (src / "a" / "x.png").read_bytes(),
    }
    msgs = {
        "trunc.vqz": "corrupt or truncated file",
        "short.vqz": "truncated",
        "flip.vqz": "corrupt or truncated file",
        "v9.vqz": "unknown format version 9",
        "png.vqz": "not a vqkit compressed file",
    }
    out = tmp_path / "d"
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
        # the bad file after a good one: the good one is not written either
        err = _refused(capsys, out, "decompress", str(good), str(tmp_path / name),
                       "--prior", str(prior), "--out", str(out))  # fmt: skip
        assert msgs[name] in err and name in err
    # another prior: both hashes named
    other = make_prior(tmp_path / "p2", prior.parent / "tok", seed=5)
    err = _refused(capsys, out, "decompress", str(good), "--prior", str(other), "--out", str(out))
    a, b = load_codec(prior, images=False), load_codec(other, images=False)
    assert a.exact_hash[:16] in err and b.exact_hash[:16] in err and a.tokenizer_hash[:16] in err


def test_images_the_tokenizer_cannot_take(setup, tmp_path, capsys):
    prior, src, _ = setup
    big = tmp_path / "big.png"
    Image.new("L", (32, 32)).save(big)
    colour = tmp_path / "colour.png"
    Image.new("RGB", (28, 28), (200, 10, 10)).save(colour)
    gray_rgb = tmp_path / "gray_rgb.png"
    Image.new("RGB", (28, 28), (90, 90, 90)).save(gray_rgb)
    text = tmp_path / "text.png"
    text.write_text("not an image")
    out = tmp_path / "c"
    base = ["--prior", str(prior), "--out", str(out)]
    for path, msg in (
        (big, "big.png is 32x32 pixels; this tokenizer takes 28x28 images"),
        (colour, "colour.png is a colour image; this tokenizer takes gray"),
        (text, "cannot read image"),
        (tmp_path / "missing.png", "missing.png"),
    ):
        err = _refused(capsys, out, "compress", str(src / "a" / "x.png"), str(path), *base)
        assert msg in err
    err = _refused(capsys, out, "compress", str(src / "a" / "x.png"), "--class", "12", *base)
    assert "class id 12 out of range" in err
    np.save(tmp_path / "bad.npy", np.full((7, 7), 40))
    err = _refused(capsys, out, "compress", str(tmp_path / "bad.npy"), "--codes", *base)
    assert "bad.npy: indices 40..40 outside [0, 32)" in err
    # a gray picture stored as RGB is taken as gray
    assert main(["compress", str(gray_rgb), *base]) == 0
    assert (out / "gray_rgb.vqz").is_file()


_DECOMPRESS_UNDER_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # 3 GiB, torch included
from vqkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _decompress_under_limit(vqz: Path, prior: Path, out: Path) -> subprocess.CompletedProcess:
    """``vqkit decompress VQZ`` in a fresh process capped at 3 GiB of address space."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    argv = ["decompress", str(vqz), "--prior", str(prior), "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-c", _DECOMPRESS_UNDER_LIMIT, *argv],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.timeout(600)
def test_crafted_map_counts_end_in_one_line_under_an_address_space_limit(setup, tmp_path):
    """Files with a valid CRC whose header is this prior's but claims 100,000 or
    1,000,000 maps (their labels present: 200 KB and 2 MB, within the format's bound,
    the payload of one map) or none, through the real ``vqkit decompress`` in a fresh
    process capped at 3 GiB of address space (where the file they were made from
    decodes): exit code 2, one line, no traceback, nothing written. Memory must follow
    the payload present, not the map count a header claims."""
    pytest.importorskip("resource")
    prior, src, _ = setup
    assert main(["compress", str(src / "a" / "x.png"), "--prior", str(prior), "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    good = tmp_path / "x.vqz"
    run = _decompress_under_limit(good, prior, tmp_path / "out_good")
    assert run.returncode == 0 and (tmp_path / "out_good" / "x.png").is_file(), run.stderr
    header, payload = unpack(good.read_bytes())
    # zero maps: pack refuses to write it, so it is laid out here field by field
    head = b"".join([
        b"VQKZ", bytes([2, 0, 0, 1]), bytes.fromhex(header.tokenizer_hash + header.prior_hash),
        struct.pack("<B2H", 2, *header.code_shape), struct.pack("<II", header.num_symbols, 0),
        header.checksum,
    ])  # fmt: skip
    crafted = {
        "none.vqz": head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload,
        "many.vqz": pack(replace(header, labels=(header.labels[0],) * 100_000), payload),
        "million.vqz": pack(replace(header, labels=(header.labels[0],) * 1_000_000), payload),
    }
    for name, data in crafted.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out_{name}"
        run = _decompress_under_limit(tmp_path / name, prior, out)
        assert run.returncode == 2, (name, run.returncode, run.stderr[-2000:])
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
        assert name in run.stderr
        assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
        if name == "none.vqz":
            assert "0 code maps" in run.stderr


def test_next_scale_files_and_scales_previews(setup, tmp_path, capsys):
    """A multi-scale tokenizer with a next-scale prior: compress writes model-2 files;
    decompress gives the full reconstruction, and --scales N the reconstruction from the
    first N scales (VQVAE.decode(codes, num_scales=N)); --scales is refused in one line
    for a one-map tokenizer's files, N out of range and --codes files, writing nothing."""
    import torch

    from vqkit.data import denormalize

    _, src, images = setup
    tok = make_tokenizer(tmp_path / "tok", quantizer="multiscale", scales="1,2,4,7")
    prior = make_prior(tmp_path / "prior", tok, kind="next-scale")
    inputs = [str(src / r) for r in ("a/x.png", "b/y.png")]
    assert main(["compress", *inputs, "--prior", str(prior), "--out", str(tmp_path / "c"),
                 "--class", "2"]) == 0  # fmt: skip
    files = [str(tmp_path / "c" / r) for r in ("a/x.vqz", "b/y.vqz")]
    assert all(unpack(Path(f).read_bytes())[0].model == 2 for f in files)
    codec = load_codec(prior)
    codes = images_to_codes(codec, images[[0, 2]])
    for n in (None, 1, 3):
        out = tmp_path / f"d{n}"
        flags = [] if n is None else ["--scales", str(n)]
        code, _, err = _run(capsys, "decompress", *files, "--prior", str(prior), "--out",
                            str(out), *flags)  # fmt: skip
        assert code == 0, err
        with torch.no_grad():
            want = denormalize(codec.tokenizer.decode(codes, num_scales=n))
        for i, rel in enumerate(("a/x.png", "b/y.png")):
            np.testing.assert_array_equal(np.asarray(Image.open(out / rel)), want[i, 0].numpy())
    capsys.readouterr()
    out = tmp_path / "bad"
    err = _refused(capsys, out, "decompress", *files, "--prior", str(prior), "--out", str(out),
                   "--scales", "5")  # fmt: skip
    assert "an int in [1, 4] (the scales 1,2,4,7); got 5" in err
    # a one-map tokenizer's file
    single_tok = make_tokenizer(tmp_path / "tok1")
    single = make_prior(tmp_path / "p1", single_tok)
    assert main(["compress", inputs[0], "--prior", str(single), "--out", str(tmp_path / "s")]) == 0
    err = _refused(capsys, out, "decompress", str(tmp_path / "s" / "x.vqz"), "--prior",
                   str(single), "--out", str(out), "--scales", "2")  # fmt: skip
    assert (
        "needs the codes of a multi-scale tokenizer; this prior's codes (7, 7) are one map" in err
    )
    # index maps decompress in full
    np.save(tmp_path / "m.npy", codes.numpy())
    with pytest.warns(UserWarning, match="no tokenizer identity"):
        assert main(["compress", str(tmp_path / "m.npy"), "--codes", "--prior", str(prior),
                     "--out", str(tmp_path / "k")]) == 0  # fmt: skip
    capsys.readouterr()
    err = _refused(capsys, out, "decompress", str(tmp_path / "k" / "m.vqz"), "--prior",
                   str(prior), "--out", str(out), "--scales", "2")  # fmt: skip
    assert "holds index maps (compress --codes)" in err
