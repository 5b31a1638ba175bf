"""Tests of vqkit's config module."""

from __future__ import annotations

import json

import pytest

from vqkit.training.tokenizer import PRESETS, TrainConfig


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
    # strict JSON: a repeated option is not settled silently by the last one
    cfg_path.write_text('{"steps": 7, "lr": 1e-3, "steps": 70}')
    with pytest.raises(ValueError, match="not valid JSON: key 'steps' appears twice"):
        TrainConfig.from_file(cfg_path)
    cfg_path.write_text('{"lr": NaN}')
    with pytest.raises(ValueError, match="NaN is not a JSON value"):
        TrainConfig.from_file(cfg_path)


def test_preset_sets_defaults_and_explicit_values_win():
    cfg = TrainConfig.build(preset="vq-healthy")
    for key, value in PRESETS["vq-healthy"].items():
        assert getattr(cfg, key) == value
    cfg = TrainConfig.build(preset="vq-healthy", revive_every=7)
    assert cfg.revive_every == 7 and cfg.init == "kmeans"
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.build(preset="nope")
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(preset="nope")


def test_preset_from_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"preset": "ema-healthy", "dead_threshold": 0.5}')
    cfg = TrainConfig.from_file(path, steps=3)
    assert cfg.quantizer == "ema" and cfg.init == "kmeans" and cfg.dead_threshold == 0.5
    assert cfg.steps == 3


def test_preset_on_the_command_line_beats_the_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"quantizer": "ema", "steps": 10}')
    cfg = TrainConfig.from_file(path, preset="vq-healthy")
    assert cfg.quantizer == "vq" and cfg.init == "kmeans" and cfg.steps == 10
    cfg = TrainConfig.from_file(path, preset="vq-healthy", quantizer="ema")
    assert cfg.quantizer == "ema" and cfg.revive_every == PRESETS["vq-healthy"]["revive_every"]
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_file(path, preset="nope")


def test_step_and_data_options_are_checked():
    cfg = TrainConfig()
    assert (cfg.precision, cfg.compile, cfg.channels_last, cfg.prefetch) == (
        "fp32",
        False,
        False,
        False,
    )
    assert (cfg.warmup_steps, cfg.lr_schedule, cfg.grad_clip, cfg.weight_ema) == (
        0,
        "constant",
        0.0,
        0.0,
    )
    for bad in (
        {"precision": "fp8"},
        {"weight_ema": 1.0},
        {"grad_clip": -1.0},
        {"min_lr_ratio": 1.5},
        {"lr_schedule": "linear"},
        {"crop": "left"},
        {"crop_scale": 0.0},
        {"num_workers": -1},
        {"ckpt_minutes": -0.5},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_resume_applies_schedule_and_speed_options_but_not_the_data_layout():
    stored = TrainConfig().to_dict()
    changed = TrainConfig(
        lr_schedule="cosine", warmup_steps=10, grad_clip=1.0, precision="bf16", compile=True
    ).resume_changes(stored)
    assert set(changed) == {"lr_schedule", "warmup_steps", "grad_clip", "precision", "compile"}
    for fixed in ({"num_workers": 4}, {"crop": "random"}, {"crop_scale": 0.5}):
        with pytest.raises(ValueError, match="cannot change"):
            TrainConfig(**fixed).resume_changes(stored)
    # a run stored before these options existed resumes with their defaults
    old = {k: v for k, v in stored.items() if k not in ("precision", "weight_ema")}
    assert TrainConfig.for_resume(old, {}).resume_changes(old) == {}


def test_sizes_that_cannot_fit_are_refused_up_front(monkeypatch, tmp_path):
    """--image-size 100000 and --channel-mult 100000 failed inside numpy or the allocator:
    refused when the config is built, with the memory needed."""
    from vqkit.quantizers import base

    monkeypatch.setattr(base, "machine_memory", lambda: 16 << 30)
    with pytest.raises(ValueError, match=r"image_size 100000 .* 596.0 GiB per image"):
        TrainConfig.build(image_size=100000)
    with pytest.raises(ValueError, match=r"channel_mult 100000 needs at least \d+\.\d GiB"):
        TrainConfig.build(downsample=8, channel_mult="100000")
    assert TrainConfig.build(image_size=256, downsample=8, channel_mult="2").image_size == 256
    with pytest.raises(ValueError, match=r"--config .*: is a directory; give a JSON file"):
        TrainConfig.from_file(tmp_path)


def test_training_evaluations_report_ssim_and_ms_ssim_by_default(tmp_path):
    """The run's eval.json and its periodic eval records carry SSIM (both conventions)
    and MS-SSIM without a flag; --no-eval-ssim leaves them out."""
    from tests.test_cli import _run

    assert TrainConfig().eval_ssim is True
    out = _run(tmp_path, "run", 10)
    ev = json.loads((out / "eval.json").read_text())
    want = {"ssim", "ms_ssim", "ssim_skimage", "ssim_skimage_range2"}
    assert want <= set(ev) and want <= set(ev["labels"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if r.get("kind") == "eval"]
    assert periodic and all(want <= set(r) for r in periodic)
    off = _run(tmp_path, "off", 10, "--no-eval-ssim")
    assert not want & set(json.loads((off / "eval.json").read_text()))


@pytest.mark.parametrize(
    "flags, want",
    [
        # the last level's same-width convolutions (classic conv3, vqgan's ResNet blocks)
        # were left out of the count: these passed the check, then the allocator failed
        ({"downsample": 8, "hidden": 2, "channel_mult": "100000"}, "channel_mult 100000"),
        ({"arch": "vqgan", "hidden": 32, "channel_mult": "1,1,100000"}, "channel_mult 1,1"),
        # the discriminator was not checked at all
        ({"disc_weight": 0.1, "disc_channels": 1000000}, "disc_channels 1000000"),
        ({"disc_weight": 0.1, "disc_channels": 20000}, "disc_channels 20000"),
    ],
)
def test_networks_that_cannot_fit_are_refused_before_allocating(monkeypatch, flags, want):
    """--channel-mult / --disc-channels too large for memory: one UserError when the
    config is built, naming the flag and the GiB needed (before: allocator tracebacks
    "DefaultCPUAllocator: can't allocate memory" once the run had started)."""
    from vqkit.errors import UserError
    from vqkit.quantizers import base

    monkeypatch.setattr(base, "machine_memory", lambda: 16 << 30)
    with pytest.raises(UserError, match=want + r".* needs at least [\d.]+ GiB"):
        TrainConfig.build(**flags)
    # sizes that fit still build; a discriminator without --disc-weight is never made
    assert TrainConfig.build(disc_weight=0.1, disc_channels=512).disc_channels == 512
    assert TrainConfig.build(disc_channels=1000000).disc_weight == 0


def test_vqgan_widths_are_one_line_before_the_size_check():
    from vqkit.errors import UserError

    with pytest.raises(UserError, match="multiples of 32"):
        TrainConfig.build(arch="vqgan", hidden=48)
