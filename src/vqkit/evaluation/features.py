"""Named feature spaces for Fréchet distance and KID: the standard InceptionV3 of FID
(rFID), and a classifier vqkit trains itself (:mod:`.feature_net`).

A feature extractor here is an ``nn.Module`` mapping uint8 images (B, C, H, W) to float
features (B, F), with ``name`` (what the figure is labelled with), ``num_features``,
``comparable_with_papers`` and ``describe()`` (a dict for eval.json). Nothing downloads:
each network comes from a file the user names, checked key by key before use.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..losses.perceptual import check_state, load_state_file
from ..storage.fileio import file_hexdigest

__all__ = [
    "INCEPTION_FILE",
    "InceptionFeatures",
    "ensure_torch_fidelity_importable",
    "sha256_file",
]

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
_INCEPTION_HINT = (
    f"download the FID InceptionV3 weights that pytorch-fid and torch-fidelity use "
    f"({INCEPTION_FILE}) and pass its path"
)


def sha256_file(path: str | os.PathLike[str]) -> str:
    return file_hexdigest(path, "sha256")


def ensure_torch_fidelity_importable() -> bool:
    """Make ``torch_fidelity``'s InceptionV3 modules importable; False when the package is
    not installed.

    torch-fidelity's package ``__init__`` imports torchvision (for its CLIP and VGG
    extractors), which vqkit never installs (no CPU wheel pairs with its torch pin); the
    InceptionV3 extractor and its helpers do not use it. Without torchvision the package
    is registered bare (its path, not its ``__init__``), so its submodules, and
    torchmetrics' FID/KID modules that import them, load. Call before importing
    ``torchmetrics.image``.
    """
    if "torch_fidelity" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return False
    try:
        importlib.import_module("torch_fidelity")
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
        bare = types.ModuleType("torch_fidelity")
        bare.__path__ = list(spec.submodule_search_locations or [])
        bare.__spec__ = spec
        sys.modules["torch_fidelity"] = bare
    return True


def _inception_class() -> type:
    if not ensure_torch_fidelity_importable():
        raise UserError(
            "--inception-weights needs torch-fidelity's InceptionV3: "
            "pip install --no-deps torch-fidelity (it needs no torchvision for this)"
        )
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Checked(FeatureExtractorInceptionV3):
        """torch-fidelity's network; the state it is given is checked key by key first
        (its own load would be a multi-line strict-load error)."""

        source = "?"

        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[override]
            check_state(self, state_dict, self.source, "the FID InceptionV3", _INCEPTION_HINT)
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _Checked


class InceptionFeatures(nn.Module):
    """The 2048-d pool3 features of FID's InceptionV3 (TF-2015 graph port), through
    torch-fidelity's ``FeatureExtractorInceptionV3`` (bilinear resize to 299 as in TF1,
    ``(x - 128) / 128``). Gray images are replicated to RGB, as torch-fidelity does."""

    comparable_with_papers = True
    num_features = 2048

    def __init__(self, weights: str | os.PathLike[str]) -> None:
        super().__init__()
        state = load_state_file(weights, "InceptionV3 weights", _INCEPTION_HINT)
        cls = _inception_class()
        cls.source = str(weights)
        buf = io.BytesIO()
        torch.save(state, buf)  # the checked tensors, so the library reads nothing else
        buf.seek(0)
        self.net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
        self.weights = Path(weights)
        self.sha256 = sha256_file(weights)
        self.name = "InceptionV3-FID (pool3, 2048-d)"

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # frozen network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise UserError(
                f"expected uint8 images (B, 1 or 3, H, W); got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images)[0].float()

    def describe(self) -> dict[str, Any]:
        return {
            "feature_space": self.name,
            "weights": self.weights.name,
            "weights_sha256": self.sha256,
            "network": "torch-fidelity FeatureExtractorInceptionV3",
            "comparable_with_papers": True,
        }
