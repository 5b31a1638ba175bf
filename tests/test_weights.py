"""vqkit.models.weights: tied tensors stored once and tied again, and the strict loader's
one-line refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vqkit.models.weights import (
    export_safetensors,
    load_state_strict,
    read_safetensors,
)
from vqkit.storage.checkpoint import CheckpointError


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
