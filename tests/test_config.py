"""Tests of vqkit's config module."""

from __future__ import annotations

import json

import pytest

from vqkit.train import PRESETS, TrainConfig


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
