"""Tests of vqkit's image_metrics module: SSIM and MS-SSIM against an independent float64
implementation written here from the papers' definitions, vqkit's own SSIM / MS-SSIM code
(the fewer-scale path) against pytorch-msssim's public functions on images large enough
for them, bits per pixel by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqkit.evaluation.image_metrics import (
    MS_SSIM_BETAS,
    _ms_ssim,
    _ssim_and_cs,
    bits_per_pixel,
    ms_ssim,
    ms_ssim_scales,
    ssim,
    ssim_skimage,
)


def _gauss(window=11, sigma=1.5):
    ax = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def _ref_ssim_and_cs(x, y):
    """Per-image, per-channel (B, C) SSIM and contrast-structure terms: valid Gaussian
    filtering (no padding), mean over positions; population moments."""
    c = x.shape[1]
    w = _gauss().expand(c, 1, 11, 11)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def _pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    # a correlated reconstruction: the image plus noise, so SSIM is far from 0 and 1
    noise = torch.randn(shape, generator=g) * 25
    b = (a.double() + noise).round().clamp(0, 255).to(torch.uint8)
    return b, a


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 40, 24)])
def test_ssim_matches_a_float64_reference(shape):
    pred, target = _pair(shape, 0)
    ref = _ref_ssim_and_cs(pred.double(), target.double())[0].mean(1)
    got = ssim(pred, target)
    assert got.shape == (shape[0],)
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got, ref)
    assert 0.2 < float(got.min()) < 0.95
    assert torch.allclose(ssim(target, target), torch.ones(shape[0], dtype=torch.float64))


@pytest.mark.parametrize(
    "size, scales", [(21, 2), (32, 2), (45, 3), (64, 3), (128, 4), (150, 4), (192, 5)]
)
def test_ms_ssim_matches_a_float64_reference(size, scales):
    assert ms_ssim_scales(size) == scales
    pred, target = _pair((2, 3, size, size + 3), 1)
    x, y = pred.double(), target.double()
    betas = torch.tensor(MS_SSIM_BETAS[:scales], dtype=torch.float64)
    betas = betas / betas.sum()
    ref = torch.ones(2, 3, dtype=torch.float64)
    for j in range(scales):
        s, cs = _ref_ssim_and_cs(x, y)
        term = s if j == scales - 1 else cs
        ref = ref * term.clamp_min(0) ** betas[j]
        pad = [n % 2 for n in x.shape[2:]]  # odd sides: one zero row/column, counted
        x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    ref = ref.mean(1)  # per channel, then the mean over channels
    got, used = ms_ssim(pred, target)
    assert used == scales
    # 5 scales: pytorch-msssim's weights as they are (they sum to 1.0001)
    # fewer scales: the window made in float32 as pytorch-msssim makes it (~5e-8 here)
    tol = 1e-4 if scales == 5 else 1e-6
    assert torch.allclose(got, ref, atol=tol, rtol=0), (got, ref, (got - ref).abs().max())


@pytest.mark.parametrize("shape", [(2, 3, 192, 192), (1, 1, 175, 203), (2, 3, 11, 30)])
def test_own_ssim_code_matches_pytorch_msssim_public_functions(shape):
    """vqkit's SSIM / MS-SSIM code (used for fewer scales) and pytorch-msssim's public
    ``ssim`` / ``ms_ssim`` agree to float64 rounding where the latter apply."""
    from pytorch_msssim import ms_ssim as lib_ms_ssim
    from pytorch_msssim import ssim as lib_ssim

    pred, target = _pair(shape, 2)
    x, y = pred.double(), target.double()
    kw = {"data_range": 255, "size_average": False, "win_size": 11, "win_sigma": 1.5}
    own = _ssim_and_cs(x, y)[0].mean(1)
    torch.testing.assert_close(own, lib_ssim(x, y, K=(0.01, 0.03), **kw), rtol=1e-12, atol=0)
    torch.testing.assert_close(ssim(pred, target), own, rtol=1e-12, atol=0)
    if min(shape[-2:]) > 160:
        betas = torch.tensor(MS_SSIM_BETAS, dtype=torch.float64)
        want = lib_ms_ssim(x, y, K=(0.01, 0.03), weights=list(MS_SSIM_BETAS), **kw)
        torch.testing.assert_close(_ms_ssim(x, y, betas), want, rtol=1e-12, atol=0)
        torch.testing.assert_close(ms_ssim(pred, target)[0], want, rtol=1e-12, atol=0)


def test_bad_input():
    a = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        ssim(a.float(), a.float())
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, a[:, :1])
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(a[..., :8, :8], a[..., :8, :8])
    with pytest.raises(ValueError, match="at least 21 px"):
        ms_ssim(a[..., :16, :16], a[..., :16, :16])


def test_bits_per_pixel():
    # 32x32 image, 8x8 grid of K=512 codes: 64 * 9 / 1024
    assert bits_per_pixel(64, 1, 512, 1024) == pytest.approx(0.5625)
    # residual, 3 codes per position, K=1000
    assert bits_per_pixel(16, 3, 1000, 256) == pytest.approx(16 * 3 * math.log2(1000) / 256)
    with pytest.raises(ValueError):
        bits_per_pixel(0, 1, 512, 1024)


def _ref_ssim_uniform(x, y, data_range):
    """The tokenizer papers' SSIM (scikit-image's defaults), written out in float64: per
    channel a 7 x 7 uniform window at valid positions, sample covariance (49 / 48), then
    the mean over positions and channels; x, y float in [0, 1] (B, C, H, W)."""
    c = x.shape[1]
    w = torch.full((c, 1, 7, 7), 1 / 49, dtype=torch.float64)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    cov = 49 / 48
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx = cov * (filt(x * x) - mx * mx)
    syy = cov * (filt(y * y) - my * my)
    sxy = cov * (filt(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 40, 24)])
@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_papers_ssim_is_skimage_uniform_window_and_not_the_gaussian_one(shape, data_range):
    """LlamaGen (data_range 2) and Open-MAGVIT2 (data_range 1) evaluate SSIM with
    scikit-image's structural_similarity on uint8 / 255: a 7 x 7 uniform window and the
    sample covariance. That figure, against a float64 reference written here; and it is a
    different figure from the Gaussian-window one (by a few hundredths on 32 px pairs)."""
    pred, target = _pair(shape, seed=5)
    got = ssim_skimage(pred, target, data_range)
    ref = _ref_ssim_uniform(pred.double() / 255, target.double() / 255, data_range)
    assert got.dtype == torch.float64 and got.shape == (shape[0],)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)  # skimage computes in float32
    # on image-like (smooth) 32 px pairs the two conventions differ by 0.015-0.03 per image
    g = torch.Generator().manual_seed(6)
    coarse = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 255
    img = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    img = img.round().clamp(0, 255).to(torch.uint8)
    rec = img.double() + 10 * torch.randn(img.shape, generator=g, dtype=torch.float64)
    rec = rec.round().clamp(0, 255).to(torch.uint8)
    gap = (ssim_skimage(rec, img, data_range) - ssim(rec, img)).abs()
    assert float(gap.min()) > 0.01, gap  # not the same figure


def test_papers_ssim_bad_input():
    a = torch.zeros(1, 3, 6, 6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 7 px"):
        ssim_skimage(a, a, 1.0)
    with pytest.raises(TypeError, match="uint8"):
        ssim_skimage(a.float(), a.float(), 1.0)
