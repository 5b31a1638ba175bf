"""BSQ: spherical codes, the exact per-sample entropy, and the factorised batch entropy
against the brute-force joint entropy (the gap of the approximation, measured)."""

from __future__ import annotations

import math

import pytest
import torch

from vqkit import BSQ
from vqkit.quantizers import build_quantizer

from .test_lfq import brute_entropies


def factorised_reference(u: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_i H(mean_n p_i(+|u_ni)) written out in float64 (the paper's approximation)."""
    d = u.shape[1]
    p = torch.sigmoid(4.0 * u / (math.sqrt(d) * tau)).mean(0)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)).sum()


def test_bsq_codes_indices_and_decode():
    torch.manual_seed(0)
    q = BSQ(6).train()
    x = torch.randn(2, 6, 7, requires_grad=True)
    out = q(x)
    u = torch.nn.functional.normalize(x.detach().movedim(1, -1), dim=-1)
    s = 1 / math.sqrt(6)
    assert torch.equal(out.quantized.movedim(1, -1), torch.where(u > 0, s, -s))
    torch.testing.assert_close(out.quantized.norm(dim=1), torch.ones(2, 7))
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.encode(x), out.indices)
    # gradient flows through the normalisation (straight-through from q to u)
    out.quantized.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("group_size", [1, 3, 8])
def test_bsq_entropy_terms_against_references(group_size):
    g = torch.Generator().manual_seed(group_size)
    d, tau = 8, 0.3
    x = torch.randn(3, d, 9, generator=g, dtype=torch.float64).float().requires_grad_(True)
    q = BSQ(d, entropy_group_size=group_size, temperature=tau, entropy_weight=1.0).train()
    out = q(x)
    u = torch.nn.functional.normalize(x.detach().movedim(1, -1).reshape(-1, d).double(), dim=-1)
    u.requires_grad_(True)
    per_ref, joint = brute_entropies(u, tau, scale=1 / math.sqrt(d))
    torch.testing.assert_close(
        out.losses["per_sample_entropy"].double(), per_ref, rtol=1e-5, atol=1e-6
    )
    bat = out.losses["batch_entropy"].double()
    if group_size == 1:
        torch.testing.assert_close(bat, factorised_reference(u.detach(), tau), rtol=1e-5, atol=1e-6)
        ref_x = x.detach().double().requires_grad_(True)
        ur = torch.nn.functional.normalize(ref_x.movedim(1, -1).reshape(-1, d), dim=-1)
        factorised_reference(ur, tau).backward()
        out.losses["batch_entropy"].backward()
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)
    if group_size >= d:  # one group: exact
        torch.testing.assert_close(bat, joint, rtol=1e-5, atol=1e-6)
        # gradients of the whole entropy term through the normalisation, vs brute force
        ref_x = x.detach().double().requires_grad_(True)
        ur = torch.nn.functional.normalize(ref_x.movedim(1, -1).reshape(-1, d), dim=-1)
        p_ref, j_ref = brute_entropies(ur, tau, scale=1 / math.sqrt(d))
        (p_ref - j_ref).backward()
        out.losses["entropy"].backward()
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-6)
    else:  # the factorisation bounds the joint entropy from above
        assert bat >= joint - 1e-5


def test_bsq_factorised_gap_is_measured():
    """The gap of the per-bit approximation (approx - exact joint entropy, nats; measured
    at tau = 0.05, d = 8, 512 rows: 0.13 for independent Gaussian directions, 3.34 when
    the 8 bits are 4 copies of 2 free ones; 0.02 / 1.44 at tau = 0.2)."""
    g = torch.Generator().manual_seed(0)
    d, tau = 8, 0.05
    q = BSQ(d, temperature=tau).train()
    u_indep = torch.nn.functional.normalize(
        torch.randn(512, d, generator=g, dtype=torch.float64), dim=-1
    )
    base = torch.randn(512, 2, generator=g, dtype=torch.float64)
    u_corr = torch.nn.functional.normalize(base.repeat(1, 4), dim=-1)  # 2 free bits of 8
    gaps = {}
    for name, u in (("independent", u_indep), ("correlated", u_corr)):
        approx = q._batch_entropy(q.bit_logits(u), None)
        exact = brute_entropies(u, tau, scale=1 / math.sqrt(d))[1]
        gaps[name] = float(approx - exact)
    assert 0 <= gaps["independent"] < 0.2
    # copies: the approximation counts each of the 2 free bits 4 times
    assert gaps["correlated"] > 3.0


def test_bsq_options():
    q = build_quantizer("bsq", 16, num_bits=8, entropy_group_size=4)
    assert isinstance(q, BSQ) and q.entropy_group_size == 4 and q.num_codes == 256
    with pytest.raises(ValueError):
        build_quantizer("bsq", 16, entropy_group_size=0)
    # a large grid with the factorised entropy: no 2^d marginal
    big = BSQ(40, 64).train()
    out = big(torch.randn(2, 64, 5))
    assert out.counts is None and torch.isfinite(out.loss)


def test_bsq_refuses_an_entropy_group_too_large_at_construction():
    with pytest.raises(ValueError, match="entropy_group_size must be <= 24"):
        BSQ(30, entropy_group_size=25)
    with pytest.raises(ValueError, match="entropy_group_size must be <= 24"):
        build_quantizer("bsq", 16, num_bits=40, entropy_group_size=30)
    BSQ(30, entropy_group_size=24)  # the largest exact group
    BSQ(20, entropy_group_size=99)  # capped at num_bits: one exact group of 20 bits
    BSQ(30, entropy_group_size=25, entropy_weight=0.0)  # no entropy term: nothing to build


def test_bsq_eval_compiles_to_one_graph_and_autocast():
    q = BSQ(8, 16)
    x = torch.randn(2, 16, 5)
    q.eval()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    plain, x8 = BSQ(8), x[:, :8]  # no projection: the sign runs in float32 under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain.train()(x8.clone().requires_grad_(True))
    assert out.loss.dtype == torch.float32 and out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, plain.eval()(x8).indices)
