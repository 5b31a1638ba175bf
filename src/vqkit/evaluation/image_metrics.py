"""Image-quality figures, each on a named convention, and the code grid's rate.

Two SSIM conventions, both reported, because the papers do not share one:

* :func:`ssim` and :func:`ms_ssim`: pytorch-msssim's (Wang et al. 2004's valid-window
  definition with a Gaussian window 11, sigma 1.5, population moments, K1 = 0.01,
  K2 = 0.03) on uint8 images as float64 values 0..255, data range 255. Its public
  ``ssim`` / ``ms_ssim`` compute SSIM and the standard 5-scale MS-SSIM; MS-SSIM with
  fewer scales, for images under 161 px (which its ``ms_ssim`` refuses), is computed
  here by the same definition (:func:`_ssim_and_cs`).
* :func:`ssim_skimage`: scikit-image's ``structural_similarity`` with its defaults (a 7 x
  7 uniform window, sample covariance, K1 = 0.01, K2 = 0.03) on uint8 / 255 as float32,
  the convention of LlamaGen (``tokenizer/tokenizer_image/reconstruction_vq_ddp.py``:
  ``data_range=2.0``) and Open-MAGVIT2 (``evaluation.py``: ``data_range=1.0``). On the
  same 32 px pairs it differs from the Gaussian one by a few hundredths: compare a
  paper's SSIM with the figure on its convention only.

Images here are the model's scale, [-0.5, 0.5]; ``vqkit.data.denormalize`` maps them to
what a viewer sees (rounded, clamped uint8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = [
    "MS_SSIM_BETAS",
    "SKIMAGE_WINDOW",
    "WINDOW",
    "bits_per_pixel",
    "ms_ssim",
    "ms_ssim_scales",
    "ssim",
    "ssim_skimage",
]

WINDOW, SIGMA, DATA_RANGE = 11, 1.5, 255.0
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Wang, Simoncelli & Bovik (2003)'s weights of the five scales, finest first."""


