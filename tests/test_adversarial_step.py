"""Tests of vqkit's adversarial_step module: the generator and discriminator steps of
``vqkit train`` on the shared run loop (two scheduled optimizers), their checkpoint and
bit-exact resume, DDP (2 gloo processes), bf16 and compile smoke runs, and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vqkit.cli import main
from vqkit.storage.checkpoint import load_checkpoint
from vqkit.training.adversarial_step import AdversarialStep
from vqkit.training.tokenizer import TrainConfig, Trainer

from .test_distributed import run_ranks

SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)
DISC = dict(disc_weight=0.8, disc_start=3, disc_layers=2, disc_channels=8)
RUN = dict(batch_size=8, log_every=2, eval_every=4, eval_images=32, progress=False, seed=3)


def _flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


def _train(out, steps, *extra, **options):
    args = ["train", "--out", str(out), "--steps", str(steps)]
    args += _flags({**SMALL, **RUN, **DISC, **options}) + list(extra)
    return main(args)


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_finish(monkeypatch):
    """Skip the final evaluation and pictures (tested in test_tokenizer) to keep it fast."""
    monkeypatch.setattr(Trainer, "finish", lambda self: {"step": self.step})


def _assert_same_state(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    adv_a, adv_b = a["adversarial"], b["adversarial"]
    for k, v in adv_a["loss"]["discriminator"].items():
        assert torch.equal(v, adv_b["loss"]["discriminator"][k]), k  # BN statistics included
    for name in ("optimizer",):
        for opt_a, opt_b in ((a[name], b[name]), (adv_a[name], adv_b[name])):
            for i, s in opt_a["state"].items():
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(s[key], opt_b["state"][i][key]), (name, i, key)


def test_resume_with_the_discriminator_on_equals_uninterrupted(tmp_path, no_finish):
    assert _train(tmp_path / "full", 6) == 0
    assert _train(tmp_path / "part", 4) == 0  # the discriminator on from step 3 (0-based)
    assert _train(tmp_path / "part", 6, "--resume") == 0
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6 and a["loader"] == b["loader"]
    _assert_same_state(a, b)
    # the discriminator really trained: its optimizer took steps 3, 4, 5 (0-based)
    steps = {int(s["step"]) for s in a["adversarial"]["optimizer"]["state"].values()}
    assert steps == {3}

    def figures(run):
        return [
            {k: v for k, v in r.items() if k != "images_per_s"}
            for r in _records(run)
            if r["kind"] != "resume"
        ]

    assert figures(tmp_path / "full") == figures(tmp_path / "part")


def test_two_optimizers_alternate_on_the_run_loop(tmp_path, monkeypatch):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=6, disc_lr=1e-3, **SMALL, **RUN, **DISC)
    cfg = cfg.replace(lr_schedule="cosine", warmup_steps=2)
    trainer = Trainer(cfg)
    opts = trainer.optimizers()
    assert len(opts) == 2 and opts[1].optimizer is trainer.adv.optimizer
    assert trainer.adv.optimizer.defaults["betas"] == (0.5, 0.9)
    d0 = {k: v.clone() for k, v in trainer.adv.loss.discriminator.state_dict().items()}
    seen = []  # (step, generator lr, discriminator lr, discriminator changed so far)
    real = trainer.adv.discriminator_step

    def spy(x, recon, step):
        d = trainer.adv.loss.discriminator.state_dict()
        changed = any(not torch.equal(d0[k], v) for k, v in d.items())
        lrs = [o.optimizer.param_groups[0]["lr"] for o in opts]
        seen.append((step, *lrs, changed))
        return real(x, recon, step)

    monkeypatch.setattr(trainer.adv, "discriminator_step", spy)
    trainer.fit()
    # each optimizer at its own base rate on the same schedule; the discriminator (and its
    # BatchNorm statistics) untouched by the generator steps before disc_start
    sched = opts[0].schedule
    for step, g_lr, d_lr, changed in seen:
        assert g_lr == pytest.approx(sched.lr(3e-4, step))
        assert d_lr == pytest.approx(sched.lr(1e-3, step))
        assert changed == (step > 3)
    records = [r for r in _records(tmp_path / "run") if r["kind"] == "train"]
    assert [r["disc_steps"] for r in records] == [0, 1, 2]  # steps 1-2, 3-4 (4th), 5-6
    assert "d_loss" not in records[0] and "g_loss" not in records[0]
    for r in records[1:]:
        assert {"d_loss", "g_loss", "d_weight", "logits_real", "logits_fake"} <= set(r)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "labels" not in [r for r in _records(tmp_path / "run") if r["kind"] == "eval"][0]
    assert "psnr" in ev


def test_the_classic_objective_has_no_adversarial_step(tmp_path):
    trainer = Trainer(TrainConfig(out_dir=str(tmp_path / "c"), steps=1, **SMALL, **RUN))
    try:
        assert trainer.adv is None and trainer.runner.objective is None
        assert len(trainer.optimizers()) == 1 and "adversarial" not in trainer.state_dict()
    finally:
        trainer.close()
    # l1 alone: the objective without a discriminator (one optimizer)
    t = Trainer(TrainConfig(out_dir=str(tmp_path / "l1"), steps=1, rec_loss="l1", **SMALL, **RUN))
    try:
        assert t.adv is not None and t.adv.optimizer is None and len(t.optimizers()) == 1
    finally:
        t.close()


def _best_steps(trainer, evals) -> list[int]:
    """best.pt's step after each (step, nmse) evaluation handed to ``after_eval`` and the
    checkpoint written after it."""
    out = []
    for step, nmse in evals:
        trainer.step = step
        trainer.after_eval({"nmse": nmse})
        trainer.save()
        out.append(load_checkpoint(trainer.best_path)["step"])
    return out


def test_best_checkpoint_is_chosen_among_evaluations_of_the_final_objective(tmp_path):
    # before disc_start (3) the tokenizer trains on reconstruction alone: its lower NMSE
    # must not keep best.pt once the discriminator is on
    evals = [(2, 0.10), (4, 0.50), (6, 0.60), (8, 0.40)]
    adv = Trainer(TrainConfig(out_dir=str(tmp_path / "a"), steps=8, **SMALL, **RUN, **DISC))
    try:
        assert adv.adv.objective_final_from == 3
        assert _best_steps(adv, evals) == [2, 4, 4, 8]
        assert load_checkpoint(adv.best_path)["best"]["step"] == 8
    finally:
        adv.close()
    plain = Trainer(TrainConfig(out_dir=str(tmp_path / "p"), steps=8, **SMALL, **RUN))
    try:
        assert _best_steps(plain, evals) == [2, 2, 2, 2]
    finally:
        plain.close()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_smoke(tmp_path, precision, no_finish):
    assert _train(tmp_path / precision, 5, precision=precision) == 0
    ckpt = load_checkpoint(tmp_path / precision / "checkpoints" / "last.pt")
    train = [r for r in _records(tmp_path / precision) if r["kind"] == "train"]
    assert train[-1]["disc_steps"] == 1 and all(
        torch.isfinite(torch.tensor(r["d_loss"])) for r in train if "d_loss" in r
    )
    assert ("grad_scaler" in ckpt["adversarial"]) == (precision == "fp16")


def test_compile_smoke(tmp_path, no_finish, monkeypatch):
    # aot_eager: Dynamo and AOT autograd (whose donated buffers clash with the adaptive
    # weight's retain_graph), without inductor's minutes of code generation on a small CPU
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    assert _train(tmp_path / "c", 4, compile=True, disc_start=1) == 0
    train = [r for r in _records(tmp_path / "c") if r["kind"] == "train"]
    assert train[-1]["disc_steps"] == 2 and all(r["loss"] == r["loss"] for r in train)


# -- bad input: one line each, nothing half-written ---------------------------------------


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_perceptual_term_on_a_one_channel_model(tmp_path, capsys):
    vgg = tmp_path / "vgg16.pth"
    vgg.write_bytes(b"")  # never read: the channels are refused first
    out = tmp_path / "gray"
    code = _train(out, 2, perceptual_weight=1.0, perceptual_weights=str(vgg))  # built-in: gray
    err = _one_line_error(capsys, code)
    assert "RGB" in err and "perceptual" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_perceptual_weights_of_the_wrong_architecture(tmp_path, capsys):
    bad = tmp_path / "not_vgg.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, bad)
    out = tmp_path / "rgb"
    code = _train(out, 2, "--channels", "3", perceptual_weight=1.0, perceptual_weights=str(bad))
    err = _one_line_error(capsys, code)
    assert str(bad) in err or "VGG16" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_disc_start_beyond_steps_warns(tmp_path, capsys, no_finish):
    assert _train(tmp_path / "w", 2, disc_start=5) == 0
    out = capsys.readouterr().out
    assert "warning: disc_start=5 is not before steps=2" in out


def test_a_non_finite_discriminator_loss_stops_before_any_update(tmp_path, capsys, monkeypatch):
    from vqkit.losses import PatchDiscriminator

    real = PatchDiscriminator.forward

    def nan_forward(self, x):
        return real(self, x) * float("nan")

    monkeypatch.setattr(PatchDiscriminator, "forward", nan_forward)
    out = tmp_path / "nan"
    code = _train(out, 6, "--eval-every", "100")
    err = _one_line_error(capsys, code)
    assert "discriminator's loss is nan at step 3" in err
    assert not (out / "checkpoints" / "last.pt").exists()


def test_a_changed_discriminator_on_resume_is_one_line(tmp_path, capsys, no_finish):
    assert _train(tmp_path / "r", 4) == 0
    capsys.readouterr()
    code = _train(tmp_path / "r", 6, "--resume", disc_layers=1)
    err = _one_line_error(capsys, code)
    assert "discriminator does not fit" in err


# -- DDP: two gloo processes, the discriminator wrapped too -------------------------------


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    cfg = TrainConfig(
        out_dir=out, steps=4, init="random", dist_timeout=60.0, **SMALL, **RUN, **DISC
    ).replace(disc_start=1, lecam_weight=0.1)
    trainer = Trainer(cfg)
    assert type(trainer.adv.net).__name__ == "DistributedDataParallel"
    trainer.fit()
    state = {k: v.clone() for k, v in trainer.adv.loss.discriminator.state_dict().items()}
    state.update({f"lecam.{k}": v.clone() for k, v in trainer.adv.loss.lecam.state_dict().items()})
    torch.save(state, os.path.join(out, f"disc{rank}.pt"))


@pytest.mark.timeout(180)
def test_two_processes_keep_one_discriminator(tmp_path):
    """2-process ``vqkit train`` with the discriminator on (gloo, DDP): the ranks see
    different batches, yet their discriminators' weights stay identical (their
    gradients are averaged); BatchNorm statistics are per rank (as taming's); LeCAM's
    anchors are the global batch's, the same on both ranks and in the checkpoint."""
    run = tmp_path / "ddp"
    run.mkdir()
    run_ranks(_ddp_rank, str(run), deadline=150.0)
    d0, d1 = (torch.load(run / f"disc{r}.pt") for r in range(2))
    stats = ("running_mean", "running_var", "num_batches_tracked")
    weights = [k for k in d0 if not k.endswith(stats) and not k.startswith("lecam.")]
    for k in weights:
        assert torch.equal(d0[k], d1[k]), k
    assert not torch.equal(d0["main.3.running_mean"], d1["main.3.running_mean"])  # per rank
    train = [r for r in _records(run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and train[-1]["disc_steps"] == 2
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    for k in weights:  # rank 0's discriminator is the one saved
        assert torch.equal(ckpt["adversarial"]["loss"]["discriminator"][k], d0[k])
    assert int(d0["lecam.steps"]) == 3  # the discriminator steps: from disc_start = 1
    for k, v in ckpt["adversarial"]["loss"]["lecam"].items():  # what resumes every rank
        assert torch.equal(v, d0[f"lecam.{k}"]) and torch.equal(v, d1[f"lecam.{k}"]), k


def test_state_dict_without_a_saved_discriminator_starts_fresh():
    cfg = TrainConfig(**SMALL, **DISC)
    from vqkit.models import VQVAE

    model = VQVAE(cfg.model_config(3, 16))
    adv = AdversarialStep.build(cfg, model, 3, torch.device("cpu"))
    assert adv.load_state_dict(None) == ["the discriminator starts fresh"]
    l1 = cfg.replace(disc_weight=0.0, rec_loss="l1")
    plain = AdversarialStep.build(l1, model, 3, torch.device("cpu"))
    assert plain.load_state_dict(adv.state_dict()) == [
        "the checkpoint's discriminator is dropped (--disc-weight 0)"
    ]


def test_preset_vqgan_trains_with_its_discriminator(tmp_path, no_finish):
    cfg = TrainConfig.build(preset="vqgan")
    assert (cfg.arch, cfg.rec_loss, cfg.disc_weight, cfg.disc_start) == ("vqgan", "l1", 0.8, 500)
    assert cfg.disc_start < cfg.steps  # no warning with the defaults
    out = tmp_path / "vqgan"
    args = ["train", "--preset", "vqgan", "--out", str(out), "--steps", "2", "--disc-start", "1"]
    args += ["--batch-size", "4", "--log-every", "2", "--eval-every", "2", "--eval-images", "8"]
    assert main([*args, "--no-progress", "--num-embeddings", "32", "--hidden", "32"]) == 0
    (train,) = [r for r in _records(out) if r["kind"] == "train"]
    assert train["disc_steps"] == 1 and "rec" in train and "d_loss" in train
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["model_config"]["arch"] == "vqgan" and ckpt["adversarial"]["optimizer"]["state"]


def test_perceptual_term_trains_and_is_evaluated(tmp_path, no_finish):
    from vqkit.losses.perceptual import VGG16_FILE

    from .test_perceptual import random_vgg_file

    vgg = tmp_path / VGG16_FILE
    random_vgg_file(vgg)  # a randomly initialised VGG16 in torchvision's layout
    out = tmp_path / "lpips"
    code = _train(
        out, 2, "--channels", "3", "--eval-ssim", disc_start=1, perceptual_weight=1.0,
        perceptual_weights=str(vgg), log_every=2, eval_every=2, eval_images=8,
    )  # fmt: skip
    assert code == 0
    train, ev = (r for r in _records(out) if r["kind"] in ("train", "eval"))
    assert train["perceptual"] > 0 and train["loss"] > train["rec"] and train["disc_steps"] == 1
    assert ev["lpips"] > 0 and {"ssim", "ms_ssim"} <= set(ev) and "labels" not in ev
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert set(ckpt["adversarial"]["loss"]) == {"discriminator"}  # LPIPS comes from its file
