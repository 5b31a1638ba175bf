"""Tests of vqkit.quantizers.softmax_entropy: IBQ's lookup and entropy terms, one tiled
computation, against a dense float64 reference (values and gradients, tiling, padding,
an empty batch), its float32 accuracy at T = 0.01 against a dense float32 computation,
and its count of N x D x K products."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vqkit.quantizers.softmax_entropy import ibq_terms, row_max, softmax_entropy_terms


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


@pytest.mark.parametrize("t", [1.0, 0.05, 0.01])
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


def dense_ibq_terms(x, e, t, keep, g, a_s, a_b, lookup=True):
    """Dense float64 autograd of sum(q * g) + a_s * per_sample + a_b * batch, with
    q = (onehot + p1 - sg[p1]) @ E (``lookup`` False: onehot @ E, no gradient),
    p1 = softmax(x E^T), p2 = softmax(x E^T / t) over the kept rows (t None: no entropy
    terms): (q, idx, per_sample, batch, dx, de)."""
    x = x.detach().double().requires_grad_()
    e = e.detach().double().requires_grad_()
    s = x @ e.t()
    p1 = s.softmax(1)
    idx = s.argmax(1)
    onehot = torch.nn.functional.one_hot(idx, e.shape[0]).double()
    q = (onehot + p1 - p1.detach()) @ e if lookup else (onehot @ e).detach()
    per = batch = s.sum() * 0
    if t is not None:
        logp = torch.log_softmax(s[keep] / t, dim=1)
        per = -(logp.exp() * logp).sum(1).mean()
        big_p = logp.exp().mean(0)
        batch = -(big_p * big_p.clamp(min=1e-300).log()).sum()
    ((q * g).sum() + a_s * per + a_b * batch).backward()
    return q.detach(), idx, per.detach(), batch.detach(), x.grad, e.grad


@pytest.mark.parametrize("t", [0.5, 0.01])
@pytest.mark.parametrize("scratch", [2**20, 8 * 41 * 4 * 4])  # one tile; tiles of 4 rows
def test_fused_lookup_and_entropy_match_dense_float64(t, scratch):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    e = torch.randn(41, 6, generator=gen, dtype=torch.float64)
    e[17] = e[(x[0] @ e.t()).argmax()]  # an exact tie for row 0: the lower index wins
    keep = torch.arange(30) % 4 != 1
    g = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    xa, ea = x.clone().requires_grad_(), e.clone().requires_grad_()
    q, idx, per, batch = ibq_terms(xa, ea, t, keep, max_scratch_bytes=scratch)
    ((q * g).sum() + 0.7 * per - 1.3 * batch).backward()
    rq, ridx, rper, rbatch, rgx, rge = dense_ibq_terms(x, e, t, keep, g, 0.7, -1.3)
    assert torch.equal(idx, ridx) and torch.equal(q, e[idx])
    for got, want in ((per, rper), (batch, rbatch), (xa.grad, rgx), (ea.grad, rge)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "t, lookup",
    [(1.0, True), (0.05, True), (0.01, True), (None, True), (1.0, False), (0.01, False)],
)
def test_float32_terms_match_dense_float64(t, lookup):
    """The float32 tile passes (lookup and entropy alone and together) against dense
    float64: padding, 5 tiles of 8 rows (the last one short), K = 1000 (not a multiple of
    any vector width). Gradient tolerance: float32 logits carry errors ~ eps / t."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 8, generator=gen)
    e = torch.randn(1000, 8, generator=gen) * 0.5
    keep = torch.arange(37) % 5 != 2
    g = torch.randn(37, 8, generator=gen)
    xa, ea = x.clone().requires_grad_(), e.clone().requires_grad_()
    q, idx, per, batch = ibq_terms(xa, ea, t, keep, lookup=lookup, max_scratch_bytes=4 * 4 * 8000)
    ((q * g).sum() + 0.7 * per - 1.3 * batch).backward()
    rq, ridx, rper, rbatch, rgx, rge = dense_ibq_terms(x, e, t, keep, g, 0.7, -1.3, lookup)
    assert torch.equal(idx, ridx) and torch.equal(q, e[idx])
    torch.testing.assert_close(per.double(), rper, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch.double(), rbatch, rtol=1e-5, atol=1e-6)
    for got, want in ((xa.grad, rgx), (ea.grad, rge)):
        rel = float((got.double() - want).norm() / want.norm())
        assert rel < 1e-4 * (1.0 if t is None else max(1.0, 0.05 / t)), rel


def _grad(x, e, t, fn, dtype):
    xa = x.detach().to(dtype).clone().requires_grad_()
    ea = e.detach().to(dtype).clone().requires_grad_()
    s, b = fn(xa, ea, t)
    (s - b).backward()
    return torch.cat([xa.grad.flatten(), ea.grad.flatten()]).double()


def _dense(x, e, t):
    logp = torch.log_softmax(x @ e.t() / t, 1)
    big_p = logp.exp().mean(0)
    log_big_p = big_p.clamp(min=torch.finfo(big_p.dtype).tiny).log()  # 0 log 0 = 0
    return -(logp.exp() * logp).sum(1).mean(), -(big_p * log_big_p).sum()


def _logits_floor(x, e, t):
    """The gradient computed in float64 from float32 logits x E^T: the error any float32
    method that forms the logits by a float32 product must carry."""
    s = (x.float() @ e.float().t()).double().requires_grad_()
    logp = torch.log_softmax(s / t, 1)
    big_p = logp.exp().mean(0)
    log_big_p = big_p.clamp(min=torch.finfo(big_p.dtype).tiny).log()
    (-(logp.exp() * logp).sum(1).mean() + (big_p * log_big_p).sum()).backward()
    return torch.cat([(s.grad @ e).flatten(), (s.grad.t() @ x).flatten()])


