"""vqkit.storage.weights: tied tensors stored once and tied again, the strict loader's
one-line refusals, and other networks' weights files (prefix, ignored counters, NaN)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vqkit.errors import UserError
from vqkit.storage.checkpoint import CheckpointError
from vqkit.storage.weights import (
    export_safetensors,
    load_state_strict,
    load_weights_file,
    read_safetensors,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("count", torch.arange(5.0))
        self.config = SimpleNamespace(to_dict=lambda: {"name": "tied"})  # stored as metadata


def test_tied_tensors_are_stored_once_and_restored(tmp_path):
    from safetensors import safe_open

    model = Tied()
    export_safetensors(model, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["count", "emb.weight"]
    config, state = read_safetensors(tmp_path / "w.safetensors")
    assert config == {"name": "tied"} and torch.equal(state["head.weight"], model.emb.weight)
    fresh = Tied()
    load_state_strict(fresh, state, "w")
    assert (
        torch.equal(fresh.head.weight, model.emb.weight) and fresh.head.weight is fresh.emb.weight
    )


def test_strict_loader_names_the_problem_in_one_line():
    model = Tied()
    state = model.state_dict()
    for broken, message in (
        ({k: v for k, v in state.items() if k != "count"}, "missing count"),
        ({**state, "x.y": torch.zeros(1)}, "unexpected x.y"),
        ({**state, "count": torch.zeros(4)}, r"other shapes: count \(4,\) \(model: \(5,\)\)"),
    ):
        with pytest.raises(CheckpointError, match=message) as info:
            load_state_strict(Tied(), broken, "f.safetensors")
        assert "\n" not in str(info.value) and str(info.value).startswith("f.safetensors: ")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.scale = nn.Parameter(torch.ones(3))


def test_weights_file_strict_with_prefix_and_ignored_counters(tmp_path):
    torch.manual_seed(0)
    src = Net()
    state = {f"features.{k}": v for k, v in src.state_dict().items()}
    state["classifier.weight"] = torch.zeros(2)  # outside the prefix: not the module's
    state["features.bn.num_batches_tracked"] = torch.tensor(7)  # an ignored counter
    path = tmp_path / "net.pth"
    torch.save(state, path)
    dst = Net()
    load_weights_file(
        dst,
        path,
        what="the test net",
        hint="h",
        prefix="features.",
        ignore=("num_batches_tracked",),
    )
    assert torch.equal(dst.conv.weight, src.conv.weight)
    st = tmp_path / "net.safetensors"  # the same from safetensors
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    load_weights_file(Net(), st, what="the test net", hint="h")


def test_bad_weights_files_are_one_line_user_errors_naming_the_file(tmp_path):
    good = {k: v.clone() for k, v in Net().state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "scale"}, "missing scale; get it"),
        "unexpected": ({**good, "extra": torch.zeros(1)}, "unexpected extra; get it"),
        "shape": ({**good, "scale": torch.ones(4)}, r"other shapes: scale \(4,\) \(model"),
        "nan": (
            {**good, "scale": torch.tensor([1.0, float("nan"), 1.0])},
            r"NaN or Inf\) in scale",
        ),
        "notdict": ([torch.zeros(1)], "not a state dict of tensors"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(state, path)
        with pytest.raises(UserError, match=message) as info:
            load_weights_file(Net(), path, what="the test net", hint="get it")
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    trunc = tmp_path / "trunc.pth"
    torch.save(good, trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    for path, message in (
        (trunc, "cannot read the test net weights file"),
        (tmp_path, "not found"),
    ):
        with pytest.raises(UserError, match=message) as info:
            load_weights_file(Net(), path, what="the test net", hint="get it")
        assert "\n" not in str(info.value) and str(path) in str(info.value)
