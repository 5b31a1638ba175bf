"""LFQ and the exact tiled entropy terms, against brute-force float64 references over all
2^d codes (d <= 8)."""

from __future__ import annotations

import pytest
import torch

from vqkit import LFQ
from vqkit.quantizers import build_quantizer
from vqkit.quantizers.entropy import _groups, _tile_rows, batch_entropy, per_sample_entropy


def all_codes(d: int, scale: float = 1.0) -> torch.Tensor:
    """(2^d, d) float64 codes, row c = bits of c (channel 0 least significant) as +-scale."""
    c = torch.arange(2**d).unsqueeze(1)
    return (((c >> torch.arange(d)) & 1).double() * 2 - 1) * scale


def brute_entropies(u: torch.Tensor, tau: float, scale: float = 1.0):
    """(per-sample, batch) entropy of p(c|u) ∝ exp(-||u - c||^2 / tau), dense N x 2^d."""
    codes = all_codes(u.shape[1], scale)
    logits = -((u[:, None, :] - codes[None]) ** 2).sum(-1) / tau
    p = logits.softmax(-1)
    per = -torch.special.xlogy(p, p).sum(-1).mean()
    pbar = p.mean(0)
    return per, -torch.special.xlogy(pbar, pbar).sum()


@pytest.mark.parametrize("d", [1, 2, 5, 8])
@pytest.mark.parametrize("scratch", [2**20, 300])
def test_entropies_match_brute_force_values_and_gradients(d, scratch):
    g = torch.Generator().manual_seed(d)
    u = (torch.randn(45, d, generator=g, dtype=torch.float64) * 0.8).requires_grad_(True)
    tau = 0.6
    per_ref, bat_ref = brute_entropies(u, tau)
    gp_ref, gb_ref = (torch.autograd.grad(t, u, retain_graph=True)[0] for t in (per_ref, bat_ref))
    a = u * (4.0 / tau)
    per = per_sample_entropy(a)
    bat = batch_entropy(a, max_scratch_bytes=scratch)  # 300 B: tiles of a few rows
    gp, gb = (torch.autograd.grad(t, u, retain_graph=True)[0] for t in (per, bat))
    torch.testing.assert_close(per, per_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bat, bat_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gp, gp_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-10, atol=1e-12)


def test_entropies_float32_and_masked_rows():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(60, 7, generator=g, dtype=torch.float64)
    keep = torch.rand(60, generator=g) > 0.4
    u32 = u.float().requires_grad_(True)
    bat = batch_entropy(u32 * 4.0, keep, max_scratch_bytes=4096)
    per = per_sample_entropy(u32 * 4.0, keep)
    (bat - 0.5 * per).backward()
    ref_u = u[keep].clone().requires_grad_(True)
    per_ref, bat_ref = brute_entropies(ref_u, 1.0)
    (bat_ref - 0.5 * per_ref).backward()
    torch.testing.assert_close(bat.double(), bat_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per.double(), per_ref, rtol=1e-5, atol=1e-5)
    assert torch.all(u32.grad[~keep] == 0)  # padded rows: no gradient
    torch.testing.assert_close(u32.grad[keep].double(), ref_u.grad, rtol=1e-4, atol=1e-5)


def test_batch_entropy_memory_is_bounded_by_the_scratch():
    """The row tile times the live columns fits the scratch; no N x 2^d buffer."""
    for d, scratch in ((18, 32 * 2**20), (16, 2**20), (9, 4096)):
        groups = _groups(d, d, torch.float32, torch.device("cpu"))
        tile = _tile_rows(16384, groups, 4, scratch)
        width = max(g.ka + g.kb for g in groups)
        assert tile * width * 4 * 4 <= max(scratch, width * 16)
        assert tile * width < 16384 * 2**d / 8


def test_lfq_forward_indices_decode_and_loss():
    torch.manual_seed(0)
    q = LFQ(5, entropy_weight=0.2, diversity_gamma=0.7, commitment_cost=0.3, temperature=0.5)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).float().requires_grad_(True)
    out = q.train()(x)
    flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 5).double()
    bits = (flat > 0).long()
    assert torch.equal(out.indices.reshape(-1), (bits * 2 ** torch.arange(5)).sum(1))
    assert torch.equal(out.quantized, torch.where(x > 0, 1.0, -1.0))
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.encode(x), out.indices)
    per, bat = brute_entropies(flat, 0.5)
    commit = ((flat - torch.where(flat > 0, 1.0, -1.0)) ** 2).mean()
    want = 0.3 * commit + 0.2 * (per - 0.7 * bat)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["batch_entropy"].double(), bat, rtol=1e-5, atol=1e-6)
    # straight-through: the gradient of quantized.sum() is one per element
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert out.counts.sum() == 24 and out.counts.shape == (32,)
    # eval: commitment only, no entropy
    ev = q.eval()(x)
    assert set(ev.losses) == {"commitment"}


def test_lfq_projection_usage_and_large_grids():
    torch.manual_seed(0)
    q = LFQ(6, 16, usage_decay=0.5).train()
    x = torch.randn(3, 16, 10)  # a sequence (B, D, T)
    out = q(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (3, 10)
    torch.testing.assert_close(q.decode(out.indices), out.quantized)
    (out.loss + out.quantized.sum()).backward()
    assert q.project_in.weight.grad is not None and q.project_out.weight.grad is not None
    assert torch.allclose(q.code_usage(), out.counts.float())  # debiased after 1 step
    with pytest.raises(ValueError, match="marginal"):
        LFQ(30)
    big = LFQ(30, max_bincount=2**20, entropy_weight=0.0).train()
    o = big(torch.randn(4, 30, 3))
    assert o.counts is None and big.code_usage() is None and big.num_codes == 2**30


def test_lfq_autocast_and_compile():
    torch.manual_seed(0)
    q = LFQ(8, 12)
    x = torch.randn(2, 12, 5)
    ref = q.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q.train()(x.clone().requires_grad_(True))
    assert out.loss.dtype == torch.float32 and out.quantized.dtype == torch.float32
    q.eval()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    got = torch.compile(q, backend="eager", fullgraph=True)(x)
    assert torch.equal(got.indices, ref.indices)


def test_lfq_options_and_validation():
    q = build_quantizer("lfq", 32, num_bits=12, entropy_weight=0.05)
    assert isinstance(q, LFQ) and q.num_codes == 4096 and q.project_in is not None
    with pytest.raises(ValueError):
        LFQ(0)
    with pytest.raises(ValueError):
        LFQ(4, temperature=0.0)
    with pytest.raises(ValueError):
        build_quantizer("lfq", 8, temperature=-1.0)
    with pytest.raises(ValueError):
        LFQ(4).decode(torch.tensor([[16]]))
