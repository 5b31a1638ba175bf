"""Tests of vqkit's estimators module."""

import pytest
import torch

from vqkit import VectorQuantizer, VectorQuantizerEMA

from .reference import flat_channels_first


def close64(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _randn_codebook(vq, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=g))
    if isinstance(vq, VectorQuantizerEMA):
        vq.reset_statistics()


def rotation_reference_grad(x, q, g):
    """dL/dx of sg[lambda R] x, R built explicitly from two Householder reflections."""
    x, q, g = x.double(), q.double(), g.double()
    u, v = x / x.norm(), q / q.norm()
    r = (u + v) / (u + v).norm()
    eye = torch.eye(x.numel(), dtype=torch.float64)
    rot = (eye - 2 * torch.outer(v, v)) @ (eye - 2 * torch.outer(r, r))
    torch.testing.assert_close(rot @ u, v)  # R takes x's direction to q's
    torch.testing.assert_close(rot @ rot.t(), eye)
    return (q.norm() / x.norm()) * rot.t() @ g


def test_rotation_trick_gradient_matches_closed_form():
    from vqkit.quantizers.estimators import rotation_trick

    torch.manual_seed(0)
    x = torch.randn(6, 5, requires_grad=True)
    q = torch.randn(6, 5) * 2
    g = torch.randn(6, 5)
    out = rotation_trick(x, q)
    assert torch.equal(out, q)
    out.backward(g)
    ref = torch.stack([rotation_reference_grad(x[i].detach(), q[i], g[i]) for i in range(6)])
    close64(x.grad, ref, rtol=1e-5, atol=1e-6)
    # the gradient preserves the angle between g and x, scaled by ||q|| / ||x||: a
    # gradient along q's direction maps to one along x's direction
    x2 = x.detach().clone().requires_grad_(True)
    rotation_trick(x2, q).backward(q)
    close64(
        x2.grad,
        (q.norm(dim=1, keepdim=True) ** 2 / x.detach().norm(dim=1, keepdim=True))
        * x.detach()
        / x.detach().norm(dim=1, keepdim=True),
        rtol=1e-5,
        atol=1e-5,
    )


def test_vq_layer_with_rotation_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, gradient="rotation")
    _randn_codebook(vq)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(x)
    assert torch.equal(vq.decode(out.indices), out.quantized.detach())
    g = torch.randn_like(x)
    (out.quantized * g).sum().backward()
    flat = flat_channels_first(x.detach())
    q = vq.codebook.detach()[out.indices.reshape(-1)]
    gf = flat_channels_first(g)
    ref = torch.stack([rotation_reference_grad(flat[i], q[i], gf[i]) for i in range(len(flat))])
    close64(flat_channels_first(x.grad), ref, rtol=1e-5, atol=1e-6)
    assert vq.codebook.grad is None  # no codebook gradient through the output path
    with pytest.raises(ValueError, match="gradient"):
        VectorQuantizer(8, 4, gradient="bogus")
