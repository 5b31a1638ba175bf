"""Tests of vqkit's fsq module."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vqkit import FSQ

from .reference import flat_channels_first


def close64(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def fsq_reference(z, levels, eps=1e-3):
    """float64 bound + round + normalise + mixed-radix index, from the module docstring."""
    z = z.double()
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + eps) / 2
    offset = (lv % 2 == 0).double() * 0.5
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    levels_int = torch.round(bounded)
    hw = torch.floor(lv / 2)
    digits = (levels_int + hw).long()
    radix = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))])
    return levels_int / hw, (digits * radix).sum(-1), levels_int


@pytest.mark.parametrize("levels", [[3], [2, 3], [8, 5, 5, 5], [4, 4, 6]])
def test_fsq_index_code_bijection_over_whole_grid(levels):
    fsq = FSQ(levels)
    k = math.prod(levels)
    idx = torch.arange(k)
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (k, len(levels))
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # every code is distinct and lies on the grid of each channel
    assert torch.unique(codes, dim=0).shape[0] == k
    for i, n in enumerate(levels):
        ints = sorted(set((codes[:, i] * (n // 2)).round().long().tolist()))
        assert ints == list(range(-(n // 2), n - n // 2))  # even n: {-n/2, ..., n/2 - 1}
    # the grid enumerated independently, channel 0 least significant
    ref = torch.tensor(list(itertools.product(*[range(n) for n in reversed(levels)])))
    ref = ref.flip(-1)  # (k, d) digits, row r is index r
    hw = torch.tensor([n // 2 for n in levels], dtype=torch.float64)
    close64(codes, (ref - hw) / hw, rtol=1e-7, atol=0)
    # decode is the same map, laid out channels-first
    assert torch.equal(fsq.decode(idx.reshape(1, k)), codes.t().reshape(1, len(levels), k))


def test_fsq_even_levels_use_half_integer_offset():
    fsq = FSQ([8, 5])
    z = torch.tensor([[-50.0, -50.0], [0.0, 0.0], [50.0, 50.0]])
    out = fsq(z)
    # L = 8: levels -4 .. 3 (normalised by 4); L = 5: -2 .. 2 (by 2); bound(0) == 0
    torch.testing.assert_close(out.quantized, torch.tensor([[-1.0, -1.0], [0.0, 0.0], [0.75, 1.0]]))
    torch.testing.assert_close(fsq.bound(torch.zeros(2)), torch.zeros(2), atol=1e-7, rtol=0)
    assert out.indices.tolist() == [0, 4 + 8 * 2, 7 + 8 * 4]


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 6, 2]])
def test_fsq_forward_matches_float64_reference(levels):
    torch.manual_seed(0)
    d = len(levels)
    fsq = FSQ(levels)
    x = (torch.randn(3, d, 6, 5) * 2).requires_grad_(True)
    out = fsq(x)
    flat = flat_channels_first(x.detach())
    q, idx, _ = fsq_reference(flat, levels)
    # near a rounding boundary float32 and float64 may disagree; there are none here
    assert torch.equal(out.indices.reshape(-1), idx)
    close64(flat_channels_first(out.quantized.detach()), q, rtol=0, atol=1e-7)
    assert out.losses == {} and float(out.loss) == 0.0
    assert out.indices.shape == (3, 6, 5)
    k = math.prod(levels)
    counts = torch.bincount(idx, minlength=k).double()
    p = counts / counts.sum()
    close64(out.perplexity, torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    close64(out.usage, (counts > 0).double().mean())
    assert torch.equal(fsq.decode(out.indices), out.quantized.detach())
    # straight-through rounding: the gradient is that of the bound divided by L // 2
    g = torch.randn_like(x)
    (out.quantized * g).sum().backward()
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    shift = torch.atanh(((lv % 2 == 0).double() * 0.5) / half_l)
    dbound = (1 - torch.tanh(flat.double() + shift) ** 2) * half_l / torch.floor(lv / 2)
    close64(flat_channels_first(x.grad), dbound * flat_channels_first(g.double()), rtol=1e-5)


def test_fsq_huge_grid_uses_unique_counts_and_no_codebook():
    levels = [1000] * 6  # 1e18 codes
    fsq = FSQ(levels)
    assert fsq.num_codes == 1000**6
    assert sum(b.numel() for b in fsq.buffers()) < 100 and list(fsq.parameters()) == []
    x = torch.randn(4, 6, 8)
    out = fsq(x)
    assert out.counts is None
    n_unique = torch.unique(out.indices).numel()
    torch.testing.assert_close(out.usage, torch.tensor(n_unique / 1000**6))
    assert torch.equal(fsq.decode(out.indices), out.quantized)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(out.indices)), out.indices)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        FSQ([2**32, 2**31])


def test_fsq_projection_and_channels_last():
    torch.manual_seed(0)
    fsq = FSQ([8, 5, 5, 5], dim=16, channels_last=True)
    x = torch.randn(2, 3, 3, 16, requires_grad=True)
    out = fsq(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (2, 3, 3)
    torch.testing.assert_close(fsq.decode(out.indices), out.quantized.detach())
    out.quantized.sum().backward()
    assert x.grad is not None and fsq.project_in.weight.grad is not None
    assert torch.equal(fsq.encode(x), out.indices)
    with pytest.raises(ValueError):
        FSQ([8, 1])
    with pytest.raises(ValueError):
        FSQ([8, 5], dim=1)
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        FSQ([8, 5]).decode(torch.tensor([40]))


def test_fsq_tracks_usage_for_small_grids_only():
    from vqkit.quantizers import FSQ

    q = FSQ([3, 3], usage_decay=0.5).train()
    x = torch.randn(4, 2, 3, 3)
    counts = q(x).counts
    torch.testing.assert_close(q.code_usage(), counts.float())  # debiased after one step
    assert "usage_ema" in q.state_dict()
    big = FSQ([8, 8], max_bincount=10).train()
    big(torch.randn(2, 2, 3, 3))
    assert not big.tracks_usage and big.code_usage() is None
    with pytest.raises(RuntimeError, match="usage"):
        big.dead_codes()
