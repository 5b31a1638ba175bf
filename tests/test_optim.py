"""Tests of vqkit's optim module: learning-rate schedule and weight average."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vqkit.training.optim import Schedule, WeightEMA, lr_factor


def test_constant_schedule_is_exactly_one():
    for step in (0, 1, 99, 10**6):
        assert lr_factor(step, total_steps=100) == 1.0


def test_warmup_then_cosine_matches_the_closed_form():
    total, warm, r = 110, 10, 0.1
    for step in range(total):
        f = lr_factor(step, total_steps=total, warmup_steps=warm, schedule="cosine", min_lr_ratio=r)
        if step < warm:
            want = (step + 1) / warm
        else:
            want = r + (1 - r) * (1 + math.cos(math.pi * (step - warm) / (total - warm))) / 2
        assert f == pytest.approx(want, rel=1e-12, abs=1e-15), step
    # continuous at the end of the warmup, ends near the floor, clamped past the end
    assert lr_factor(warm, total_steps=total, warmup_steps=warm, schedule="cosine") == 1.0
    assert lr_factor(
        total - 1, total_steps=total, warmup_steps=warm, schedule="cosine", min_lr_ratio=r
    ) == pytest.approx(r, abs=3e-3)
    assert lr_factor(10 * total, total_steps=total, schedule="cosine", min_lr_ratio=r) == r
    assert lr_factor(3, total_steps=total, warmup_steps=warm) == 0.4  # warmup, then constant
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total_steps=1, schedule="linear")


def test_schedule_warms_up_then_follows_its_kind():
    s = Schedule(total_steps=110, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert [s.lr(1.0, k) for k in range(3)] == pytest.approx([0.1, 0.2, 0.3], abs=1e-15)
    assert s.lr(1.0, 9) == 1.0 and s.lr(1.0, 10) == 1.0  # end of warm-up: the peak
    assert math.isclose(s.lr(2.0, 60), 1.1)  # half way down the cosine: 2 * (1 + 0.1) / 2
    assert math.isclose(s.lr(1.0, 110), 0.1) and math.isclose(s.lr(1.0, 500), 0.1)
    assert Schedule(total_steps=5).lr(0.3, 4) == 0.3  # constant: the base rate exactly
    with pytest.raises(ValueError, match="schedule must be one of"):
        Schedule(total_steps=5, kind="linear")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("stat", torch.zeros(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def test_weight_ema_matches_a_float64_reference():
    torch.manual_seed(0)
    net = _Net()
    ema = WeightEMA(net, 0.9)
    ref = {k: v.double().clone() for k, v in net.state_dict().items()}
    for n in range(6):
        with torch.no_grad():  # a "step": move the weights and buffers
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net.stat.add_(1.0)
            net.count.add_(1)
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))  # warmup: 0.1, 0.18, ... then 0.9
        for k, v in net.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
    for k, s in ema.shadow.items():
        assert s.dtype == (torch.float32 if s.is_floating_point() else torch.int64)
        assert torch.allclose(s.double(), ref[k], rtol=1e-6, atol=1e-6), k
    assert int(ema.shadow["count"]) == 6 and ema.updates == 6
    copy = ema.copy_to(_Net())
    assert torch.equal(copy.lin.weight, ema.shadow["lin.weight"])
    assert not torch.equal(copy.lin.weight, net.lin.weight)


def test_weight_ema_state_round_trip_and_row_reset():
    torch.manual_seed(0)
    net = _Net()
    ema = WeightEMA(net, 0.99)
    with torch.no_grad():
        net.lin.weight.add_(1.0)
    ema.update(net)
    other = WeightEMA(_Net(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.decay == 0.5  # the decay stays this run's
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    rows = torch.tensor([True, False, False, True])
    ema.reset_rows(net, "lin.", rows)  # rows of entries with 4 rows: weight, bias
    assert torch.equal(ema.shadow["lin.weight"][rows], net.lin.weight[rows])
    assert not torch.equal(ema.shadow["lin.weight"][~rows], net.lin.weight[~rows])
    assert torch.equal(ema.shadow["lin.bias"][rows], net.lin.bias[rows])
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(net, 1.0)
