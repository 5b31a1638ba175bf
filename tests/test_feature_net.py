"""Tests of vqkit's feature_net module: ``vqkit features`` trains, measures and saves a
classifier whose file carries its accuracy and sha256; loading checks both."""

from __future__ import annotations

import json
import re

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


def _damaged(tmp_path, name: str):
    """A small saved network (no training), then one kind of damage; its folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vqkit.evaluation.feature_net import save_feature_net

    d = tmp_path / name
    save_feature_net(FeatureNet(1, 10, 4), d, {"name": "n", "image_size": 28, "data": "x"})
    st, side = d / "features.safetensors", d / "features.json"
    with safe_open(str(st), "pt") as f:
        info = json.loads(f.metadata()["info"])
    # copies: load_file maps the file, which the damage below rewrites
    state = {k: v.clone() for k, v in load_file(str(st)).items()}

    def rewrite(state, info) -> None:  # a consistent file whose sidecar is dropped
        side.unlink()
        meta = {"info": info if isinstance(info, str) else json.dumps(info)}
        save_file(state, str(st), metadata=meta)

    if name == "truncated":
        st.write_bytes(st.read_bytes()[:300])
    elif name == "torch_pickle":
        torch.save(state, st)
    elif name == "missing_key":
        rewrite({k: v for k, v in state.items() if k != "head.bias"}, info)
    elif name == "extra_key":
        rewrite({**state, "extra.weight": torch.zeros(2)}, info)
    elif name == "wrong_shape":
        rewrite({**state, "head.bias": torch.zeros(3)}, info)
    elif name == "nan":
        rewrite({**state, "head.bias": torch.full((10,), float("nan"))}, info)
    elif name == "weights_a_folder":
        st.unlink()
        st.mkdir()
    elif name == "sidecar_not_json":
        side.write_text("{oops")
    elif name == "sidecar_a_list":
        side.write_text("[1]")
    elif name == "sidecar_a_folder":
        side.unlink()
        side.mkdir()
    elif name == "info_not_json":
        rewrite(state, "{oops")
    elif name == "info_not_a_dict":
        rewrite(state, "3")
    elif name == "info_missing_width":
        rewrite(state, {k: v for k, v in info.items() if k != "width"})
    elif name == "info_width_a_string":
        rewrite(state, {**info, "width": "x"})
    elif name == "info_without_image_size":
        rewrite(state, {k: v for k, v in info.items() if k != "image_size"})
    elif name == "info_huge_width":  # metadata that would allocate a huge network
        rewrite(state, {**info, "width": 10**7})
    return d


DAMAGES = {
    "truncated": "cannot read feature network",
    "torch_pickle": "cannot read feature network",
    "missing_key": "missing head.bias",
    "extra_key": "unexpected extra.weight",
    "wrong_shape": r"head.bias \(3,\)",
    "nan": "non-finite values",
    "weights_a_folder": "is not a file",
    "sidecar_not_json": "features.json",
    "sidecar_a_list": "features.json",
    "sidecar_a_folder": "features.json",
    "info_not_json": "metadata",
    "info_not_a_dict": "not a vqkit feature network",
    "info_missing_width": "width",
    "info_width_a_string": "width",
    "info_without_image_size": "image_size",
    "info_huge_width": "width",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_feature_network_is_one_line_naming_the_file(tmp_path, damage):
    """Each damage is a one-line UserError naming the damaged file (issue 36, item 14);
    before: tracebacks (KeyError, AttributeError, JSONDecodeError, TypeError), "weights do
    not match its config (Error(s) in loading state_dict for FeatureNet:)", a NaN
    accepted."""
    from vqkit.errors import UserError

    d = _damaged(tmp_path, damage)
    with pytest.raises(UserError) as e:
        VqkitFeatures(d)(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg, msg
    assert re.search(DAMAGES[damage], msg), msg


def test_weights_without_sidecar_still_load(tmp_path):
    """The safetensors file carries its info: a network copied without features.json
    loads (its sha256 is then taken from the file)."""
    d = tmp_path / "alone"
    from vqkit.evaluation.feature_net import save_feature_net

    save_feature_net(FeatureNet(1, 10, 4), d, {"name": "n", "image_size": 28, "data": "x"})
    (d / "features.json").unlink()
    net, info = load_feature_net(d / "features.safetensors")
    assert info["width"] == 4 and len(info["sha256"]) == 64


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
