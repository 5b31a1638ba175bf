"""Tests of vqkit.quantizers.softmax_entropy: the tiled entropy terms of IBQ against a
dense float64 reference (values and gradients), tiling, padding and an empty batch."""

from __future__ import annotations

import pytest
import torch

from vqkit.quantizers.softmax_entropy import softmax_entropy_terms


def dense_reference(x: torch.Tensor, e: torch.Tensor, t: float, gamma_s: float, gamma_b: float):
    """gamma_s * mean_n H(p_n) + gamma_b * H(mean_n p_n), p = softmax(x E^T / t), float64."""
    x = x.detach().double().requires_grad_()
    e = e.detach().double().requires_grad_()
    logp = torch.log_softmax(x @ e.t() / t, dim=1)
    p = logp.exp()
    sample = -(p * logp).sum(1).mean()
    big_p = p.mean(0)
    batch = -(big_p * torch.log(big_p)).sum()
    (gamma_s * sample + gamma_b * batch).backward()
    return sample.detach(), batch.detach(), x.grad, e.grad


@pytest.mark.parametrize("t", [1.0, 0.05])
@pytest.mark.parametrize("scratch", [16 * 2**20, 8 * 24 * 4])  # one tile; many small tiles
def test_values_and_gradients_match_float64_dense(t, scratch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 6, generator=g).requires_grad_()
    e = torch.randn(50, 6, generator=g).requires_grad_()
    sample, batch = softmax_entropy_terms(x, e, t, max_scratch_bytes=scratch)
    (0.7 * sample - 1.3 * batch).backward()
    rs, rb, rgx, rge = dense_reference(x, e, t, 0.7, -1.3)
    torch.testing.assert_close(sample.double(), rs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.double(), rb, rtol=1e-5, atol=1e-5)
    # float32 logits carry errors ~ eps / t: the gradient tolerance scales with 1 / t
    torch.testing.assert_close(x.grad.double(), rgx, rtol=1e-4, atol=1e-5 / t)
    torch.testing.assert_close(e.grad.double(), rge, rtol=1e-4, atol=1e-5 / t)


def test_padded_rows_are_left_out():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g).requires_grad_()
    e = torch.randn(9, 4, generator=g)
    keep = torch.arange(20) % 3 != 0
    sample, batch = softmax_entropy_terms(x, e, 0.5, keep)
    (sample + batch).backward()
    rs, rb, rgx, _ = dense_reference(x[keep], e, 0.5, 1.0, 1.0)
    torch.testing.assert_close(sample.double(), rs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.double(), rb, rtol=1e-5, atol=1e-6)
    assert torch.all(x.grad[~keep] == 0)
    torch.testing.assert_close(x.grad[keep].double(), rgx, rtol=1e-4, atol=1e-6)


def test_extreme_logits_stay_finite_and_empty_batch_gives_zeros():
    x = torch.tensor([[300.0, 0.0], [-300.0, 0.0]], requires_grad=True)
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    sample, batch = softmax_entropy_terms(x, e, 0.01)
    (sample - batch).backward()
    assert torch.isfinite(sample) and torch.isfinite(batch)
    assert torch.isfinite(x.grad).all() and torch.isfinite(e.grad).all()
    assert abs(batch.item() - float(torch.log(torch.tensor(2.0)))) < 1e-5  # two codes, half each
    empty = torch.zeros(0, 2, requires_grad=True)
    s0, b0 = softmax_entropy_terms(empty, e, 1.0)
    assert s0.item() == 0.0 and b0.item() == 0.0
    (s0 + b0).backward()
    with pytest.raises(ValueError, match="temperature"):
        softmax_entropy_terms(x, e, 0.0)
