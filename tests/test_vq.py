"""Tests of vqkit's vq module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqkit import VectorQuantizer, VectorQuantizerEMA

from .reference import flat_channels_first, perplexity, sq_distances


def close64(actual, expected, rtol=1e-5, atol=1e-6):
    """float32 result against a float64 reference."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _spread_codebook(vq, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=g) * scale)
    if isinstance(vq, VectorQuantizerEMA):
        vq.reset_statistics()


K, D = 16, 4


def test_vq_forward_losses_and_gradients_match_reference():
    torch.manual_seed(0)
    k, d, beta = 37, 6, 0.25
    vq = VectorQuantizer(k, d, commitment_cost=beta)
    _spread_codebook(vq)
    x = torch.randn(3, d, 5, 4, requires_grad=True)
    out = vq(x)

    # reference, float64, from scratch
    xr = x.detach().double().requires_grad_(True)
    er = vq.codebook.detach().double().requires_grad_(True)
    flat = flat_channels_first(xr)
    idx = sq_distances(flat, er).argmin(1)
    onehot = F.one_hot(idx, k).double()
    q = onehot @ er
    codebook_loss = ((q - flat.detach()) ** 2).mean()
    commitment_loss = ((q.detach() - flat) ** 2).mean()
    loss = codebook_loss + beta * commitment_loss
    st = flat + (q - flat).detach()

    assert torch.equal(out.indices.reshape(-1), idx)
    assert out.indices.shape == (3, 5, 4)
    close64(out.losses["codebook"], codebook_loss)
    close64(out.losses["commitment"], commitment_loss)
    close64(out.loss, loss)
    torch.testing.assert_close(
        flat_channels_first(out.quantized).double(), st, rtol=1e-5, atol=1e-5
    )
    close64(out.perplexity, perplexity(idx, k))
    close64(out.usage, (onehot.sum(0) > 0).double().mean())
    torch.testing.assert_close(
        out.distances.reshape(-1).double(),
        sq_distances(flat.detach(), er.detach()).min(1).values,
        rtol=1e-4,
        atol=1e-5,
    )

    # gradients: a downstream loss on the output plus the VQ loss
    w = torch.randn_like(x)
    (out.loss + (out.quantized * w).sum()).backward()
    w_flat = flat_channels_first(w.double())
    (loss + (st * w_flat).sum()).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(vq.codebook.grad.double(), er.grad, rtol=1e-5, atol=1e-7)


def test_straight_through_is_identity_gradient():
    vq = VectorQuantizer(16, 4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    vq(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_separate_weights():
    vq = VectorQuantizer(16, 4, commitment_cost=0.5, codebook_weight=2.0)
    out = vq(torch.randn(2, 4, 3, 3))
    torch.testing.assert_close(
        out.loss, 2.0 * out.losses["codebook"] + 0.5 * out.losses["commitment"]
    )


def test_default_init_is_uniform_over_1_over_k():
    vq = VectorQuantizer(512, 64)
    assert vq.codebook.abs().max() <= 1 / 512
    assert vq.codebook.std() > 0.2 / 512


def test_constructor_validation():
    for bad in [
        dict(num_embeddings=0, embedding_dim=4),
        dict(num_embeddings=4, embedding_dim=0),
        dict(num_embeddings=4.5, embedding_dim=4),
        dict(num_embeddings=4, embedding_dim=4, commitment_cost=-1),
        dict(num_embeddings=4, embedding_dim=4, max_scratch_bytes=0),
        dict(num_embeddings=4, embedding_dim=4, search_backend="x"),
    ]:
        with pytest.raises(ValueError):
            VectorQuantizer(**bad)
    for bad in [
        dict(decay=1.5),
        dict(decay=-0.1),
        dict(epsilon=0.0),
        dict(commitment_cost=-1.0),
        dict(decay=1.0, zero_debias=True),
    ]:
        with pytest.raises(ValueError):
            VectorQuantizerEMA(8, 4, **bad)


def test_repr():
    assert "num_embeddings=8, embedding_dim=4, commitment_cost=0.25" in repr(VectorQuantizer(8, 4))
    r = repr(VectorQuantizerEMA(8, 4, zero_debias=True))
    assert "decay=0.99" in r and "zero_debias=True" in r


def test_affine_codebook_forward_decode_and_gradients():
    torch.manual_seed(0)
    q = VectorQuantizer(K, D, affine_codebook=True).train()
    x = torch.randn(2, D, 3, 3, requires_grad=True)
    out = q(x)
    assert torch.equal(q.decode(out.indices), out.quantized.detach())
    out.loss.backward()
    # the shared scale and shift learn from every assigned vector
    assert q.codebook_scale.grad.abs().sum() > 0 and q.codebook_shift.grad.abs().sum() > 0
    assert "affine_codebook=True" in repr(q)
