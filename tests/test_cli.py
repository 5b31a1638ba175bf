"""Tests of vqkit's cli module."""

import json

import numpy as np
import pytest
import torch

from vqkit.cli import main
from vqkit.models import load_model
from vqkit.storage.checkpoint import CheckpointError, load_checkpoint
from vqkit.training.tokenizer import TrainConfig, Trainer

SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)

SMALL_FLAGS = [
    "--hidden",
    "32",
    "--res-hidden",
    "8",
    "--res-layers",
    "1",
    "--num-embeddings",
    "32",
    "--embedding-dim",
    "8",
]


def _run(tmp_path, name, steps, *extra):
    out = tmp_path / name
    args = [
        "train",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "--log-every",
        "5",
        "--eval-every",
        "10",
        "--eval-images",
        "64",
        "--no-progress",
        "--seed",
        "3",
        *SMALL_FLAGS,
        *extra,
    ]
    assert main(args) == 0
    return out


def test_cli_train_writes_every_artifact(tmp_path, capsys):
    out = _run(tmp_path, "run", 20)
    for name in (
        "config.json",
        "metrics.jsonl",
        "eval.json",
        "model.safetensors",
        "recon.png",
        "curves.png",
        "usage.png",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["steps"] == 20 and cfg["model"]["in_channels"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for key in ("loss", "recon_nmse", "perplexity", "usage", "window_usage", "images_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20]
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 20 and 0 < result["nmse"] < 10 and result["psnr"] > 0
    from PIL import Image

    with Image.open(out / "recon.png") as im:
        assert im.width > 16 * 28 and im.height > 2 * 28
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 20
    # refuses to clobber an existing run without --resume/--overwrite
    assert main(["train", "--out", str(out), "--steps", "1", "--no-progress", *SMALL_FLAGS]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_eval_encode_decode_round_trip(tmp_path, capsys):
    out = _run(tmp_path, "run", 10, "--quantizer", "vq")
    ckpt = out / "checkpoints" / "last.pt"
    ev = tmp_path / "ev"
    assert main(["eval", str(ckpt), "--out", str(ev)]) == 0
    result = json.loads((ev / "eval.json").read_text())
    assert result["num_images"] == 1000 and 0 <= result["usage"] <= 1
    assert (ev / "recon.png").is_file()
    # a second evaluation into the same folder replaces nothing unless told to
    assert main(["eval", str(ckpt), "--out", str(ev), "--limit", "8"]) == 2
    assert "eval.json exists" in capsys.readouterr().err
    assert json.loads((ev / "eval.json").read_text())["num_images"] == 1000
    assert main(["eval", str(ckpt), "--out", str(ev), "--limit", "8", "--overwrite"]) == 0
    assert json.loads((ev / "eval.json").read_text())["num_images"] == 8

    # a test image through encode -> .npy -> decode -> PNG
    from vqkit.data import load_dataset
    from vqkit.evaluation.plots import save_images

    data = load_dataset(None, "test")
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from vqkit.data import normalize

    save_images(normalize(data.images[:2]), [img_dir / "a.png", img_dir / "b.png"])
    codes = tmp_path / "codes"
    assert (
        main(
            [
                "encode",
                str(ckpt),
                str(img_dir / "a.png"),
                str(img_dir / "b.png"),
                "--out",
                str(codes),
            ]
        )
        == 0
    )
    idx = np.load(codes / "a.npy")
    assert idx.shape == (7, 7) and idx.dtype == np.int64
    # the run directory names its model (model.safetensors, the final weights)
    assert main(["encode", str(out), str(img_dir / "a.png"), "--out", str(tmp_path / "c2")]) == 0
    final = load_model(out / "model.safetensors").encode(normalize(data.images[:1]))[0].numpy()
    assert np.array_equal(np.load(tmp_path / "c2" / "a.npy"), final)
    model = load_model(ckpt)
    expected = model.encode(normalize(data.images[:1]))[0].numpy()
    assert np.array_equal(idx, expected)
    dec = tmp_path / "dec"
    assert main(["decode", str(ckpt), str(codes / "a.npy"), "--out", str(dec)]) == 0
    from PIL import Image

    with Image.open(dec / "a.png") as im:
        assert im.size == (28, 28)
        got = np.asarray(im)
    want = model.decode(torch.from_numpy(idx)[None])
    want = ((want + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0, 0].numpy()
    assert np.array_equal(got, want)
    # the safetensors export loads to the same model
    exported = load_model(out / "model.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, exported.state_dict()[k])


def test_bad_checkpoints_are_clear_errors(tmp_path, capsys):
    out = _run(tmp_path, "run", 5)
    good = (out / "checkpoints" / "last.pt").read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(trunc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_model(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a vqkit checkpoint"):
        load_model(other)
    # weights that do not fit the stored config
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    ckpt["model_config"]["hidden"] = 64
    from vqkit.storage.checkpoint import save_checkpoint

    bad = tmp_path / "mismatch.pt"
    save_checkpoint(bad, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(bad)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(st)
    # the CLI turns them into one clear line and exit code 2
    assert main(["eval", str(trunc), "--out", str(tmp_path / "e")]) == 2
    assert "trunc.pt" in capsys.readouterr().err
    # resuming a run with a different model fails clearly, naming what changed
    with pytest.raises(ValueError, match=r"cannot change .*hidden \(32 -> 64\)"):
        Trainer(
            TrainConfig(out_dir=str(out), steps=10, progress=False, **{**SMALL, "hidden": 64}),
            resume=True,
        )


# -- issue 21: index maps carry the tokenizer's identity; resume rules --------------------


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two 1-step runs of the same shape (K = 8) but other seeds: other weights."""
    from .test_faults import _train

    root = tmp_path_factory.mktemp("two")
    for seed in ("1", "2"):
        assert _train(root / seed, "--steps", "1", "--seed", seed) == 0
    return root / "1", root / "2"


def test_index_maps_carry_the_tokenizer_identity(two_tokenizers, tmp_path, capsys):
    from PIL import Image

    from vqkit.models.codes_io import model_identity, sidecar_path

    a, b = (str(r / "model.safetensors") for r in two_tokenizers)
    Image.new("L", (28, 28), 90).save(tmp_path / "img.png")
    codes = tmp_path / "codes"
    assert main(["encode", a, str(tmp_path / "img.png"), "--out", str(codes)]) == 0
    before = (codes / "img.npy").read_bytes()
    assert main(["encode", b, str(tmp_path / "img.png"), "--out", str(codes)]) == 2
    assert "img.npy exists; pass --overwrite" in capsys.readouterr().err
    assert (codes / "img.npy").read_bytes() == before  # untouched
    meta = json.loads(sidecar_path(codes / "img.npy").read_text())
    # the identity of the weights, the same from the .pt checkpoint and the export
    pt = two_tokenizers[0] / "checkpoints" / "last.pt"
    assert meta["tokenizer"] == model_identity(load_model(a))["tokenizer"]
    assert meta["tokenizer"] == model_identity(load_model(pt))["tokenizer"]
    assert meta["num_codes"] == 8 and meta["codes_per_position"] == 1 and meta["grid"] == [7, 7]
    capsys.readouterr()
    dec = str(tmp_path / "dec")
    assert main(["decode", b, str(codes / "img.npy"), "--out", dec]) == 2  # same K, other run
    err = capsys.readouterr().err
    assert "written by another tokenizer" in err and "--unchecked" in err and err.count("\n") == 1
    assert main(["decode", str(pt), str(codes / "img.npy"), "--out", dec]) == 0
    capsys.readouterr()
    # the PNG exists now: replaced only when asked
    assert main(["decode", b, str(codes / "img.npy"), "--out", dec, "--unchecked"]) == 2
    err = capsys.readouterr().err
    assert "img.png exists; pass --overwrite" in err and err.count("\n") == 1
    args = ["decode", b, str(codes / "img.npy"), "--out", dec, "--unchecked", "--overwrite"]
    assert main(args) == 0


def test_decode_refuses_maps_of_another_layout(two_tokenizers, tmp_path, capsys):
    """An (8, 8, 2) map of a two-codes-per-position model given to a one-code model is
    not 8 maps of 8 x 2: refused, as are out-of-range indices; a plain .npy of the
    model's shape (written before the sidecar existed) decodes with a warning."""
    model = str(two_tokenizers[0] / "model.safetensors")
    dec = str(tmp_path / "dec")
    np.save(tmp_path / "grouped.npy", np.zeros((7, 7, 2), dtype=np.int64))
    assert main(["decode", model, str(tmp_path / "grouped.npy"), "--out", dec]) == 2
    err = capsys.readouterr().err
    assert "(7, 7, 2) is not an index map of this model" in err and err.count("\n") == 1
    np.save(tmp_path / "big.npy", np.full((7, 7), 8, dtype=np.int64))
    assert main(["decode", model, str(tmp_path / "big.npy"), "--out", dec]) == 2
    assert "outside [0, 8)" in capsys.readouterr().err
    np.save(tmp_path / "old.npy", np.ones((2, 7, 7), dtype=np.int64))
    with pytest.warns(UserWarning, match="no tokenizer identity"):
        assert main(["decode", model, str(tmp_path / "old.npy"), "--out", dec]) == 0
    assert (tmp_path / "dec" / "old_1.png").is_file()


def test_resume_refuses_steps_below_the_checkpoint_and_a_preset(two_tokenizers, capsys):
    """--resume --steps N below the checkpoint's step trained nothing but recorded N;
    --preset with --resume was recorded but not applied: both refused, nothing written."""
    from .test_faults import TINY_FLAGS

    run = two_tokenizers[0]
    before = (run / "config.json").read_text()
    capsys.readouterr()
    for extra, want in (
        (["--steps", "0"], "--steps 0 is below the step 1"),
        (["--steps", "3", "--preset", "classic"], "--preset classic with --resume"),
    ):
        argv = ["train", "--out", str(run), "--resume", *TINY_FLAGS, *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err
    assert (run / "config.json").read_text() == before


def test_user_errors_are_one_line_and_bugs_get_a_traceback(tmp_path, capsys, monkeypatch):
    # the project's own user errors: one line, exit 2
    assert (
        main(["train", "--out", str(tmp_path / "r"), "--quantizer", "fsq", "--decay", "0.9"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqkit train: error: decay does not apply") and "\n" not in err
    # a quantizer constructor's check of a configured value is a user error too
    args = ["train", "--out", str(tmp_path / "g"), "--quantizer", "gvq", "--groups", "3"]
    assert main([*args, "--steps", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: groups must be a positive int dividing" in err and "Traceback" not in err

    # anything else is a bug in vqkit: the traceback and a line that says so, exit 1
    def broken(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    import vqkit.cli as cli_mod

    monkeypatch.setattr(cli_mod, "_eval", broken)
    assert main(["eval", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: unsupported operand" in err
    assert "this is a bug in vqkit" in err.splitlines()[-1]


def test_report_error_classifies_by_type(capsys):
    from vqkit.errors import UserError, report_error
    from vqkit.storage.checkpoint import CheckpointError as CkptError

    for e in (
        UserError("bad"),
        CkptError("bad"),
        FileNotFoundError("bad"),
        FloatingPointError("x"),
    ):
        assert report_error("eval", e) == 2
        assert "\n" not in capsys.readouterr().err.strip()
    for e in (ValueError("internal"), TypeError("internal"), KeyError("internal")):
        assert report_error("eval", e) == 1
        assert "this is a bug in vqkit" in capsys.readouterr().err


# -- issue 36: eval reads the data the model records --------------------------------------


def test_eval_uses_the_data_the_model_records(tmp_path, capsys):
    from .test_export import make_folder
    from .test_prior_codes import make_tokenizer

    data = make_folder(tmp_path / "images", n=12)
    tok = make_tokenizer(tmp_path / "tok", "--data", str(data), "--batch-size", "4",
                         "--steps", "1", "--eval-every", "1", "--log-every", "1")  # fmt: skip
    want = {"source": str(data.resolve()), "format": "auto", "split": "holdout",
            "image_size": 28, "channels": 1, "num_images": 1}  # fmt: skip
    for weights in ("model.safetensors", "checkpoints/best.pt"):
        ev = tmp_path / f"ev-{weights.replace('/', '-')}"
        assert main(["eval", str(tok / weights), "--out", str(ev)]) == 0
        result = json.loads((ev / "eval.json").read_text())
        assert result["num_images"] == 1 and result["data"] == want, result["data"]
    # the run's own eval.json names its data too
    assert json.loads((tok / "eval.json").read_text())["data"]["source"] == str(data.resolve())
    # --data names other data: eval.json says so
    ev = tmp_path / "builtin"
    assert main(["eval", str(tok / "model.safetensors"), "--data", "builtin", "--out",
                 str(ev)]) == 0  # fmt: skip
    result = json.loads((ev / "eval.json").read_text())
    assert result["data"]["source"] == "builtin" and result["data"]["split"] == "test"
    assert result["num_images"] == 1000
    # without a data record, or with data that is gone: one line, nothing written
    from vqkit.models import export_safetensors

    bare = tmp_path / "bare.safetensors"
    export_safetensors(load_model(tok / "model.safetensors"), bare)
    capsys.readouterr()
    assert main(["eval", str(bare), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "records no training data" in err and "--data" in err and err.count("\n") == 1
    data.rename(tmp_path / "gone")
    assert main(["eval", str(tok / "model.safetensors"), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and str(data.resolve()) in err and err.count("\n") == 1
    assert not (tmp_path / "no").exists()
    # --out the run itself would replace the run's own eval.json
    (tmp_path / "gone").rename(data)
    record = (tok / "eval.json").read_bytes()
    assert main(["eval", str(tok / "model.safetensors"), "--out", str(tok)]) == 2
    assert "the run's own" in capsys.readouterr().err
    assert (tok / "eval.json").read_bytes() == record


def test_multiscale_codes_round_trip_through_encode_and_decode(tmp_path, capsys):
    """A multi-scale tokenizer's maps are (L,) sequences (every scale coarse to fine):
    encode writes them with index_shape [L] in the sidecar, decode reads them back; a
    grid-shaped map is refused in one line naming the expected (L,)."""
    from PIL import Image

    from vqkit.models.codes_io import sidecar_path

    out = _run(tmp_path, "ms", 2, "--quantizer", "multiscale", "--scales", "1,2,4,7")
    model = str(out / "model.safetensors")
    Image.new("L", (28, 28), 90).save(tmp_path / "img.png")
    codes = tmp_path / "codes"
    assert main(["encode", model, str(tmp_path / "img.png"), "--out", str(codes)]) == 0
    idx = np.load(codes / "img.npy")
    assert idx.shape == (1 + 4 + 16 + 49,)
    meta = json.loads(sidecar_path(codes / "img.npy").read_text())
    assert meta["index_shape"] == [70] and meta["grid"] == [7, 7]
    dec = tmp_path / "dec"
    assert main(["decode", model, str(codes / "img.npy"), "--out", str(dec)]) == 0
    assert (dec / "img.png").is_file()
    capsys.readouterr()
    np.save(tmp_path / "grid.npy", np.zeros((7, 7), dtype=np.int64))
    assert main(["decode", model, str(tmp_path / "grid.npy"), "--out", str(dec)]) == 2
    err = capsys.readouterr().err
    assert "(L) or (B, L)" in err and err.count("\n") == 1


def test_multiscale_bits_per_pixel_count_every_scale(tmp_path):
    """eval.json's bits per pixel of a multi-scale tokenizer: all L = 1 + 4 + 16 + 49
    codes of an image (K = 32: 5 bits each) over its 28 x 28 pixels."""
    out = _run(tmp_path, "msb", 1, "--quantizer", "multiscale", "--scales", "1,2,4,7")
    result = json.loads((out / "eval.json").read_text())
    assert result["bits_per_pixel"] == pytest.approx(70 * 5 / (28 * 28))


def test_multiscale_progressive_decode_and_eval_pictures(tmp_path, capsys):
    """``vqkit decode --scales N`` equals decoding the first N scales' codes; a bad N,
    and --scales on a single-scale tokenizer, are one line and write nothing. ``vqkit
    eval`` of a multi-scale tokenizer writes per-scale figures and progressive.png (8
    rows: the original, then 1 .. 4 scales), and says so; a vq tokenizer's neither."""
    from PIL import Image

    out = _run(tmp_path, "ms", 2, "--quantizer", "multiscale", "--scales", "1,2,4,7")
    model_path = str(out / "model.safetensors")
    model = load_model(out / "model.safetensors")
    Image.new("L", (28, 28), 90).save(tmp_path / "img.png")
    codes = tmp_path / "codes"
    assert main(["encode", model_path, str(tmp_path / "img.png"), "--out", str(codes)]) == 0
    idx = torch.from_numpy(np.load(codes / "img.npy"))[None]
    for n in (1, 2, 4):
        dec = tmp_path / f"dec{n}"
        args = ["decode", model_path, str(codes / "img.npy"), "--out", str(dec)]
        assert main([*args, "--scales", str(n)]) == 0
        with Image.open(dec / "img.png") as im:
            got = np.asarray(im)
        prefix = idx[:, : sum(s * s for s in (1, 2, 4, 7)[:n])]
        want = model.decoder(model.quantizer.decode(prefix))
        assert torch.equal(want, model.decode(idx, num_scales=n))
        want = ((want + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0, 0].numpy()
        assert np.array_equal(got, want)
    capsys.readouterr()
    for bad in ("0", "5"):
        dec = tmp_path / f"bad{bad}"
        args = ["decode", model_path, str(codes / "img.npy"), "--out", str(dec), "--scales", bad]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "in [1, 4]" in err and err.count("\n") == 1 and not dec.exists()
    ev = tmp_path / "ev"
    assert main(["eval", model_path, "--out", str(ev), "--limit", "64"]) == 0
    printed = capsys.readouterr().out
    assert str(ev / "progressive.png") in printed
    result = json.loads((ev / "eval.json").read_text())
    assert list(result["code_groups"]) == ["1x1", "2x2", "4x4", "7x7"]
    assert all(g["codes_used"] + g["dead"] == 32 for g in result["code_groups"].values())
    with Image.open(ev / "progressive.png") as im:  # 8 rows x 5 columns of 28 px, pad 2, x2
        assert im.size == ((5 * 30 + 2) * 2, (8 * 30 + 2) * 2)

    vq = _run(tmp_path, "vq", 2, "--quantizer", "vq")
    vq_path = str(vq / "model.safetensors")
    assert main(["encode", vq_path, str(tmp_path / "img.png"), "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    args = ["decode", vq_path, str(tmp_path / "c" / "img.npy"), "--out", str(tmp_path / "d")]
    assert main([*args, "--scales", "1"]) == 2
    err = capsys.readouterr().err
    assert "multi-scale tokenizer" in err and err.count("\n") == 1
    assert main(["eval", vq_path, "--out", str(tmp_path / "vqev"), "--limit", "64"]) == 0
    assert "code_groups" not in json.loads((tmp_path / "vqev" / "eval.json").read_text())
    assert not (tmp_path / "vqev" / "progressive.png").exists()
