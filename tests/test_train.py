"""Tests of vqkit's train module."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from vqkit.checkpoint import load_checkpoint
from vqkit.cli import main
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


def test_codebook_lr_scale_makes_a_second_param_group(tmp_path):
    from vqkit.train import Trainer

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
