"""Tests of vqkit's training.tokenizer module (the VQ-VAE training job)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.test_cli import SMALL, SMALL_FLAGS, _run  # the small network and CLI run
from vqkit.cli import main
from vqkit.storage.checkpoint import load_checkpoint
from vqkit.training.tokenizer import TrainConfig, Trainer


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
    # the handler in force before fit (SIG_IGN when the suite runs without job control)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    # the step in flight completes, then the checkpoint is written
    saved = load_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")
    assert saved["step"] == 8 and saved["loader"]["position"] == 8 * 16
    assert signal.getsignal(signal.SIGINT) is before
    resumed = Trainer(cfg, resume=True)
    resumed.fit()
    straight = Trainer(TrainConfig(out_dir=str(tmp_path / "straight"), **kw))
    straight.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_codebook_lr_scale_makes_a_second_param_group(tmp_path):
    from vqkit.training.tokenizer import Trainer

    cfg = TrainConfig(
        quantizer="vq",
        affine_codebook=True,
        codebook_lr_scale=0.1,
        out_dir=str(tmp_path / "r"),
        steps=0,
        progress=False,
        **SMALL,
    )
    trainer = Trainer(cfg)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2
    q = trainer.model.quantizer
    assert {id(p) for p in groups[1]["params"]} == {
        id(q.codebook),
        id(q.codebook_scale),
        id(q.codebook_shift),
    }
    assert groups[1]["lr"] == pytest.approx(cfg.lr * 0.1)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(trainer.model.parameters()))


def test_streamed_shards_train_and_resume_bit_exactly(tmp_path):
    """Shards written by pack from an image folder: streamed through 2 worker processes
    with random crops and the prefetch thread; 4 + resume 4 steps == 8 steps."""
    import json

    from tests.test_training_data import packed

    src = packed(tmp_path)  # 48 train images in 6 shards: 8 steps cross an epoch
    flags = ["--data", str(src), "--image-size", "8", "--crop", "random", "--num-workers", "2"]

    def run(name, steps, *extra):
        out = tmp_path / name
        args = ["train", "--out", str(out), "--steps", str(steps), "--batch-size", "8"]
        args += ["--log-every", "2", "--eval-every", "4", "--no-progress", "--seed", "5"]
        assert main([*args, *SMALL_FLAGS, *flags, *extra]) == 0
        return out

    full = run("full", 8)
    part = run("part", 4)
    run("part", 8, "--resume")
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["loader"] == b["loader"] and a["loader"]["kind"] == "shards"
    assert a["loader"]["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    info = json.loads((full / "config.json").read_text())
    assert info["data"]["train"]["num_shards"] == 6 and info["data"]["train"]["streams"] == 2
    assert info["data"]["eval"]["split"] == "test" and info["data"]["eval"]["num_images"] == 8
    logs = [json.loads(line) for line in (full / "metrics.jsonl").open()]
    assert [r["epoch"] for r in logs if r["kind"] == "train"] == [0, 0, 1, 1]


def _cfg(tmp_path, name, **kw):
    base = dict(
        out_dir=str(tmp_path / name),
        steps=8,
        batch_size=8,
        log_every=4,
        eval_every=100,
        eval_images=16,
        eval_split="holdout",  # 250 images: a short final evaluation
        progress=False,
        seed=3,
        **SMALL,
    )
    return TrainConfig(**{**base, **kw})


def test_checkpoint_every_n_minutes_with_a_mocked_clock(tmp_path, monkeypatch):
    import vqkit.runtime.loop as loop_mod

    now = [0.0]
    monkeypatch.setattr(loop_mod, "_clock", lambda: now[0])
    trainer = Trainer(_cfg(tmp_path, "t", steps=7, ckpt_minutes=1.0))
    real_step, real_save, saved = trainer.train_step, trainer.save, []

    def step(x):
        now[0] += 25.0  # each step takes 25 s of the mocked clock
        return real_step(x)

    def save(**kw):
        saved.append(trainer.step)
        real_save(**kw)

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer, "save", save)
    monkeypatch.setattr(trainer, "finish", dict)  # no final evaluation and pictures
    trainer.fit()
    # 75 s at step 3, 75 s later at step 6, and the final checkpoint at step 7
    assert saved == [3, 6, 7]


def test_lr_schedule_sets_the_rate_of_each_update(tmp_path, monkeypatch):
    from vqkit.runtime.schedule import Schedule

    cfg = _cfg(tmp_path, "lr", warmup_steps=3, lr_schedule="cosine", min_lr_ratio=0.1)
    trainer = Trainer(cfg)
    real, rates = trainer.optimizer.step, []

    def step(*a, **k):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return real(*a, **k)

    monkeypatch.setattr(trainer.optimizer, "step", step)
    monkeypatch.setattr(trainer, "finish", dict)
    trainer.fit()
    want = [Schedule(8, 3, "cosine", 0.1).lr(cfg.lr, s) for s in range(8)]
    assert rates == pytest.approx(want, rel=1e-12)


def test_weight_ema_resumes_exactly_and_is_what_is_evaluated_and_exported(tmp_path):
    from safetensors.torch import load_file

    kw = dict(weight_ema=0.9, grad_clip=1.0, quantizer="vq", revive_every=2, eval_every=4)
    full = Trainer(_cfg(tmp_path, "full", **kw))
    full.fit()
    Trainer(_cfg(tmp_path, "part", **{**kw, "steps": 4})).fit()
    part = Trainer(_cfg(tmp_path, "part", **kw), resume=True)
    part.fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["weight_ema"]["updates"] == b["weight_ema"]["updates"] == 8
    for k, v in a["weight_ema"]["shadow"].items():
        assert torch.equal(v, b["weight_ema"]["shadow"][k]), k
        assert torch.equal(a["model"][k], b["model"][k]), k
    exported = load_file(str(tmp_path / "full" / "model.safetensors"))
    for k, v in exported.items():
        assert torch.equal(v, a["weight_ema"]["shadow"][k]), k
    assert not torch.equal(exported["encoder.conv1.weight"], a["model"]["encoder.conv1.weight"])
