"""Tests of vqkit's codebook_base module."""

from __future__ import annotations

import pytest
import torch

from vqkit import VectorQuantizer, VectorQuantizerEMA
from vqkit.codebook import reset_optimizer_rows

from .reference import flat_channels_first
from .test_codebook import D, K, clusters, collapsed_vq


def close64(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _randn_codebook(vq, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=g))
    if isinstance(vq, VectorQuantizerEMA):
        vq.reset_statistics()


def test_cosine_search_matches_normalised_float64_reference():
    torch.manual_seed(0)
    k, d = 29, 5
    vq = VectorQuantizer(k, d, use_cosine=True)
    _randn_codebook(vq)
    x = (torch.randn(2, d, 4, 6) * 3).requires_grad_(True)
    out = vq(x)
    flat = flat_channels_first(x.detach().double())
    e = vq.codebook.detach().double()
    xn = flat / flat.norm(dim=1, keepdim=True)
    en = e / e.norm(dim=1, keepdim=True)
    cos = xn @ en.t()
    idx = cos.argmax(1)
    assert torch.equal(out.indices.reshape(-1), idx)
    q = en[idx]
    close64(flat_channels_first(out.quantized.detach()), q)
    close64(out.losses["commitment"], ((xn - q) ** 2).mean())
    close64(out.distances.reshape(-1), 2 - 2 * cos.max(1).values, atol=1e-5)
    assert torch.equal(vq.decode(out.indices), out.quantized.detach())
    # l2_normalize is the same switch
    vq2 = VectorQuantizer(k, d, l2_normalize=True)
    vq2.load_state_dict(vq.state_dict())
    assert torch.equal(vq2(x).indices, out.indices)
    # the codebook term reaches the raw codebook through the normalisation
    out.loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_low_dimensional_codes_with_projections():
    torch.manual_seed(0)
    vq = VectorQuantizer(40, 16, codebook_dim=4)
    assert vq.codebook.shape == (40, 4)
    _randn_codebook(vq)
    x = torch.randn(2, 16, 3, 5, requires_grad=True)
    out = vq(x)
    z = flat_channels_first(x.detach().double()) @ vq.project_in.weight.double().t()
    z = z + vq.project_in.bias.double()
    e = vq.codebook.detach().double()
    idx = ((z[:, None] - e[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(out.indices.reshape(-1), idx)
    ref = e[idx] @ vq.project_out.weight.double().t() + vq.project_out.bias.double()
    close64(flat_channels_first(out.quantized.detach()), ref, atol=1e-5)
    close64(out.losses["commitment"], ((z - e[idx]) ** 2).mean())
    torch.testing.assert_close(vq.decode(out.indices), out.quantized.detach())
    assert torch.equal(vq.encode(x), out.indices)
    (out.loss + out.quantized.sum()).backward()
    for p in (vq.project_in.weight, vq.project_out.weight, vq.codebook):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("affine", [False, True])
def test_kmeans_init_finds_every_cluster_for_the_gradient_codebook(affine):
    centres, pts = clusters(K, 30)
    q = VectorQuantizer(K, D, affine_codebook=affine)
    if affine:
        with torch.no_grad():  # a non-trivial affine map must be inverted
            q.codebook_scale.fill_(2.0)
            q.codebook_shift.fill_(-1.0)
    q.init_codebook_kmeans(pts, iters=10, generator=torch.Generator().manual_seed(0))
    codes = q.effective_codebook().detach()
    # every cluster has a code within its spread, and every code sits on a cluster
    d = torch.cdist(centres, codes)
    assert (d.min(dim=1).values < 0.2).all()
    assert (d.min(dim=0).values < 0.2).all()
    assert int(q.usage_updates) == 0


def test_collapsed_codebook_is_detected():
    q, _, pts = collapsed_vq()
    out = q(pts)
    assert int((out.counts > 0).sum()) == 1
    assert int(q.dead_codes(1.0).sum()) == K - 1


def test_revival_makes_dead_codes_used_within_a_few_steps():
    q, optim, pts = collapsed_vq()
    g = torch.Generator().manual_seed(0)
    mask = q.revive_dead_codes(pts, threshold=1.0, generator=g)
    reset_optimizer_rows(optim, q.codebook, mask)
    for _ in range(3):
        out = q(pts)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    assert int((out.counts > 0).sum()) >= K - 3
    assert int(q.dead_codes(1.0).sum()) <= 3
    # the codebook loss keeps the revived codes on the data instead of dragging them away
    used = out.counts > 0
    assert torch.cdist(q.codebook.detach()[used], pts).min(dim=1).values.max() < 1.0


def test_revival_validates_threshold():
    q = VectorQuantizer(K, D)
    with pytest.raises(ValueError, match="threshold"):
        q.revive_dead_codes(torch.randn(8, D), threshold=0.0)


@pytest.mark.parametrize("cls", [VectorQuantizer, VectorQuantizerEMA])
def test_init_and_revival_reject_bad_vectors(cls):
    q = cls(K, D).train()
    bad = torch.randn(32, D)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        q.init_codebook_kmeans(bad)
    with pytest.raises(ValueError, match="NaN"):
        q.revive_dead_codes(bad, threshold=1.0)
    with pytest.raises(ValueError, match="channels"):
        q.revive_dead_codes(torch.randn(32, D + 1), threshold=1.0)
    with pytest.raises(TypeError, match="floating"):
        q.init_codebook_kmeans(torch.ones(32, D, dtype=torch.int64))


def test_codebooks_that_cannot_fit_are_refused_up_front(monkeypatch):
    """SimVQ(2**31, 8), --num-embeddings 100000000: the memory the per-code buffers need,
    in one line, before any allocation (here against a 1 GiB machine)."""
    from vqkit import SimVQ, VectorQuantizer
    from vqkit.quantizers import base

    monkeypatch.setattr(base, "machine_memory", lambda: 1 << 30)
    with pytest.raises(ValueError, match=r"2147483648 codes need at least 72.0 GiB"):
        SimVQ(2**31, 8)
    with pytest.raises(ValueError, match=r"100000000 codes need at least 24.2 GiB.*1.0 GiB"):
        VectorQuantizer(100_000_000, 64)
    assert VectorQuantizer(1024, 64).num_codes == 1024  # 260 KiB: fine
