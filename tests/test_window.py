"""Tests of vqkit's runtime window module: per-group counts summed and checkpointed."""

from __future__ import annotations

import torch

from vqkit.runtime.window import Window


def test_per_group_counts_sum_and_survive_a_checkpoint():
    a, b = torch.tensor([[1, 0, 2], [0, 3, 0]]), torch.tensor([[0, 1, 0], [4, 0, 0]])
    w = Window(3, per_group=True)
    w.add({"loss": 1.0}, a, 8)
    state = w.state_dict()
    resumed = Window(3, per_group=True)
    resumed.load_state_dict(state)
    for window in (w, resumed):
        window.add({"loss": 1.0}, b, 8)
        assert torch.equal(window.group_counts, a + b)
        assert torch.equal(window.counts, (a + b).sum(0))
    old = {k: v for k, v in state.items() if k != "group_counts"}  # a checkpoint before it
    resumed.load_state_dict(old)
    assert resumed.group_counts is None
    plain = Window(3)
    plain.add({"loss": 1.0}, a, 8)
    assert plain.group_counts is None  # without per_group only the pooled counts
    w.summary()
    assert w.group_counts is None  # a fresh window