def _check(pred: torch.Tensor, target: torch.Tensor, window: int = WINDOW) -> None:
    if pred.dtype != torch.uint8 or target.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images; got {pred.dtype} and {target.dtype}")
    if pred.shape != target.shape or pred.dim() != 4:
        raise UserError(
            f"expected two (B, C, H, W) batches of one shape; got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if min(pred.shape[-2:]) < window:
        raise UserError(f"SSIM needs images of at least {window} px; got {tuple(pred.shape)}")


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (B,) float64 of uint8 (B, C, H, W) batches (pytorch-msssim, the
    Gaussian-window convention; not the tokenizer papers', see :func:`ssim_skimage`): the
    mean over channels and the valid (un-padded) window positions of
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``,
    ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, Gaussian-weighted moments."""
    from pytorch_msssim import ssim as _ssim_lib

    _check(pred, target)
    return _ssim_lib(
        pred.double(),
        target.double(),
        data_range=DATA_RANGE,
        size_average=False,
        win_size=WINDOW,
        win_sigma=SIGMA,
        K=(0.01, 0.03),
    )


SKIMAGE_WINDOW = 7
"""scikit-image's default ``win_size`` (uniform window, ``gaussian_weights=False``)."""


def ssim_skimage(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """Per-image SSIM (B,) float64 of uint8 (B, C, H, W) batches on the papers' convention:
    scikit-image's ``structural_similarity(p, t, data_range=data_range, channel_axis=-1)``
    of each image as float32 (H, W, C) ``uint8 / 255``, its defaults otherwise: the mean
    over channels and the valid positions of a 7 x 7 uniform window of
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``,
    moments with the sample (49 / 48) covariance, ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``,
    ``R = data_range`` (Open-MAGVIT2: 1.0; LlamaGen: 2.0, on the same [0, 1] images)."""
    from skimage.metrics import structural_similarity

    _check(pred, target, SKIMAGE_WINDOW)
    p = (pred.permute(0, 2, 3, 1).numpy() / 255.0).astype("float32")
    t = (target.permute(0, 2, 3, 1).numpy() / 255.0).astype("float32")
    values = [
        float(structural_similarity(a, b, data_range=data_range, channel_axis=-1))
        for a, b in zip(p, t, strict=True)
    ]
    return torch.tensor(values, dtype=torch.float64)


def ms_ssim_scales(size: int) -> int:
    """Scales of MS-SSIM for images of side ``size``: the most, up to the standard 5, with
    ``size > (window - 1) * 2^(s - 1)`` (pytorch-msssim's rule for 5: above 160 px), so
    the coarsest scale is still a window wide. 32 px: 2; 128 px: 4; 0 below 21 px."""
    for s in range(len(MS_SSIM_BETAS), 1, -1):
        if size > (WINDOW - 1) * 2 ** (s - 1):
            return s
    return 0


def _window(channels: int, like: torch.Tensor) -> torch.Tensor:
    """The normalised 1-D Gaussian (WINDOW taps, SIGMA), (channels, 1, 1, WINDOW), made in
    float32 and cast, as pytorch-msssim makes its window (so the figures are its figures
    to float64 rounding)."""
    t = torch.arange(WINDOW, dtype=torch.float32) - WINDOW // 2
    g = torch.exp(-(t**2) / (2 * SIGMA**2))
    g = (g / g.sum()).to(like)
    return g.view(1, 1, 1, WINDOW).repeat(channels, 1, 1, 1)


def _blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local mean per channel, valid positions only: (B, C, H, W) ->
    (B, C, H - WINDOW + 1, W - WINDOW + 1); separable, rows then columns."""
    c = x.shape[1]
    x = F.conv2d(x, win.transpose(2, 3), groups=c)
    return F.conv2d(x, win, groups=c)


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and its contrast-structure term, (B, C) each, of float (B, C, H, W) images at
    DATA_RANGE: the means over valid window positions of
    ``l * cs`` and ``cs``, with ``l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)``,
    ``cs = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2)`` (Gaussian-weighted moments,
    ``s_xy = E[xy] - mu_x mu_y``; ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``)."""
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    win = _window(x.shape[1], x)
    mx, my = _blur(x, win), _blur(y, win)
    sxx = _blur(x * x, win) - mx * mx
    syy = _blur(y * y, win) - my * my
    sxy = _blur(x * y, win) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).flatten(2).mean(-1), cs.flatten(2).mean(-1)


def _ms_ssim(x: torch.Tensor, y: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Per-image MS-SSIM (B,) of float images over ``len(betas)`` scales, finest first:
    per channel ``prod_j relu(cs_j)^beta_j``, the last scale's SSIM in place of its cs,
    2x2 average pooling between scales (odd sides padded, as pytorch-msssim); then the
    mean over channels."""
    terms = []
    for j in range(len(betas)):
        s, cs = _ssim_and_cs(x, y)
        terms.append(torch.relu(s if j == len(betas) - 1 else cs))
        pad = [n % 2 for n in x.shape[2:]]
        x, y = F.avg_pool2d(x, 2, padding=pad), F.avg_pool2d(y, 2, padding=pad)
    return torch.prod(torch.stack(terms) ** betas.view(-1, 1, 1), dim=0).mean(1)


def ms_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-image MS-SSIM (B,) float64 of uint8 batches, and the number of scales used.

    Per channel ``prod_j relu(cs_j)^beta_j`` over the scales (2x2 average pooling between
    them), the last scale's full SSIM in place of its ``cs``; then the mean over channels
    (pytorch-msssim). With 5 scales this is pytorch-msssim's ``ms_ssim``; smaller images
    get fewer scales (:func:`ms_ssim_scales`) with the first weights renormalised to sum
    to 1 (:func:`_ms_ssim`): report the scale count with the figure.
    """
    from pytorch_msssim import ms_ssim as _ms_ssim_lib

    _check(pred, target)
    scales = ms_ssim_scales(min(pred.shape[-2:]))
    if scales < 2:
        raise UserError(f"MS-SSIM needs images of at least 21 px; got {tuple(pred.shape)}")
    x, y = pred.double(), target.double()
    if scales == len(MS_SSIM_BETAS):
        value = _ms_ssim_lib(
            x,
            y,
            data_range=DATA_RANGE,
            size_average=False,
            win_size=WINDOW,
            win_sigma=SIGMA,
            weights=None,
            K=(0.01, 0.03),
        )
        return value, scales
    betas = torch.tensor(MS_SSIM_BETAS[:scales], dtype=torch.float64)
    return _ms_ssim(x, y, betas / betas.sum()), scales


def bits_per_pixel(positions: int, codes_per_position: int, num_codes: int, pixels: int) -> float:
    """Rate of the code grid of one image: ``positions * Q * log2(K) / pixels`` (bits per
    pixel of the uncompressed index map; H x W pixels, not counting channels)."""
    if min(positions, codes_per_position, num_codes, pixels) < 1:
        raise UserError("bits_per_pixel needs positive positions, codes, K and pixels")
    return positions * codes_per_position * math.log2(num_codes) / pixels