def test_float32_gradient_at_t001_is_as_accurate_as_dense_float32():
    """T = 0.01 puts the logits at 100-1000. On typical, large-logit and sharp batches
    (rows near a code) the tiled float32 gradient of per-sample - batch entropy must
    carry no error beyond that of its float32 logits (within 1.2x of the float64
    computation from them), and be within 2x of dense float32 autograd overall (per
    batch the two scatter 0.3-3x around each other: both are at the logits' floor).
    Uncentred differences were 30-10000x worse on these batches."""
    gen = torch.Generator().manual_seed(3)
    e = torch.randn(512, 32, generator=gen, dtype=torch.float64)
    noise = torch.randn(256, 32, generator=gen, dtype=torch.float64)
    near = e[torch.randint(0, 512, (256,), generator=gen)]
    errs = []
    for x in (noise, 4 * noise, near + noise, near + 0.8 * noise):
        ref = _grad(x, e, 0.01, _dense, torch.float64)
        rel = [
            float((g - ref).norm() / ref.norm())
            for g in (
                _grad(x, e, 0.01, _dense, torch.float32),
                _grad(x, e, 0.01, softmax_entropy_terms, torch.float32),
                _logits_floor(x, e, 0.01),
            )
        ]
        assert rel[0] < 1e-2  # float32 can resolve the batch (it is not degenerate)
        assert rel[1] <= 1.2 * rel[2], rel
        errs.append(rel)
    assert sum(r[1] for r in errs) <= 2 * sum(r[0] for r in errs), errs


class _CountProducts(TorchDispatchMode):
    """Counts matrix products with an inner or outer dimension of K (N x D x K ones: a
    vector times a tile, as the batch marginal's weighted row sum, is an N x K pass)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.count = k, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.mm.default, aten.mm.out, aten.addmm_.default):
            a, b = (args[0], args[1]) if func != aten.addmm_.default else args[1:3]
            if self.k in (a.shape[0], a.shape[1], b.shape[1]) and 1 not in (a.shape[0], b.shape[1]):
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_gemm_per_tile_forward_and_four_backward():
    """The forward forms x E^T once per tile; the backward x E^T, g E^T, dL/ds E and
    dL/ds^T x: five products of N x D x K in all, lookup and entropy together."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen).requires_grad_()
    e = torch.randn(100, 8, generator=gen).requires_grad_()
    scratch = 4 * 100 * 4 * 16  # tiles of 16 rows: 4 tiles
    with _CountProducts(100) as fwd:
        q, _, per, batch = ibq_terms(x, e, 0.01, max_scratch_bytes=scratch)
    with _CountProducts(100) as bwd:
        (q.square().sum() + per - batch).backward()
    assert (fwd.count, bwd.count) == (4, 16)


@pytest.mark.parametrize("k", [1, 127, 128, 129, 300, 1000])
def test_block_argmax_is_torch_argmax_with_exact_ties(k):
    """The first index of the row maximum, found through 128-code blocks, equals
    ``torch.argmax``'s (documented: the first of equal maxima), with ties inside a block,
    across blocks and in the partial last block."""
    gen = torch.Generator().manual_seed(k)
    s = torch.randint(-5, 5, (64, k), generator=gen).float()  # many exact ties
    s[0] = 7.0  # a row of one value: index 0
    s[1, -1] = 9.0  # the maximum alone in the last (maybe partial) block
    if k > 130:
        s[2, [5, 130, k - 1]] = 11.0  # the same maximum in three blocks
    m, idx = row_max(s)
    torch.testing.assert_close(m, s.amax(1), rtol=0, atol=0)
    assert torch.equal(idx, s.argmax(1))


@pytest.mark.parametrize(
    "case, exc, words",
    [
        ("x 1-d", ValueError, "x must have shape (N, D)"),
        ("width", ValueError, "dimension mismatch"),
        ("dtypes", TypeError, "must share a dtype"),
        ("integer", TypeError, "floating-point"),
        ("keep shape", ValueError, "keep must be a bool (6,) tensor"),
        ("keep dtype", ValueError, "keep must be a bool (6,) tensor"),
        ("nan x", ValueError, "x has NaN or Inf in 1 of 6 query rows (2)"),
        ("inf code", ValueError, "codebook has NaN or Inf in 1 of 5 codebook rows (4)"),
        ("scratch", ValueError, "max_scratch_bytes must be a positive int"),
    ],
)
def test_bad_arguments_raise_one_line_errors(case, exc, words):
    x, e, keep, scratch = torch.randn(6, 3), torch.randn(5, 3), None, 2**20
    if case == "x 1-d":
        x = x[0]
    elif case == "width":
        e = torch.randn(5, 4)
    elif case == "dtypes":
        e = e.double()
    elif case == "integer":
        x = x.long()
    elif case == "keep shape":
        keep = torch.ones(5, dtype=torch.bool)
    elif case == "keep dtype":
        keep = torch.ones(6)
    elif case == "nan x":
        x[2, 1] = float("nan")
    elif case == "inf code":
        e[4, 0] = float("inf")
    elif case == "scratch":
        scratch = 0
    calls = [lambda: ibq_terms(x, e, 0.1, keep, max_scratch_bytes=scratch)]
    if case != "dtypes":  # softmax_entropy_terms takes any floating dtype and casts
        calls.append(lambda: softmax_entropy_terms(x, e, 0.1, keep, max_scratch_bytes=scratch))
    for call in calls:
        with pytest.raises(exc) as info:
            call()
        assert words in str(info.value) and "\n" not in str(info.value)
    if case in ("nan x", "inf code"):  # switched off: no check, no error
        ibq_terms(x, e, 0.1, keep, max_scratch_bytes=scratch, check_finite=False)
