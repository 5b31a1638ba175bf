"""Editing with a masked prior (prior/editing.py) and the masked kind end to end through
``vqkit prior --kind masked`` / ``vqkit sample``: regions to code positions, sampling,
edits that keep the codes outside the region, bad input (one line, exit code 2), and a
2-process torchrun run resumed in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.errors import UserError
from vqkit.prior.cli import main
from vqkit.prior.editing import parse_region, region_mask
from vqkit.storage.checkpoint import load_checkpoint

from .test_prior_cli import PRIOR_FLAGS
from .test_prior_codes import make_tokenizer

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


def test_regions_to_code_positions():
    # 28 x 28 pixels over 7 x 7 codes: position (i, j) holds pixels [4i, 4i + 4) x [4j, 4j + 4)
    m = region_mask([(0, 0, 4, 4)], (28, 28), (7, 7))
    assert m.sum() == 1 and m[0, 0]
    m = region_mask([(3, 0, 5, 4)], (28, 28), (7, 7))  # x 3..4: columns 0 and 1, row 0
    assert m.nonzero().tolist() == [[0, 0], [0, 1]]
    m = region_mask([(0, 0, 8, 8), (24, 20, 28, 28)], (28, 28), (7, 7))
    want = torch.zeros(7, 7, dtype=torch.bool)
    want[:2, :2] = True
    want[5:, 6] = True
    assert torch.equal(m, want)
    assert torch.equal(region_mask([(0, 0, 8, 8), (24, 20, 28, 28)], (28, 28), (7, 7), True), ~want)
    r = region_mask([(4, 8, 9, 12)], (28, 28), (7, 7, 3))  # residual: every stage
    assert r.shape == (7, 7, 3) and r.sum() == 2 * 3 and r[2, 1].all() and r[2, 2].all()
    # a non-integer ratio: 32 px over 5 codes, position j spans [6.4 j, 6.4 (j + 1))
    assert region_mask([(6, 0, 7, 1)], (32, 32), (5, 5)).nonzero().tolist() == [[0, 0], [0, 1]]
    with pytest.raises(UserError, match="multi-scale tokenizer's \\(70\\) sequence"):
        region_mask([(0, 0, 4, 4)], (28, 28), (70,))  # no one grid to place a box on
    assert parse_region("1,2,3,4") == (1, 2, 3, 4)
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,4,5"):
        with pytest.raises(ValueError, match="x0,y0,x1,y1"):
            parse_region(bad)
    for box in ((0, 0, 29, 4), (4, 0, 4, 8), (-1, 0, 3, 3)):
        with pytest.raises(ValueError, match="not a box inside the 28 x 28 image"):
            region_mask([box], (28, 28), (7, 7))
    with pytest.raises(ValueError, match="no code position"):
        region_mask([(0, 0, 28, 28)], (28, 28), (7, 7), outside=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread_module):
    """A tokenizer, a 4-step masked prior and a 2-step autoregressive one, and a picture."""
    root = tmp_path_factory.mktemp("masked_cli")
    tok = make_tokenizer(root / "tok")
    masked, ar = root / "masked", root / "ar"
    kind = ["--kind", "masked", "--mask-schedule", "arccos"]
    assert main(["prior", "--tokenizer", str(tok), "--out", str(masked), "--steps", "4",
                 *kind, *PRIOR_FLAGS]) == 0  # fmt: skip
    assert main(["prior", "--tokenizer", str(tok), "--out", str(ar), "--steps", "2",
                 *PRIOR_FLAGS]) == 0  # fmt: skip
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "image.png")
    yield tok, masked, ar, root / "image.png"


def _sample(prior: Path, out: Path, *flags: str) -> int:
    return main(["sample", str(prior), "--out", str(out), *flags])


@pytest.mark.timeout(120)
def test_masked_prior_run_sampling_and_resume(runs, tmp_path):
    tok, masked, _, _ = runs
    cfg = json.loads((masked / "config.json").read_text())
    assert cfg["prior"]["kind"] == "masked" and cfg["prior"]["mask_schedule"] == "arccos"
    evals = [json.loads(x) for x in (masked / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 4]
    assert 0 < evals[-1]["test_masked_bits_50"] < 10 and "test_bits" not in evals[-1]
    assert (masked / "samples.png").is_file() and (masked / "curves.png").is_file()
    flags = ["--num", "4", "--seed", "2", "--class", "1", "--cfg-scale", "2", "--decode-steps", "5",
             "--schedule", "linear", "--top-k", "10"]  # fmt: skip
    assert _sample(masked, tmp_path / "a", *flags) == 0
    assert _sample(masked, tmp_path / "b", *flags) == 0
    a = np.stack([np.load(tmp_path / "a" / f"sample_{i:04d}.npy") for i in range(4)])
    b = np.stack([np.load(tmp_path / "b" / f"sample_{i:04d}.npy") for i in range(4)])
    assert a.shape == (4, 7, 7) and np.array_equal(a, b) and a.max() < 32
    assert _sample(masked, tmp_path / "c", "--num", "2") == 0  # defaults: 10 passes, cosine
    assert main(["prior", "--out", str(masked), "--resume", "--steps", "5", "--no-progress"]) == 0
    ckpt = load_checkpoint(masked / "checkpoints" / "last.pt")
    assert ckpt["step"] == 5 and ckpt["model_config"]["kind"] == "masked"


@pytest.mark.timeout(120)
def test_a_masked_sample_is_drawn_again_from_its_samples_json(runs, tmp_path):
    """samples.json records everything a masked sample was drawn with (the decoding
    options too): the library, given only that record, draws the same index maps."""
    from vqkit.prior import MaskedSampleOptions, SampleOptions, load_prior

    _, masked, _, _ = runs
    out = tmp_path / "s"
    flags = ["--num", "5", "--batch-size", "2", "--seed", "11", "--class", "3",
             "--cfg-scale", "1.5", "--temperature", "0.9", "--top-k", "12", "--decode-steps",
             "3", "--schedule", "linear", "--choice-temperature", "2.5"]  # fmt: skip
    assert _sample(masked, out, *flags) == 0
    meta = json.loads((out / "samples.json").read_text())
    assert meta["kind"] == "masked" and meta["masked_options"] == {
        "decode_steps": 3,
        "schedule": "linear",
        "choice_temperature": 2.5,
    }
    stored = np.stack([np.load(out / f"sample_{i:04d}.npy") for i in range(5)])

    def again(meta: dict) -> np.ndarray:
        model, _ = load_prior(meta["prior"], meta["checkpoint"], meta["device"])
        return model.sample(
            meta["num"],
            SampleOptions.from_dict(meta["options"]),
            masked=MaskedSampleOptions.from_dict(meta["masked_options"]),
            labels=torch.tensor(meta["labels"]),
            generator=torch.Generator(meta["device"]).manual_seed(meta["seed"]),
            batch_size=meta["batch_size"],
        ).numpy()

    assert np.array_equal(again(meta), stored)
    # the record is what made them: other decoding options draw other maps
    other = {**meta, "masked_options": {**meta["masked_options"], "schedule": "cosine"}}
    assert not np.array_equal(again(other), stored)
    # the default passes are recorded as the number run (10 of the 49 codes)
    assert _sample(masked, tmp_path / "d", "--num", "2") == 0
    meta = json.loads((tmp_path / "d" / "samples.json").read_text())
    assert meta["masked_options"]["decode_steps"] == 10
    stored = np.stack([np.load(tmp_path / "d" / f"sample_{i:04d}.npy") for i in range(2)])
    assert np.array_equal(again(meta), stored)


@pytest.mark.timeout(120)
def test_sample_reads_the_old_steps_flag_with_a_note(runs, tmp_path, capsys):
    """``vqkit sample --steps`` was --decode-steps (vqkit prior --steps is optimizer
    steps): still read, the same samples, with a one-line note."""
    _, masked, ar, _ = runs
    note = "note: vqkit sample --steps is now --decode-steps\n"
    assert _sample(masked, tmp_path / "old", "--num", "2", "--steps", "4") == 0
    assert capsys.readouterr().err == note
    assert _sample(masked, tmp_path / "new", "--num", "2", "--decode-steps", "4") == 0
    assert capsys.readouterr().err == ""
    old, new = (
        [np.load(tmp_path / d / f"sample_{i:04d}.npy") for i in range(2)] for d in ("old", "new")
    )
    assert all(np.array_equal(a, b) for a, b in zip(old, new, strict=True))
    meta = json.loads((tmp_path / "old" / "samples.json").read_text())
    assert meta["masked_options"]["decode_steps"] == 4
    assert _sample(masked, tmp_path / "x", "--steps", "4", "--decode-steps", "5") == 2
    err = capsys.readouterr().err
    assert err.startswith(note) and "give --decode-steps only" in err and err.count("\n") == 2
    assert _sample(ar, tmp_path / "y", "--steps", "8") == 2
    err = capsys.readouterr().err
    assert err.startswith(note) and "--steps: a masked prior's flag" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.timeout(120)
def test_edit_keeps_the_codes_outside_the_region(runs, tmp_path):
    tok, masked, _, image = runs
    from vqkit.data import normalize, read_image
    from vqkit.prior.codes import load_tokenizer

    model = load_tokenizer(tok).model
    codes = model.encode(normalize(read_image(image, 1, 28)[None]))[0].numpy()
    out = tmp_path / "e"
    assert _sample(masked, out, "--edit", str(image), "--region", "0,0,14,14", "--region",
                   "20,20,28,28", "--num", "3", "--class", "2",
                   "--decode-steps", "4") == 0  # fmt: skip
    for name in ("original.png", "reconstruction.png", "edit_0002.png", "grid.png", "edit.json"):
        assert (out / name).is_file(), name
    region = region_mask([(0, 0, 14, 14), (20, 20, 28, 28)], (28, 28), (7, 7)).numpy()
    edits = np.stack([np.load(out / f"edit_{i:04d}.npy") for i in range(3)])
    assert (edits[:, ~region] == codes[~region]).all()
    assert (edits[:, region] != codes[region]).any()  # the region was redrawn
    meta = json.loads((out / "edit.json").read_text())
    assert meta["codes_regenerated"] == int(region.sum()) and meta["labels"] == [2, 2, 2]
    assert meta["masked_options"]["decode_steps"] == 4
    out2 = tmp_path / "o"  # outpainting: the region is what stays
    assert _sample(masked, out2, "--edit", str(image), "--region", "8,8,20,20",
                   "--outside", "--num", "1") == 0  # fmt: skip
    keep = region_mask([(8, 8, 20, 20)], (28, 28), (7, 7)).numpy()
    assert (np.load(out2 / "edit_0000.npy")[keep] == codes[keep]).all()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "which,flags,msg",
    [
        ("masked", ["--decode-steps", "0"], "decode_steps must be a positive int"),
        ("masked", ["--decode-steps", "50"], "--decode-steps 50 is more than the 49 codes"),
        ("masked", ["--schedule", "zigzag"], "schedule must be one of cosine, arccos, linear"),
        ("masked", ["--choice-temperature", "-1"], "choice_temperature must be >= 0"),
        ("masked", ["--region", "0,0,4,4"], "--region and --outside go with --edit"),
        ("masked", ["--edit", "IMAGE", "--region", "0,0,40,4"], "not a box inside the 28 x 28"),
        ("masked", ["--edit", "IMAGE", "--region", "0,0,4"], "--region must be x0,y0,x1,y1"),
        ("masked", ["--edit", "IMAGE"], "--edit needs at least one --region"),
        (
            "masked",
            ["--edit", "IMAGE", "--region", "0,0,8,8", "--decode-steps", "5"],
            "more than the 4",
        ),
        (
            "ar",
            ["--decode-steps", "8"],
            "--decode-steps: a masked prior's flag; this prior is autoregressive",
        ),
        ("ar", ["--edit", "IMAGE", "--region", "0,0,4,4"], "--edit, --region: a masked prior's"),
    ],
)
def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys, which, flags, msg):
    _, masked, ar, image = runs
    flags = [str(image) if f == "IMAGE" else f for f in flags]
    assert _sample(masked if which == "masked" else ar, tmp_path / "x", *flags) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_compress_refuses_a_masked_prior(runs, tmp_path, capsys):
    from vqkit.cli import main as vqkit_main

    _, masked, _, image = runs
    out = tmp_path / "z"
    assert vqkit_main(["compress", str(image), "--prior", str(masked), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a masked prior; compression needs an autoregressive one" in err
    assert err.count("\n") == 1 and not out.exists()


def test_masked_flag_on_an_autoregressive_run_is_one_line(runs, tmp_path, capsys):
    tok, _, _, _ = runs
    assert main(["prior", "--tokenizer", str(tok), "--out", str(tmp_path / "p"),
                 "--mask-schedule", "linear"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "applies to a masked prior (--kind masked)" in err and err.count("\n") == 1


@pytest.mark.timeout(180)
def test_torchrun_two_processes_then_resume_in_one(runs, tmp_path):
    tok, _, _, _ = runs
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "vqkit.prior.cli", "prior", "--tokenizer", str(tok), "--out", str(out),
           "--kind", "masked", "--steps", "3", "--seed", "2", *PRIOR_FLAGS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=70)
        log = proc.stdout + proc.stderr
        if proc.returncode == 0 or "address already in use" not in log.lower():
            break  # only the free-port race of --standalone gets a second try
        out = tmp_path / "ddp_retry"
        cmd[cmd.index("--out") + 1] = str(out)
    assert proc.returncode == 0, log[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["prior"]["kind"] == "masked"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 3), ("eval", 3)]
    assert main(["prior", "--out", str(out), "--resume", "--steps", "4", "--batch-size", "32",
                 "--no-progress"]) == 0  # fmt: skip
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.timeout(120)
def test_edit_overwrite_leaves_no_files_of_the_first_call(runs, tmp_path):
    """issue 36: the first call's extra edit files stayed beside an edit.json describing
    only the second; --overwrite removes only the files sample writes."""
    _, masked, _, image = runs
    out = tmp_path / "e"
    flags = ["--edit", str(image), "--region", "0,0,14,14"]
    assert _sample(masked, out, *flags, "--num", "3") == 0
    (out / "mine.txt").write_text("the user's")
    assert _sample(masked, out, *flags, "--num", "1") == 2  # not empty: refused
    assert _sample(masked, out, *flags, "--num", "1", "--overwrite") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["edit.json", "edit_0000.npy", "edit_0000.npy.json", "edit_0000.png",
                     "grid.png", "mine.txt", "original.png", "reconstruction.png"]  # fmt: skip
    meta = json.loads((out / "edit.json").read_text())
    assert meta["num"] == 1 and meta["written"] == 1 and meta["complete"]


@pytest.mark.timeout(120)
def test_edits_are_drawn_and_written_batch_by_batch(runs, tmp_path, monkeypatch):
    """issue 36: ``--edit --num 1e9`` held every edit in memory; now one batch at a time,
    the same draws as one call of the same batch size."""
    from vqkit.prior.transformer import Prior

    sizes = []
    original = Prior.sample

    def spy(self, n, *args, **kwargs):
        sizes.append(n)
        return original(self, n, *args, **kwargs)

    monkeypatch.setattr(Prior, "sample", spy)
    _, masked, _, image = runs
    out = tmp_path / "e"
    flags = ["--edit", str(image), "--region", "0,0,14,14", "--decode-steps", "2"]
    assert _sample(masked, out, *flags, "--num", "5", "--batch-size", "2") == 0
    assert sizes == [2, 2, 1]
    streamed = np.stack([np.load(out / f"edit_{i:04d}.npy") for i in range(5)])
    meta = json.loads((out / "edit.json").read_text())
    assert meta["num"] == 5 and meta["written"] == 5 and meta["batch_size"] == 2
    # the same draws as one call over all five (what the edits were before)
    from vqkit.data import normalize, read_image
    from vqkit.prior.loading import load_prior, load_sample_tokenizer
    from vqkit.prior.masked import MaskedSampleOptions
    from vqkit.prior.sampling import SampleOptions

    model, ckpt = load_prior(masked)
    tok = load_sample_tokenizer(masked, ckpt, None, "cpu")
    codes = tok.model.encode(normalize(read_image(image, 1, 28)[None]))
    hidden = region_mask([(0, 0, 14, 14)], (28, 28), (7, 7))
    mopts = MaskedSampleOptions.from_dict({"decode_steps": 2}).resolved(int(hidden.sum()))
    g = torch.Generator().manual_seed(0)
    whole = original(model, 5, SampleOptions.from_dict({}), generator=g, batch_size=2,
                     codes=codes.expand(5, 7, 7), hidden=hidden[None].expand(5, 7, 7),
                     masked=mopts)  # fmt: skip
    assert np.array_equal(streamed, whole.numpy())
