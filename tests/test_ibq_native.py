"""Tests of vqkit.quantizers.ibq_native: IBQ's C kernel against the eager passes and a
dense float64 reference (values and gradients, lookup and entropy alone and together,
padding, several tiles, K not a multiple of the vector width), the split of rows over
threads, and the fallback where the kernel cannot be built."""

from __future__ import annotations

import pytest
import torch

from vqkit.quantizers import ibq_native
from vqkit.quantizers.softmax_entropy import ibq_terms

needs_kernel = pytest.mark.skipif(
    ibq_native._compiler() is None, reason="no C compiler: the kernel cannot be built"
)


def _run(native: str, monkeypatch, x, e, t, keep, lookup, scratch, g):
    monkeypatch.setenv(ibq_native.ENV, native)
    xa, ea = x.clone().requires_grad_(), e.clone().requires_grad_()
    q, idx, per, batch = ibq_terms(xa, ea, t, keep, lookup=lookup, max_scratch_bytes=scratch)
    ((q * g).sum() + 0.7 * per - 1.3 * batch).backward()
    return idx, per.detach(), batch.detach(), xa.grad, ea.grad


def _dense64(x, e, t, keep, lookup, g):
    x = x.detach().double().requires_grad_()
    e = e.detach().double().requires_grad_()
    s = x @ e.t()
    p1 = s.softmax(1)
    onehot = torch.nn.functional.one_hot(s.argmax(1), e.shape[0]).double()
    # without the lookup's gradient ibq_terms' codes carry none at all
    q = (onehot + p1 - p1.detach()) @ e if lookup else (onehot @ e).detach()
    zero = s.sum() * 0
    per = batch = zero
    if t is not None:
        logp = torch.log_softmax(s[keep] / t, 1)
        per = -(logp.exp() * logp).sum(1).mean()
        big_p = logp.exp().mean(0)
        batch = -(big_p * big_p.clamp(min=1e-300).log()).sum()
    ((q * g.double()).sum() + 0.7 * per - 1.3 * batch).backward()
    return per.detach(), batch.detach(), x.grad, e.grad


@needs_kernel
@pytest.mark.parametrize(
    "t, lookup",
    [(1.0, True), (0.05, True), (0.01, True), (None, True), (1.0, False), (0.01, False)],
)
def test_kernel_matches_eager_and_float64(monkeypatch, t, lookup):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 8, generator=gen)
    e = torch.randn(1000, 8, generator=gen) * 0.5  # 1000 = 62 x 16 + 8: a vector remainder
    keep = torch.arange(37) % 5 != 2
    g = torch.randn(37, 8, generator=gen)
    scratch = 4 * 4 * 1000 * 8  # tiles of 8 rows: 5 tiles, the last one short
    nat = _run("1", monkeypatch, x, e, t, keep, lookup, scratch, g)
    assert ibq_native.usable(x)
    eag = _run("0", monkeypatch, x, e, t, keep, lookup, scratch, g)
    rper, rbatch, rgx, rge = _dense64(x, e, t, keep, lookup, g)
    assert torch.equal(nat[0], eag[0])
    for got, ref in ((nat, eag), (nat, (None, rper, rbatch, rgx, rge))):
        torch.testing.assert_close(got[1].double(), ref[1].double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2].double(), ref[2].double(), rtol=1e-5, atol=1e-6)
        for a, b in ((got[3], ref[3]), (got[4], ref[4])):
            rel = float((a.double() - b.double()).norm() / b.double().norm())
            assert rel < 1e-4 * (1.0 if t is None else max(1.0, 0.05 / t)), rel


@needs_kernel
def test_rows_split_over_threads_give_the_same_rows(monkeypatch):
    """Each row's figures and gradient do not depend on how the rows are split over
    threads (bit for bit); the marginal, summed per thread and then over the threads,
    agrees to rounding."""
    monkeypatch.setenv(ibq_native.ENV, "1")
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(50, 300, generator=gen) * 3
    m = s.amax(1)
    w = (torch.arange(50) % 7 != 3).float()
    gl = torch.randn(50, 300, generator=gen)
    log_p = torch.log_softmax(torch.randn(300, generator=gen), 0)
    rows = [torch.randn(50, generator=gen) * 1e-3 for _ in range(2)]
    assert ibq_native.usable(s)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            marg = torch.zeros(300)
            z, abar = ibq_native.forward_rows(s, m, w, 100.0, -64.0, marg)
            ent = (log_p, log_p[:50].clone(), *rows, abar, z)
            out = ibq_native.backward_rows(s, gl, m, 100.0, -64.0, ent, torch.empty_like(s))
            results.append((z, abar, out, marg))
    finally:
        torch.set_num_threads(threads)
    (z1, a1, o1, m1), (z3, a3, o3, m3) = results
    assert torch.equal(z1, z3) and torch.equal(a1, a3) and torch.equal(o1, o3)
    torch.testing.assert_close(m1, m3, rtol=1e-6, atol=0)


def test_a_failed_build_warns_once_and_the_eager_passes_run(monkeypatch):
    monkeypatch.setattr(ibq_native, "_state", {})
    monkeypatch.setenv("CC", "/nonexistent/vqkit-test-cc")
    monkeypatch.setenv(ibq_native.ENV, "1")
    x = torch.randn(6, 3, requires_grad=True)
    e = torch.randn(5, 3)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        q, _, per, batch = ibq_terms(x, e, 0.1)
    assert not ibq_native.usable(x)  # no second attempt, no second warning
    (q.sum() + per - batch).backward()
    assert torch.isfinite(x.grad).all()


def test_not_used_off_cpu_float32_or_when_switched_off(monkeypatch):
    monkeypatch.setenv(ibq_native.ENV, "0")
    assert not ibq_native.usable(torch.zeros(2, 2))
    monkeypatch.setenv(ibq_native.ENV, "1")
    assert not ibq_native.usable(torch.zeros(2, 2, dtype=torch.float64))
