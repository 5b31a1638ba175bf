"""Tests of vqkit's FID InceptionV3 module (vqkit.evaluation.inception): its TF1 bilinear
resize against torch-fidelity's (stored: tests/fid_reference.py) and against the
formula in float64. (The network's
features against torch-fidelity's: tests/test_features.py.)"""

from __future__ import annotations

import torch

from vqkit.evaluation.inception import resize_bilinear_tf1

from . import fid_reference


def test_resize_is_torch_fidelitys_tf1_resize():
    """torch-fidelity 0.4.0's TF1 resize of the same images (4,096 stored positions of
    each output, tests/fid_reference.py)."""
    tensors, _ = fid_reference.load()
    where = fid_reference.resize_positions()
    for i, x in enumerate(fid_reference.resize_inputs()):
        got = resize_bilinear_tf1(x, 299).reshape(-1)[where]
        torch.testing.assert_close(got, tensors[f"resize_{i}"], rtol=0, atol=1e-4)


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
