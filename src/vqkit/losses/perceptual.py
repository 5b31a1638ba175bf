"""LPIPS (Zhang et al. 2018), VGG16 variant, as a loss and as a metric.

``d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )`` with ``f_l`` the VGG16
activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the inputs scaled by LPIPS'
fixed shift/scale, ``n`` the unit normalisation over channels (``f / (||f||_2 + 1e-10)``)
and ``w_l`` the learned non-negative 1x1 calibration heads ("lin" layers, v0.1).

Two files make it, and nothing is downloaded:

* the heads ship inside the ``torchmetrics`` wheel (``lpips_models/vgg.pth``) and the
  ``lpips`` wheel (``weights/v0.1/vgg.pth``); they are read from whichever is installed;
* the VGG16 backbone is the user's: torchvision's ImageNet weights file
  (``vgg16-397923af.pth``; only its ``features.*`` tensors are used), given by path.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

__all__ = [
    "LPIPS",
    "VGG16_FILE",
    "lpips_heads_path",
    "load_state_file",
    "vgg16_features",
]

VGG16_FILE = "vgg16-397923af.pth"
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2 ... relu5_3 in torchvision's vgg16.features
_CHANNELS = (64, 128, 256, 512, 512)
_HEADS = (
    ("torchmetrics", ("functional", "image", "lpips_models", "vgg.pth")),
    ("lpips", ("weights", "v0.1", "vgg.pth")),
)


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


def lpips_heads_path() -> Path:
    """The v0.1 VGG calibration heads inside an installed wheel (torchmetrics or lpips),
    located without importing the package (lpips imports torchvision)."""
    for package, parts in _HEADS:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            path = Path(root).joinpath(*parts)
            if path.is_file():
                return path
    raise FileNotFoundError(
        "LPIPS needs its calibration heads, which ship inside the torchmetrics wheel: "
        "pip install torchmetrics (or lpips)"
    )


def load_state_file(path: str | os.PathLike[str], what: str, hint: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt (loaded without torch's general unpickler) or a
    .safetensors file, as CPU tensors. One-line errors: missing, unreadable or truncated,
    not a dict of tensors. ``hint`` says what to download."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} not found: {hint}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, foreign format: all one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {what} file {p} ({first}): {hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} file {p} is not a state dict of tensors: {hint}")
    return state


def check_state(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    where: str,
    what: str,
    hint: str,
    prefix: str = "",
) -> None:
    """ValueError (one line) unless ``state`` has every key of ``module`` with its shape
    (``prefix``: how the keys are named in the file, for the message)."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [prefix + k for k in want if k not in state]
    wrong = [
        f"{prefix}{k} {tuple(state[k].shape)} != {want[k]}"
        for k in want
        if k in state and tuple(state[k].shape) != want[k]
    ]
    if missing or wrong:
        detail = (
            f"{len(missing)} missing tensors (e.g. {missing[0]})"
            if missing
            else f"{len(wrong)} tensors of the wrong shape (e.g. {wrong[0]})"
        )
        raise UserError(f"{where} is not {what}: {detail}; {hint}")


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
        heads = load_state_file(lpips_heads_path(), "LPIPS heads", "reinstall torchmetrics")
        for i, head in enumerate(self.heads):
            head.weight.data.copy_(heads[f"lin{i}.model.1.weight"])
        if backbone is not None:
            hint = (
                f"download torchvision's ImageNet VGG16 weights ({VGG16_FILE}, the file "
                "torchvision.models.vgg16(weights='IMAGENET1K_V1') fetches) and pass its path"
            )
            state = load_state_file(backbone, "VGG16 weights", hint)
            feats = {
                k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")
            }
            check_state(
                self.features, feats, str(backbone), "torchvision's VGG16", hint, "features."
            )
            self.features.load_state_dict({k: feats[k] for k in self.features.state_dict()})
        self.requires_grad_(False)
        self.eval()

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
