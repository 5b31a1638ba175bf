"""LPIPS (Zhang et al. 2018), VGG16 variant, as a loss and as a metric.

``d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )`` with ``f_l`` the VGG16
activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the inputs scaled by LPIPS'
fixed shift/scale, ``n`` the unit normalisation over channels (``f / (||f||_2 + 1e-10)``)
and ``w_l`` the learned non-negative 1x1 calibration heads ("lin" layers, v0.1).

Two files make it, and nothing is downloaded:

* the heads ship with vqkit (``vqkit/assets/lpips_vgg_v0.1.safetensors``, from
  richzhang/PerceptualSimilarity's ``weights/v0.1/vgg.pth``, BSD-2-Clause: see
  ``assets/LICENSE-LPIPS``);
* the VGG16 backbone is the user's: torchvision's ImageNet weights file
  (``vgg16-397923af.pth``; only its ``features.*`` tensors are used), given by path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..storage.weights import load_weights_file

__all__ = [
    "LPIPS",
    "LPIPS_HEADS",
    "VGG16_FILE",
    "load_lpips_heads",
    "vgg16_features",
]

VGG16_FILE = "vgg16-397923af.pth"
LPIPS_HEADS = Path(__file__).resolve().parent.parent / "assets" / "lpips_vgg_v0.1.safetensors"
"""LPIPS v0.1's VGG heads, shipped in vqkit's package data (keys ``lin{i}.model.1.weight``,
shape (1, C_i, 1, 1), as in the original file)."""
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2 ... relu5_3 in torchvision's vgg16.features
_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3, same indices (so its state-dict
    keys ``features.N.weight`` load), randomly initialised."""
    layers: list[nn.Module] = []
    c = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            c = int(v)
    return nn.Sequential(*layers)


def load_lpips_heads() -> list[torch.Tensor]:
    """The five v0.1 VGG calibration heads, (1, C_i, 1, 1) float32 each, from vqkit's
    own asset file (read with safetensors)."""
    from safetensors.torch import load_file

    heads = load_file(str(LPIPS_HEADS))
    return [heads[f"lin{i}.model.1.weight"] for i in range(len(_CHANNELS))]


class LPIPS(nn.Module):
    """LPIPS-VGG distance, frozen: ``forward(x, y) -> (B,)``.

    Inputs (B, 3, H, W) in [-1, 1] (taming's convention; ``from_model_scale`` maps vqkit's
    [-0.5, 0.5]). Gradients flow to the inputs, never into the weights.
    """

    def __init__(self, backbone: str | os.PathLike[str] | None = None) -> None:
        """``backbone``: torchvision's VGG16 weights file; None leaves it random (tests)."""
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        for head, weight in zip(self.heads, load_lpips_heads(), strict=True):
            head.weight.data.copy_(weight)
        if backbone is not None:
            hint = (
                f"download torchvision's ImageNet VGG16 weights ({VGG16_FILE}, the file "
                "torchvision.models.vgg16(weights='IMAGENET1K_V1') fetches) and pass its path"
            )
            load_weights_file(
                self.features, backbone, what="torchvision's VGG16", hint=hint, prefix="features."
            )
        self.requires_grad_(False)
        self.eval()
        if backbone is not None:
            self._probe(backbone, hint)

    @torch.no_grad()
    def _probe(self, backbone: str | os.PathLike[str], hint: str) -> None:
        """Refuse, naming the file, finite weights under which LPIPS is not finite (they
        overflow): one 32 px pair, a ramp and its negative, at load, so neither ``eval``
        (a null figure) nor training (a NaN loss) finds out later."""
        ramp = torch.linspace(-1, 1, 32 * 32 * 3).view(1, 3, 32, 32)
        value = self(ramp, -ramp.flip(-1))
        if not bool(torch.isfinite(value).all()):
            raise UserError(
                f"{backbone}: LPIPS with these VGG16 weights is not finite ({float(value[0])}) "
                f"on a test image: the weights overflow; {hint}"
            )

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: dropout-free eval mode always

    @staticmethod
    def from_model_scale(x: torch.Tensor) -> torch.Tensor:
        """vqkit's image scale [-0.5, 0.5] -> LPIPS' [-1, 1]."""
        return 2.0 * x

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
            if i == _TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape != y.shape:
            raise UserError(
                "LPIPS compares RGB images (B, 3, H, W) of one shape; got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        b = x.shape[0]
        total = x.new_zeros(b)
        for head, f in zip(self.heads, self._taps(torch.cat([x, y])), strict=True):
            n = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # one pass for x and y
            total = total + F.conv2d((n[:b] - n[b:]).pow(2), head.weight).mean(dim=(1, 2, 3))
        return total
