"""``vqkit export`` (vqkit.training.export, vqkit.prior.export, vqkit.prior.pretrained):
a 3-step tokenizer run and a 6-step prior on it, exported and loaded back with
``from_pretrained`` with the network refused; the prior's directory names its tokenizer,
and a wrong tokenizer is refused."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from vqkit.cli import main
from vqkit.models import VQVAE, load_model
from vqkit.prior import Prior, load_prior_tokenizer
from vqkit.prior.loading import load_prior
from vqkit.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .test_prior_cli import PRIOR_FLAGS
from .test_prior_codes import make_tokenizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network refused in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    try:
        tok = make_tokenizer(root / "tok")
        prior = root / "prior"
        assert main(["prior", "--tokenizer", str(tok), "--out", str(prior), "--steps", "6",
                     "--tensorboard", *PRIOR_FLAGS]) == 0  # fmt: skip
        yield tok, prior
    finally:
        torch.set_num_threads(n)


def test_tokenizer_run_export(runs, tmp_path, capsys):
    tok, _ = runs
    assert main(["export", str(tok), "--out", str(tmp_path / "t")]) == 0
    model = VQVAE.from_pretrained(tmp_path / "t")
    final = load_model(tok / "model.safetensors").eval()
    idx = torch.randint(0, 32, (2, 7, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.decode(idx), final.decode(idx))
    card = (tmp_path / "t" / "README.md").read_text()
    measured = json.loads((tok / "eval.json").read_text())
    assert f"| nmse | {measured['nmse']:.4g} |" in card and "| step | 3 |" in card
    assert "| split | test |" in card and f"| num_images | {measured['num_images']} |" in card
    assert "`builtin`, 5000 training images (1x28x28), 10 classes" in card
    assert "K = 32" in card and "7 x 7 indices per 28 x 28 image" in card
    # another weights file of the run: not the one eval.json measured
    assert main(["export", str(tok), "--out", str(tmp_path / "l"),
                 "--weights", "checkpoints/last.pt"]) == 0  # fmt: skip
    assert "Not measured" in (tmp_path / "l" / "README.md").read_text()
    with pytest.raises(CheckpointError, match="vqkit export RUN"):
        VQVAE.from_pretrained(tok)  # the run itself is not a pretrained directory
    capsys.readouterr()
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_prior_run_export_names_and_checks_its_tokenizer(runs, tmp_path, capsys):
    tok, prior_run = runs
    out = tmp_path / "p"
    assert main(["export", str(prior_run), "--out", str(out)]) == 0
    info = json.loads((out / "config.json").read_text())["info"]
    stored = json.loads((prior_run / "config.json").read_text())["tokenizer"]
    assert info["tokenizer"]["location"] == "tokenizer"
    assert info["tokenizer"]["sha256"] == stored["sha256"]
    assert info["tokenizer"]["checkpoint"] == "checkpoints/best.pt"
    assert len(info["classes"]) == 10
    tokenizer = load_prior_tokenizer(out)  # out/tokenizer, checked against the prior
    prior = Prior.from_pretrained(out, tokenizer=tokenizer)
    ref, _ = load_prior(prior_run, "last")
    codes = torch.randint(0, 32, (3, 7, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 10])
    assert torch.equal(prior.log_prob(codes, labels), ref.log_prob(codes, labels))
    assert torch.equal(
        tokenizer.decode(codes), load_model(tok / "checkpoints/best.pt").decode(codes)
    )
    card = (out / "README.md").read_text()
    assert "| test_bits |" in card and "tokenizer: `tokenizer`" in card
    # the run's --tensorboard: its sample grids at each evaluation (4 samples of 28 x 28)
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(prior_run / "tensorboard"), size_guidance={ea.IMAGES: 0})
    acc.Reload()
    assert [(e.step, e.width, e.height) for e in acc.Images("samples")] == [
        (3, 4 * 28, 28),
        (6, 4 * 28, 28),
    ]
    assert [e.step for e in acc.Scalars("eval/test_bits")] == [3, 6]
    # a wrong tokenizer is refused: other weights, and a changed file in the run
    wrong = load_model(tok / "checkpoints/best.pt")
    with torch.no_grad():
        wrong.decoder.up2.bias.add_(1e-3)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        Prior.from_pretrained(out, tokenizer=wrong)
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        load_prior_tokenizer(out, tmp_path / "wrong")
    # the tokenizer run trained on: the prior's pinned copy is exported, as vqkit sample
    # uses it; without that copy the changed file is refused
    changed = tmp_path / "tok_changed"
    shutil.copytree(tok, changed)
    ckpt = load_checkpoint(changed / "checkpoints/best.pt")
    ckpt["model"] = wrong.state_dict()
    save_checkpoint(changed / "checkpoints/best.pt", ckpt)
    assert main(["export", str(prior_run), "--out", str(tmp_path / "q"),
                 "--tokenizer", str(changed)]) == 0  # fmt: skip
    assert load_prior_tokenizer(tmp_path / "q") is not None  # the original weights
    unpinned = tmp_path / "prior_unpinned"
    shutil.copytree(prior_run, unpinned)
    shutil.rmtree(unpinned / "tokenizer")
    capsys.readouterr()
    assert main(["export", str(unpinned), "--out", str(tmp_path / "r"),
                 "--tokenizer", str(changed)]) == 2  # fmt: skip
    assert "tokenizer mismatch" in capsys.readouterr().err
