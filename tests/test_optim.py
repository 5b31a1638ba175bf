"""Tests of the weight average (vqkit.training.optim)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqkit.training.optim import WeightEMA


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
