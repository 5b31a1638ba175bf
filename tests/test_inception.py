"""Tests of vqkit's FID InceptionV3 module (vqkit.evaluation.inception): its TF1 bilinear
resize against torch-fidelity's and against the formula in float64. (The network's
features against torch-fidelity's: tests/test_features.py.)"""

from __future__ import annotations

import torch

from vqkit.evaluation.inception import resize_bilinear_tf1


def test_resize_is_torch_fidelitys_tf1_resize(fidelity):
    tf1 = fidelity[1].interpolate_bilinear_2d_like_tensorflow1x
    g = torch.Generator().manual_seed(2)
    for h, w in ((32, 32), (28, 40), (512, 300), (299, 299)):
        x = torch.randint(0, 256, (2, 3, h, w), generator=g).float()
        want = tf1(x, size=(299, 299), align_corners=False)
        torch.testing.assert_close(resize_bilinear_tf1(x, 299), want, rtol=0, atol=1e-4)


def test_resize_against_the_tf1_formula():
    """Output pixel i samples source i * H / 299 (no half-pixel shift), float64 here."""
    x = torch.arange(4 * 5, dtype=torch.float32).view(1, 1, 4, 5) ** 1.5
    got = resize_bilinear_tf1(x, 7)
    ref = torch.empty(7, 7, dtype=torch.float64)
    src = x[0, 0].double()
    for i in range(7):
        for j in range(7):
            y, xx = i * 4 / 7, j * 5 / 7
            y0, x0 = int(y), int(xx)
            y1, x1 = min(y0 + 1, 3), min(x0 + 1, 4)
            top = src[y0, x0] + (src[y0, x1] - src[y0, x0]) * (xx - x0)
            bot = src[y1, x0] + (src[y1, x1] - src[y1, x0]) * (xx - x0)
            ref[i, j] = top + (bot - top) * (y - y0)
    torch.testing.assert_close(got[0, 0].double(), ref, rtol=1e-6, atol=1e-4)
