"""``vqkit export`` (vqkit.training.export, vqkit.prior.export, vqkit.prior.pretrained):
a 3-step tokenizer run and a 6-step prior on it, exported and loaded back with
``from_pretrained`` with the network refused; the prior's directory names its tokenizer,
and a wrong tokenizer is refused."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
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


# -- issue 36: a model file remembers its data; export refuses to replace -----------------


def make_folder(root, n: int = 40, size: int = 28):
    """An image folder of ``n`` random grey ``size`` px PNGs in two class folders (no
    test split: a run on it holds out the last 5% of train)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, one_thread_module):
    """A 2-step tokenizer run on a 40-image folder (38 train, 2 held out) and its export."""
    root = tmp_path_factory.mktemp("folder")
    data = make_folder(root / "images")
    tok = make_tokenizer(root / "tok", "--data", str(data), "--batch-size", "8",
                         "--steps", "2", "--eval-every", "2", "--log-every", "2")  # fmt: skip
    assert main(["export", str(tok), "--out", str(root / "exported")]) == 0
    return data, tok, root / "exported"


def test_an_exported_tokenizer_carries_its_data(folder_run, tmp_path, capsys):
    data, tok, exported = folder_run
    info = json.loads((exported / "config.json").read_text())["info"]
    want = {"source": str(data.resolve()), "format": "auto", "image_size": 28, "channels": 1,
            "eval_split": "holdout"}  # fmt: skip
    assert info["data"] == want
    assert VQVAE.from_pretrained(exported).pretrained_info["data"] == want
    assert load_model(exported / "model.safetensors").pretrained_info["data"] == want
    assert load_model(tok / "model.safetensors").pretrained_info["data"] == want
    # a prior on the export trains on the tokenizer's 38 + 2 images, and caches nothing
    # in the export (a pretrained directory is not a run)
    prior = tmp_path / "prior"
    assert main(["prior", "--tokenizer", str(exported), "--out", str(prior),
                 "--steps", "2", *PRIOR_FLAGS, "--batch-size", "8"]) == 0  # fmt: skip
    assert "codes encoded: 38 train / 2 test index maps" in capsys.readouterr().out
    assert not (exported / "codes").exists()
    cfg = json.loads((prior / "config.json").read_text())
    assert cfg["data"]["source"] == str(data.resolve()) and cfg["data"]["eval_split"] == "holdout"
    assert cfg["data"]["train_sequences"] == 38 and cfg["data"]["test_sequences"] == 2
    result = json.loads((prior / "eval.json").read_text())
    assert result["data"]["source"] == str(data.resolve()) and result["data"]["split"] == "holdout"


