"""``vqkit sample PRIOR --edit IMAGE --keep-scales N`` with a next-scale prior: the edits
keep the image's first N scales and draw the finer ones; bad flags get one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.prior.cli import main

from .test_prior_cli import PRIOR_FLAGS
from .test_prior_codes import make_tokenizer

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread_module):
    """A multi-scale tokenizer (scales 1,2,4,7), a 2-step next-scale prior, an
    autoregressive one on the same codes, and a picture."""
    root = tmp_path_factory.mktemp("scale_edit")
    tok = make_tokenizer(root / "tok", "--quantizer", "multiscale", "--scales", "1,2,4,7",
                         "--num-embeddings", "16")  # fmt: skip
    ns, ar = root / "ns", root / "ar"
    with torch.no_grad():
        assert main(["prior", "--tokenizer", str(tok), "--out", str(ns), "--steps", "2",
                     "--kind", "next-scale", *PRIOR_FLAGS]) == 0  # fmt: skip
        assert main(["prior", "--tokenizer", str(tok), "--out", str(ar), "--steps", "2",
                     *PRIOR_FLAGS]) == 0  # fmt: skip
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "image.png")
    yield tok, ns, ar, root / "image.png"


def _sample(prior: Path, out: Path, *flags: str) -> int:
    with torch.no_grad():
        return main(["sample", str(prior), "--out", str(out), *flags])


def test_edits_keep_the_first_scales_of_the_image(runs, tmp_path):
    from vqkit.models.io import load_model

    tok, ns, _, image = runs
    out = tmp_path / "e"
    assert _sample(ns, out, "--edit", str(image), "--keep-scales", "2", "--num", "5",
                   "--batch-size", "2", "--temperature", "2") == 0  # fmt: skip
    meta = json.loads((out / "edit.json").read_text())
    assert meta["keep_scales"] == 2 and meta["codes_kept"] == 1 + 4
    assert meta["codes_regenerated"] == 16 + 49 and meta["complete"]
    edits = np.stack([np.load(out / f"edit_{i:04d}.npy") for i in range(5)])
    assert edits.shape == (5, 70) and (out / "grid.png").exists()
    # the image's own codes, as the tokenizer gives them
    from vqkit.data import normalize, read_image

    model = load_model(str(tok / "checkpoints" / "best.pt")).eval()
    with torch.no_grad():
        codes = model.encode(normalize(read_image(str(image), 1, 28)[None]))[0].numpy()
    assert (edits[:, :5] == codes[:5]).all()  # the first two scales kept, every edit
    assert (edits[:, 5:] != codes[5:]).any()  # the finer ones drawn (temperature 2)
    assert len({e[5:].tobytes() for e in edits}) > 1


@pytest.mark.parametrize(
    ("which", "flags", "message"),
    [
        ("ns", ["--edit", "IMAGE"], "needs --keep-scales N"),
        ("ns", ["--keep-scales", "1"], "--keep-scales goes with --edit IMAGE"),
        ("ns", ["--edit", "IMAGE", "--keep-scales", "4"], "--keep-scales must lie in [1, 3]"),
        ("ns", ["--edit", "IMAGE", "--keep-scales", "1", "--region", "0,0,4,4"], "--region"),
        ("ar", ["--edit", "IMAGE", "--keep-scales", "1"], "a next-scale prior's flag"),
    ],
)
def test_bad_flags_get_one_line(runs, tmp_path, capsys, which, flags, message):
    _, ns, ar, image = runs
    flags = [str(image) if f == "IMAGE" else f for f in flags]
    prior = ns if which == "ns" else ar
    assert _sample(prior, tmp_path / "x", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and len(err) == 1
    assert not (tmp_path / "x").exists()
