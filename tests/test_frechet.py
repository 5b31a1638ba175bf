"""Tests of vqkit's frechet module: FD and KID against float64 formulas written here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqkit.evaluation.frechet import PAPER_MIN_IMAGES, FeatureDistances, paper_comparability


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


def test_kid_with_no_more_images_than_a_subset_is_one_draw_without_spread():
    """Every "subset" of n <= subset-size images is all of them: the 100 draws would be
    one figure repeated (std exactly 0). Reported as one draw, std None (null)."""
    g = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (30, 1, 2, 2), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 256, (30, 1, 2, 2), generator=g, dtype=torch.uint8)
    d = FeatureDistances(Flat(), kid_subsets=100, kid_subset_size=30)
    d.update(real, fake)
    out = d.compute()
    assert out["kid_std"] is None and out["kid_subsets"] == 1
    assert out["kid_subset_size"] == 30 and out["images"] == 30
    k = lambda x, y: (x @ y.T / 4 + 1) ** 3  # noqa: E731
    a, b = real.reshape(30, -1).double(), fake.reshape(30, -1).double()
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    mmd = (kxx.sum() - kxx.diag().sum() + kyy.sum() - kyy.diag().sum()) / (30 * 29)
    assert out["kid"] == pytest.approx(float(mmd - 2 * kxy.mean()), rel=1e-9)
    # more images than a subset: 100 different draws, a real spread
    d = FeatureDistances(Flat(), kid_subsets=100, kid_subset_size=29)
    d.update(real, fake)
    out = d.compute()
    assert out["kid_subsets"] == 100 and out["kid_std"] > 0


def test_fd_says_whether_its_covariances_are_full_rank_and_comparable():
    """N images give covariances of rank <= N - 1: below F + 1 images FD is a figure of
    rank-deficient covariances; papers' rFID uses 10,000 or 50,000 images."""
    g = torch.Generator().manual_seed(3)
    real = torch.randint(0, 256, (6, 1, 2, 2), generator=g, dtype=torch.uint8)
    d = FeatureDistances(Flat())
    d.update(real[:4], real[:4].flip(0))
    out = d.compute()
    assert out["features"] == 4 and out["images"] == 4 and not out["full_rank"]
    d = FeatureDistances(Flat())
    d.update(real, real.flip(0))
    assert d.compute()["full_rank"]
    assert not paper_comparability(True, 9_999, 2048)[0]
    ok, caveat = paper_comparability(True, PAPER_MIN_IMAGES, 2048)
    assert ok and "same number of images" in caveat
    ok, caveat = paper_comparability(True, 2, 2048)
    assert not ok and "2 images" in caveat and "rank at most 1" in caveat
    assert "10,000" in caveat
    assert not paper_comparability(False, 50_000, 2048)[0]
