"""Tests of vqkit's frechet module: FD and KID against float64 formulas written here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqkit.evaluation.frechet import FeatureDistances


class Flat(nn.Module):
    """uint8 (B, 1, 2, 2) -> its 4 pixel values as features."""

    name = "flat"

    def forward(self, x):
        return x.reshape(x.shape[0], -1).float()


def _sqrtm_psd(a):
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def test_fd_and_kid_match_float64_references():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 1, 2, 2), generator=g, dtype=torch.uint8)
    fake = (real.double() * 0.7 + 30 + 10 * torch.randn(40, 1, 2, 2, generator=g)).clamp(0, 255)
    fake = fake.round().to(torch.uint8)
    dist = FeatureDistances(Flat(), kid_subsets=1, kid_subset_size=1000)
    dist.update(real[:25], fake[:25])
    dist.update(real[25:], fake[25:])
    out = dist.compute()
    a, b = real.reshape(40, -1).double(), fake.reshape(40, -1).double()
    ma, mb = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(sa)
    fd = (ma - mb).pow(2).sum() + torch.trace(sa + sb - 2 * _sqrtm_psd(ra @ sb @ ra))
    assert out["fd"] == pytest.approx(float(fd), rel=1e-6)
    # KID, one subset of all 40 images: unbiased MMD^2, kernel (x.y / d + 1)^3
    k = lambda x, y: (x @ y.T / 4 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    n = 40
    mmd = (
        (kxx.sum() - kxx.diag().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
        - 2 * kxy.mean()
    )
    assert out["kid"] == pytest.approx(float(mmd), rel=1e-6)
    assert out["images"] == 40 and out["kid_subset_size"] == 40
    # a set against itself: FD ~ 0
    same = FeatureDistances(Flat(), kid_subsets=2)
    same.update(real, real)
    assert abs(same.compute()["fd"]) < 1e-6


def test_kid_does_not_depend_on_the_global_rng_and_bad_input():
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (30, 1, 2, 2), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 256, (30, 1, 2, 2), generator=g, dtype=torch.uint8)
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        d = FeatureDistances(Flat(), kid_subsets=5, kid_subset_size=10)
        d.update(real, fake)
        values.append(d.compute()["kid"])
    assert values[0] == values[1]
    d = FeatureDistances(Flat())
    d.update(real[:1], fake[:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        d.compute()
    with pytest.raises(ValueError, match="KID needs"):
        FeatureDistances(Flat(), kid_subset_size=1)