def test_a_model_without_a_readable_data_record_is_refused(folder_run, tmp_path, capsys):
    data, tok, exported = folder_run
    bare = tmp_path / "bare"  # weights without a data record (an older export)
    bare.mkdir()
    from vqkit.models import export_safetensors

    export_safetensors(load_model(tok / "model.safetensors"), bare / "model.safetensors")
    assert main(["prior", "--tokenizer", str(bare), "--out", str(tmp_path / "p"),
                 "--steps", "1", *PRIOR_FLAGS]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "records no training data" in err and "--data" in err and err.count("\n") == 1
    moved = tmp_path / "moved"  # the data is gone from where the model says it was
    shutil.copytree(exported, moved / "exp")
    shutil.move(str(data), str(tmp_path / "elsewhere"))
    try:
        assert main(["prior", "--tokenizer", str(moved / "exp"), "--out",
                     str(tmp_path / "q"), "--steps", "1", *PRIOR_FLAGS]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "cannot be read" in err and str(data.resolve()) in err and "--data" in err
        assert err.count("\n") == 1
    finally:
        shutil.move(str(tmp_path / "elsewhere"), str(data))


def test_export_refuses_the_run_itself_and_existing_outputs(folder_run, tmp_path, capsys):
    _, tok, exported = folder_run
    before = (tok / "config.json").read_bytes(), (tok / "model.safetensors").read_bytes()
    for out in (tok, tok / "pretrained", tok / "checkpoints"):
        assert main(["export", str(tok), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "inside the run" in err and err.count("\n") == 1
    assert ((tok / "config.json").read_bytes(), (tok / "model.safetensors").read_bytes()) == before
    assert not (tok / "pretrained").exists()
    card = (exported / "README.md").read_bytes()
    assert main(["export", str(tok), "--out", str(exported), "--weights",
                 "checkpoints/last.pt"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert (exported / "README.md").read_bytes() == card
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    assert main(["export", str(tok), "--out", str(copy), "--weights", "checkpoints/last.pt",
                 "--overwrite"]) == 0  # fmt: skip
    assert "Not measured" in (copy / "README.md").read_text()


def test_prior_export_refuses_the_run_itself_and_existing_outputs(runs, tmp_path, capsys):
    tok, prior_run = runs
    for out in (prior_run, prior_run / "x", tok):
        assert main(["export", str(prior_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "inside the run" in err and err.count("\n") == 1, err
    out = tmp_path / "p"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "config.json").write_text("{}")
    assert main(["export", str(prior_run), "--out", str(out)]) == 2
    assert "tokenizer/config.json exists" in capsys.readouterr().err
    assert (out / "tokenizer" / "config.json").read_text() == "{}"


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory, one_thread_module):
    """A 2-step speech codec run (3 stages of 16 codes at 2 kHz) on a WAV folder."""
    from vqkit.training.audio_trainer import AudioTrainConfig, AudioTrainer

    from .test_audio_trainer import TINY, write_folder

    root = tmp_path_factory.mktemp("codec")
    data = write_folder(root / "wavs")
    cfg = {**TINY, "steps": 2, "eval_every": 2, "sample_clips": 0}
    AudioTrainer(AudioTrainConfig(data=str(data), out_dir=str(root / "run"), **cfg)).fit()
    return data, root / "run"


def test_codec_run_export(codec_run, tmp_path, capsys):
    """The export loads with AudioCodec.from_pretrained as the run's codec; its card gives
    the bitrate per stage count (250 frames/s x n x 4 bits) and the run's figures; the
    export, the run and its checkpoint encode alike."""
    from vqkit.models import AudioCodec

    data, run = codec_run
    out = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "audio codec" in capsys.readouterr().out
    model, trained = AudioCodec.from_pretrained(out), AudioCodec.from_pretrained(run / "codec")
    assert model.config == trained.config
    for k, v in trained.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    info = json.loads((out / "config.json").read_text())["info"]
    evaluation = json.loads((run / "eval.json").read_text())
    assert info["data"] == str(data.resolve()) and info["eval"] == evaluation
    card = (out / "README.md").read_text()
    assert "bitrate(n) = frames/s x the n stages' log2 K = 250 x n x 4 bit/s" in card
    for row in evaluation["stages"]:
        n = row["num_stages"]
        assert f"| {n} | {n} | {row['si_sdr']:.4g} | {row['mel_distance']:.4g} |" in card
    # a checkpoint's weights: the bitrate without measured figures
    last = tmp_path / "last"
    assert main(["export", str(run), "--out", str(last), "--weights", "checkpoints/last.pt"]) == 0
    card = (last / "README.md").read_text()
    assert "| 3 | 3 |" in card and "Quality not measured" in card
    assert json.loads((last / "config.json").read_text())["info"] == {"data": str(data.resolve())}
    assert main(["export", str(run), "--out", str(last)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    # encode accepts the export, the run directory and the checkpoint: the same codes
    wav = next((data / "test").iterdir())
    for i, src in enumerate((out, run, run / "codec", last)):
        assert main(["encode", str(src), str(wav), "--out", str(tmp_path / f"c{i}")]) == 0
    codes = [np.load(tmp_path / f"c{i}" / f"{wav.stem}.npy") for i in range(4)]
    assert all(np.array_equal(codes[0], c) for c in codes[1:3])
    # the export records its data: vqkit eval on it needs no --data
    assert main(["eval", str(out), "--out", str(tmp_path / "ev"), "--limit", "1"]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["data"] == str(data.resolve())
