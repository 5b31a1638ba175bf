"""Tests of vqkit's feature_net module: ``vqkit features`` trains, measures and saves a
classifier whose file carries its accuracy and sha256; loading checks both."""

from __future__ import annotations

import json

import pytest
import torch

from vqkit.cli import main
from vqkit.data import load_dataset
from vqkit.evaluation.feature_net import FeatureNet, VqkitFeatures, load_feature_net


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("feat") / "fmnist-small"
    args = ["features", "--data", "builtin", "--out", str(out), "--steps", "30", "--width", "8"]
    assert main(args + ["--batch-size", "64"]) == 0
    return out


def test_features_command_writes_a_checked_network(feature_dir, capsys):
    info = json.loads((feature_dir / "features.json").read_text())
    assert info["name"] == "fmnist-small" and info["test_images"] == 1000
    assert info["test_accuracy"] > 0.3  # 10 classes: well above chance after 30 steps
    net, meta = load_feature_net(feature_dir)
    assert meta["sha256"] == info["sha256"] and meta["test_accuracy"] == info["test_accuracy"]
    ext = VqkitFeatures(feature_dir)
    test = load_dataset("builtin", "test")
    f = ext(test.images[:5])
    assert f.shape == (5, 32) and ext.num_features == 32
    d = ext.describe()
    assert not d["comparable_with_papers"] and "not comparable with papers' rFID" in d["note"]
    assert d["feature_space"] == "vqkit-features fmnist-small (32-d)"
    with pytest.raises(ValueError, match=r"takes uint8 images \(1, 28, 28\)"):
        ext(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


def test_altered_missing_or_foreign_files_are_refused(feature_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="make one with vqkit features"):
        load_feature_net(tmp_path / "none")
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (feature_dir / "features.safetensors").read_bytes()
    (bad / "features.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read feature network"):
        load_feature_net(bad)
    changed = tmp_path / "changed"
    changed.mkdir()
    from safetensors.torch import load_file, save_file

    state = load_file(str(feature_dir / "features.safetensors"))
    state["head.bias"] = state["head.bias"] + 1
    from safetensors import safe_open

    with safe_open(str(feature_dir / "features.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(state, str(changed / "features.safetensors"), metadata=meta)
    (changed / "features.json").write_text((feature_dir / "features.json").read_text())
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_feature_net(changed)
    save_file(
        {k: v for k, v in FeatureNet(1, 2, 4).state_dict().items()},
        str(tmp_path / "x.safetensors"),
    )
    with pytest.raises(ValueError, match="not a vqkit feature network"):
        load_feature_net(tmp_path / "x.safetensors")


def test_features_command_bad_input(tmp_path, capsys):
    assert main(["features", "--data", "builtin", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_features_refuses_to_replace_a_network_without_overwrite(feature_dir, tmp_path, capsys):
    """issue 36: a second ``vqkit features`` into the same folder replaced the network (and
    every FD measured with it) silently; now it refuses before loading any data."""
    before = (feature_dir / "features.safetensors").read_bytes()
    args = ["features", "--data", str(tmp_path / "no-such-data"), "--out", str(feature_dir)]
    assert main([*args, "--steps", "2", "--width", "4"]) == 2
    err = capsys.readouterr().err
    assert "features.safetensors exists" in err and "--overwrite" in err
    assert err.count("\n") == 1  # refused before the (missing) data is read
    assert (feature_dir / "features.safetensors").read_bytes() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "features.json").write_text("{}")  # either file counts
    args = ["features", "--data", "builtin", "--out", str(copy), "--steps", "2", "--width", "4"]
    assert main(args) == 2
    assert "features.json exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((copy / "features.json").read_text())["steps"] == 2
