"""The InceptionV3 of FID: the TensorFlow 2015-12-05 graph (Heusel et al. 2017's
reference) as ported to PyTorch by pytorch-fid and torch-fidelity
(``FeatureExtractorInceptionV3``), written out here so vqkit needs neither.

Same modules under the same names as those ports (``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch5x5_1.bn.running_mean``, ..., ``fc.weight``), so their weights file
(``pt_inception-2015-12-05-6726825d.pth``) loads strictly; same input handling: uint8
images resized to 299 x 299 with TF1's bilinear resize (:func:`resize_bilinear_tf1`),
then ``(x - 128) / 128``. The output is the 2048-d pool features (the ``"2048"``
feature of torch-fidelity, pytorch-fid's pool3). The TF graph differs from torchvision's
InceptionV3 in three places, kept here: average pools leave padding out of the mean,
the last block max-pools its pool branch, BatchNorm's eps is 0.001.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDInceptionV3", "resize_bilinear_tf1"]

INPUT_SIZE = 299


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) float images to (size, size) as TensorFlow 1.x's
    ``resize_bilinear(align_corners=False)`` computes it (no half-pixel centres, unlike
    torch's ``interpolate``): output pixel ``i`` samples source position ``i * H / size``,
    between rows ``floor`` and ``min(floor + 1, H - 1)``. The positions are float32 as in
    TF (torch-fidelity's 'slow', CPU bit-exact method)."""
    rows = _taps(x.shape[2], size, x.device)
    cols = _taps(x.shape[3], size, x.device)
    (r0, r1, dy), (c0, c1, dx) = rows, cols
    top = x[:, :, r0, :]
    bottom = x[:, :, r1, :]
    dx = dx.to(x.dtype).view(1, 1, 1, -1)
    # the same order of operations as TF's kernel: across columns first, then rows
    upper = top[..., c0] + (top[..., c1] - top[..., c0]) * dx
    lower = bottom[..., c0] + (bottom[..., c1] - bottom[..., c0]) * dx
    return upper + (lower - upper) * dy.to(x.dtype).view(1, 1, -1, 1)


def _taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(low index, high index, weight of the high one) of each output position."""
    pos = torch.arange(n_out, dtype=torch.float32, device=device) * torch.tensor(
        n_in / n_out, dtype=torch.float32
    )
    lo = pos.long()
    return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()


class _FrozenBatchNorm(nn.Module):
    """Inference BatchNorm, ``(x - mean) / sqrt(var + eps) * weight + bias`` with
    eps = 0.001 (TF's); the four tensors of the converted file, no ``num_batches_tracked``
    (a training counter the converted file lacks)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3
        )


class _Conv(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU: the ports' ``BasicConv2d``."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = _FrozenBatchNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool leaves the zero padding out of the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """35 x 35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64, 1)
        self.branch5x5_1 = _Conv(c_in, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class _BlockB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):
    """17 x 17 block (Mixed_6b..6e), factorised 7x7: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 |
    avg pool-1x1; ``c7`` channels inside the 7x7 towers."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.branch1x1 = _Conv(c_in, 192, 1)
        self.branch7x7_1 = _Conv(c_in, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = _Conv(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = _Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = _Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = _Conv(c7, 192, row[0], padding=row[1])
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(c_in, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(c_in, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    """8 x 8 block (Mixed_7b, 7c): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1;
    the pool is an average in Mixed_7b and a max (``max_pool``) in Mixed_7c, as in the
    TF graph."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(c_in, 320, 1)
        self.branch3x3_1 = _Conv(c_in, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(c_in, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """FID's InceptionV3, randomly initialised (load the user's file into it):
    ``forward(uint8 (B, 3, H, W)) -> (B, 2048)`` float32 pool features. ``fc`` (the 1008
    logits) is kept so the weights file loads strictly; it does not enter the features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147 x 147
        x = F.max_pool2d(x, 3, stride=2)  # 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71 x 71
        x = F.max_pool2d(x, 3, stride=2)  # 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)  # 17 x 17 after 6a
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # 8 x 8
        return x.mean(dim=(2, 3))  # global average pool: (B, 2048)
