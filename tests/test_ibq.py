"""IBQ: the tiled straight-through-softmax lookup against a dense autograd reference
(values, indices, gradients to x and E; exact and near ties), and the layer's losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqkit import IBQ
from vqkit.quantizers import build_quantizer, ibq_lookup


def dense_ibq(x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formula, dense N x K: (onehot + p - sg[p]) @ E."""
    logits = x @ e.t()
    p = logits.softmax(1)
    idx = logits.argmax(1)
    hard = F.one_hot(idx, e.shape[0]).to(x.dtype)
    return (hard + p - p.detach()) @ e, idx


def compare(x, e, scratch, rtol=1e-10, atol=1e-12):
    g = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    xa, ea = x.clone().requires_grad_(True), e.clone().requires_grad_(True)
    q_ref, i_ref = dense_ibq(xa, ea)
    gx_ref, ge_ref = torch.autograd.grad((q_ref * g).sum(), (xa, ea))
    xb, eb = x.clone().requires_grad_(True), e.clone().requires_grad_(True)
    q, i = ibq_lookup(xb, eb, max_scratch_bytes=scratch)
    gx, ge = torch.autograd.grad((q * g).sum(), (xb, eb))
    assert torch.equal(i, i_ref)
    assert torch.equal(q, e[i])  # exactly the chosen code (the dense (hard + p - p) @ E
    torch.testing.assert_close(q, q_ref.detach(), rtol=rtol, atol=atol)  # only up to rounding)
    torch.testing.assert_close(gx, gx_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(ge, ge_ref, rtol=rtol, atol=atol)


# 2**20: whole-row tiles (ibq_terms); 8 * 7 * 2 * 5: code tiles (_IBQLookup), 5 x 7
@pytest.mark.parametrize("scratch", [2**20, 8 * 7 * 2 * 5], ids=["whole-rows", "code-tiles"])
def test_ibq_lookup_matches_dense_reference(scratch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 6, generator=gen, dtype=torch.float64)
    e = torch.randn(41, 6, generator=gen, dtype=torch.float64)
    compare(x, e, scratch)
    compare(x.float(), e.float(), scratch, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scratch", [2**20, 8 * 7 * 2 * 4], ids=["whole-rows", "code-tiles"])
def test_ibq_lookup_ties_and_near_ties(scratch):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    e = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    top = (x @ e.t()).argmax(1)
    # exact tie: a duplicate of row 0's best code at a higher index, in another tile
    e[27] = e[top[0]]
    # near tie for row 1: a code whose logit is 1e-9 below the best one
    best = e[top[1]]
    e[22] = best - 1e-9 * x[1] / x[1].dot(x[1])
    compare(x, e, scratch)  # code tiles of 7 codes: 22 and 27 in later tiles than most
    _, idx = ibq_lookup(x, e, max_scratch_bytes=scratch)
    assert idx[0] == min(int(top[0]), 27) and idx[1] == top[1]


def test_ibq_layer_losses_and_every_code_learns():
    torch.manual_seed(0)
    q = IBQ(
        50, 6, commitment_cost=0.4, codebook_weight=0.7, double_quant_weight=0.9, entropy_weight=0
    )
    with torch.no_grad():
        q.codebook.normal_()
    x = torch.randn(2, 6, 4, 3, requires_grad=True)
    out = q.train()(x)
    flat = x.detach().movedim(1, -1).reshape(-1, 6)
    ref_q, ref_i = dense_ibq(flat, q.codebook.detach())
    assert torch.equal(out.indices.reshape(-1), ref_i)
    mse = ((flat - q.codebook.detach()[ref_i]) ** 2).mean()
    torch.testing.assert_close(out.loss, (0.4 + 0.7 + 0.9) * mse)
    assert set(out.losses) == {"codebook", "commitment", "double_quant"}
    (out.loss + out.quantized.square().sum()).backward()
    assert (q.codebook.grad.norm(dim=1) > 0).all()  # the softmax reaches every code
    assert torch.equal(q.decode(out.indices), out.quantized)
    # eval: the tiled search by largest inner product, the same indices
    ev = q.eval()(x)
    assert torch.equal(ev.indices, out.indices) and torch.equal(q.encode(x), out.indices)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_ibq_entropy_penalty_matches_a_dense_float64_reference():
    """loss = the three MSE terms + w * (mean_n H(p_n) - gamma H(mean_n p_n)) with
    p = softmax(x E^T / T), value and gradients, against dense float64 autograd."""
    torch.manual_seed(0)
    kw = {"commitment_cost": 0.25, "double_quant_weight": 1.0, "entropy_temperature": 0.5}
    q = IBQ(40, 6, entropy_weight=0.3, diversity_gamma=0.8, **kw).train()
    plain = IBQ(40, 6, entropy_weight=0.0, **kw).train()
    with torch.no_grad():
        q.codebook.normal_()
        plain.codebook.copy_(q.codebook)
    x = torch.randn(3, 6, 5, requires_grad=True)
    out = q(x)
    base = plain(x.detach())
    flat = x.detach().movedim(1, -1).reshape(-1, 6).double().requires_grad_()
    e = q.codebook.detach().double().requires_grad_()
    logp = torch.log_softmax(flat @ e.t() / 0.5, dim=1)
    per = -(logp.exp() * logp).sum(1).mean()
    big_p = logp.exp().mean(0)
    batch = -(big_p * big_p.log()).sum()
    ref = per - 0.8 * batch
    torch.testing.assert_close(out.losses["entropy"].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, base.loss + 0.3 * ref.float(), rtol=1e-5, atol=1e-6)
    # gradient of the penalty alone: the difference of the two layers' gradients
    (0.3 * ref).backward()
    out.loss.backward()
    gx_with = x.grad.clone()
    x.grad = None
    plain(x).loss.backward()
    got = (gx_with - x.grad).movedim(1, -1).reshape(-1, 6)
    torch.testing.assert_close(got.double(), flat.grad, rtol=1e-4, atol=1e-6)
    got_e = q.codebook.grad - plain.codebook.grad
    torch.testing.assert_close(got_e.double(), e.grad, rtol=1e-4, atol=1e-6)
    assert "entropy" not in q.eval()(x).losses  # a training term only


def test_ibq_has_no_data_init_or_revival_and_starts_on_the_hull():
    """Inner-product argmax picks only codes on the codebook's convex hull: k-means
    centroids and revived rows would sit inside it, so IBQ offers neither, and its N(0, 1)
    codes (about equal norms) can all be picked."""
    torch.manual_seed(0)
    q = IBQ(64, 32).train()
    assert not q.supports_init and not q.supports_revival
    pts = torch.randn(200, 32)
    with pytest.raises(NotImplementedError):
        q.init_codebook_kmeans(pts)
    with pytest.raises(NotImplementedError):
        q.revive_dead_codes(pts)
    norms = q.codebook.detach().norm(dim=1)
    assert norms.std() / norms.mean() < 0.25
    # nearly every code wins for its own direction (a k-means codebook: a few)
    own = q.encode(q.codebook.detach().t().unsqueeze(0)).reshape(-1)
    assert (own == torch.arange(64)).sum() >= 56


def test_ibq_options():
    q2 = build_quantizer(
        "ibq",
        8,
        num_embeddings=32,
        double_quant_weight=0.5,
        entropy_weight=0.2,
        entropy_temperature=0.1,
    )
    assert isinstance(q2, IBQ) and q2.double_quant_weight == 0.5
    assert q2.entropy_weight == 0.2 and q2.entropy_temperature == 0.1
    for bad in ({"entropy_temperature": 0.0}, {"entropy_weight": float("inf")}):
        with pytest.raises(ValueError):
            IBQ(8, 4, **bad)
    for bad in ({"use_cosine": True}, {"gradient": "rotation"}):
        with pytest.raises(ValueError):
            build_quantizer("ibq", 8, **bad)
        with pytest.raises(ValueError):
            IBQ(8, 4, **bad)


def test_ibq_default_scratch_keeps_sixteen_whole_rows_at_large_k():
    """The fused Function's tiles hold whole rows; at K = 2^18 the flat 16 MiB bound left
    4 rows a tile (memory-bound: each product streamed the codebook per 4 rows). The
    default grows to 16 rows above K = 2^16; an explicit bound is kept as given."""
    from vqkit.quantizers.softmax_entropy import IBQ_SCRATCH_BYTES, _row_tile

    assert IBQ(1024, 4).max_scratch_bytes == IBQ_SCRATCH_BYTES
    assert IBQ(2**16, 4).max_scratch_bytes == IBQ_SCRATCH_BYTES  # exactly 16 rows
    big = IBQ(2**18, 4).max_scratch_bytes
    assert big == 64 * 2**20 and _row_tile(2048, 2**18, 4, big) == 16
    assert _row_tile(2048, 2**18, 4, IBQ_SCRATCH_BYTES) == 4
    assert IBQ(2**18, 4, max_scratch_bytes=2**20).max_scratch_bytes == 2**20
    with pytest.raises(ValueError):
        IBQ(0, 4)  # still refused by the constructor's own check


def test_ibq_lookup_takes_whole_rows_where_64_fit_else_code_tiles():
    """Five N x D x K products (whole-row tiles: x E^T forward; x E^T, g E^T, dL/ds E,
    dL/ds^T x backward) where a tile holds 64 rows of K codes; six per tile (the forward's
    extra p E for zbar) with code tiles below that."""
    from tests.test_softmax_entropy import _CountProducts

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen).requires_grad_()
    e = torch.randn(100, 8, generator=gen).requires_grad_()
    for scratch, expected in ((2**20, (1, 4)), (4 * 100 * 4 * 16, (4, 8))):  # 2 row tiles
        with _CountProducts(100) as fwd:
            q, _ = ibq_lookup(x, e, max_scratch_bytes=scratch)
        with _CountProducts(100) as bwd:
            q.square().sum().backward()
        assert (fwd.count, bwd.count) == expected, scratch


def test_ibq_lookup_rejects_bad_arguments_in_one_line():
    x, e = torch.randn(4, 3), torch.randn(7, 3)
    bad = x.clone()
    bad[1, 0] = float("nan")
    for args, words in (
        ((x, torch.randn(7, 2)), "dimension mismatch"),
        ((x, e.double()), "must share a dtype"),
        ((bad, e), "x has NaN or Inf in 1 of 4 query rows (1)"),
        ((x, e, 0), "max_scratch_bytes must be a positive int"),
    ):
        with pytest.raises((TypeError, ValueError)) as info:
            ibq_lookup(*args)
        assert words in str(info.value) and "\n" not in str(info.value)
    for scratch in (2**20, 64):  # both ways (whole rows, code tiles) skip the check when told
        q, _ = ibq_lookup(bad, e, scratch, check_finite=False)
        assert q.shape == (4, 3)
