"""VQ-VAE model, trainer, CLI and checkpoints."""

import json
import os
import signal

import numpy as np
import pytest
import torch

from vqkit.checkpoint import CheckpointError, load_checkpoint
from vqkit.cli import main
from vqkit.models import VQVAE, VQVAEConfig, load_model
from vqkit.train import TrainConfig, Trainer

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


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
@pytest.mark.parametrize("kind", ["ema", "vq"])
def test_model_shapes(channels, size, kind):
    m = VQVAE(in_channels=channels, image_size=size, quantizer=kind)
    x = torch.rand(2, channels, size, size) - 0.5
    out = m(x)
    assert out.recon.shape == x.shape
    assert out.vq.indices.shape == (2, size // 4, size // 4)
    idx = m.encode(x)
    assert torch.equal(m.decode(idx), m.decoder(m.quantizer.decode(idx)))
    terms = VQVAE.loss(out, x, 0.06)
    terms["loss"].backward()
    if kind == "vq":
        assert m.quantizer.codebook.grad is not None
    else:
        assert not any(p is m.quantizer.codebook for p in m.parameters())


def test_classic_architecture_details():
    m = VQVAE()  # defaults: h=128, residual hiddens 32, 2 layers, K=512, D=64
    assert m.encoder.conv1.out_channels == 64 and m.encoder.conv1.kernel_size == (4, 4)
    assert m.encoder.conv1.stride == (2, 2) and m.encoder.conv3.kernel_size == (3, 3)
    assert m.pre_vq.kernel_size == (1, 1) and m.pre_vq.out_channels == 64
    assert m.quantizer.num_embeddings == 512 and m.quantizer.commitment_cost == 0.25
    blocks = m.encoder.res.blocks
    assert len(blocks) == 2
    # each residual layer has its own weights (the classic notebook shared one module)
    assert blocks[0].conv3.weight.data_ptr() != blocks[1].conv3.weight.data_ptr()
    assert blocks[0].conv3.bias is None and blocks[0].conv1.bias is None
    assert isinstance(m.decoder.up1, torch.nn.ConvTranspose2d)


def test_model_input_errors():
    m = VQVAE(**SMALL)
    with pytest.raises(ValueError, match="expected 3 image channels; got 1"):
        m(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        m(torch.zeros(1, 3, 30, 30))
    with pytest.raises(TypeError, match="uint8"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size"):
        VQVAEConfig(image_size=30)
    with pytest.raises(ValueError, match="quantizer"):
        VQVAEConfig(quantizer="pq")


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


def test_resume_equals_uninterrupted(tmp_path):
    full = _run(tmp_path, "full", 20)
    part = _run(tmp_path, "part", 10)
    assert _run(tmp_path, "part", 20, "--resume") == part  # same flags, continued
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 20
    assert a["loader"] == b["loader"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"])


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    kw = dict(
        steps=20,
        batch_size=16,
        log_every=5,
        eval_every=100,
        eval_images=32,
        progress=False,
        seed=3,
        **SMALL,
    )
    cfg = TrainConfig(out_dir=str(tmp_path / "int"), **kw)
    trainer = Trainer(cfg)
    real = trainer.train_step

    def interrupted(x):
        if trainer.step == 7:  # a real SIGINT in the middle of step 8
            os.kill(os.getpid(), signal.SIGINT)
        return real(x)

    monkeypatch.setattr(trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # the step in flight completes, then the checkpoint is written
    saved = load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")
    assert saved["step"] == 8 and saved["loader"]["position"] == 8 * 16
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = Trainer(cfg, resume=True)
    resumed.fit()
    straight = Trainer(TrainConfig(out_dir=str(tmp_path / "straight"), **kw))
    straight.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_hard_interrupt_inside_a_step_rewinds_the_loader(tmp_path, monkeypatch):
    cfg = TrainConfig(
        out_dir=str(tmp_path / "hard"),
        steps=20,
        batch_size=16,
        log_every=5,
        eval_every=100,
        eval_images=32,
        progress=False,
        seed=3,
        **SMALL,
    )
    trainer = Trainer(cfg)
    real = trainer.train_step

    def boom(x):
        if trainer.step == 5:
            raise KeyboardInterrupt  # as from a second Ctrl-C, before the update
        return real(x)

    monkeypatch.setattr(trainer, "train_step", boom)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "hard" / "checkpoints" / "last.pt")
    assert saved["step"] == 5 and saved["loader"]["position"] == 5 * 16


def test_eval_encode_decode_round_trip(tmp_path, capsys):
    out = _run(tmp_path, "run", 10, "--quantizer", "vq")
    ckpt = out / "checkpoints" / "last.pt"
    ev = tmp_path / "ev"
    assert main(["eval", str(ckpt), "--out", str(ev)]) == 0
    result = json.loads((ev / "eval.json").read_text())
    assert result["num_images"] == 1000 and 0 <= result["usage"] <= 1
    assert (ev / "recon.png").is_file()

    # a test image through encode -> .npy -> decode -> PNG
    from vqkit.data import load_dataset
    from vqkit.plots import save_images

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
    exported = VQVAE.from_checkpoint(out / "model.safetensors")
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
    from vqkit.checkpoint import save_checkpoint

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
    # resuming a run with a different model fails clearly
    with pytest.raises(CheckpointError, match="does not match"):
        Trainer(
            TrainConfig(out_dir=str(out), steps=10, progress=False, **{**SMALL, "hidden": 64}),
            resume=True,
        )


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    from vqkit.checkpoint import atomic_write

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    # a successful write has the permissions an ordinary open() gives (not mkstemp's 0600)
    new = tmp_path / "g.bin"
    atomic_write(new, lambda tmp: open(tmp, "wb").write(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask


def test_config_file(tmp_path):
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps({"steps": 7, "lr": 1e-3, "quantizer": "vq"}))
    cfg = TrainConfig.from_file(cfg_path, lr=2e-3)
    assert cfg.steps == 7 and cfg.lr == 2e-3 and cfg.quantizer == "vq"
    cfg_path.write_text(json.dumps({"stepz": 7}))
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.from_file(cfg_path)
    cfg_path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.from_file(cfg_path)
