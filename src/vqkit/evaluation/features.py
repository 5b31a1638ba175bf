"""Named feature spaces for Fréchet distance and KID: the standard InceptionV3 of FID
(rFID), and a classifier vqkit trains itself (:mod:`.feature_net`).

A feature extractor here is an ``nn.Module`` mapping uint8 images (B, C, H, W) to float
features (B, F), with ``name`` (what the figure is labelled with), ``num_features``,
``comparable_with_papers`` and ``describe()`` (a dict for eval.json). Nothing downloads:
each network comes from a file the user names, checked key by key before use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..storage.fileio import file_hexdigest
from ..storage.weights import load_weights_file
from .inception import FIDInceptionV3

__all__ = [
    "INCEPTION_FILE",
    "InceptionFeatures",
    "sha256_file",
]

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
_INCEPTION_HINT = (
    f"download the FID InceptionV3 weights that pytorch-fid and torch-fidelity use "
    f"({INCEPTION_FILE}) and pass its path"
)


def sha256_file(path: str | os.PathLike[str]) -> str:
    return file_hexdigest(path, "sha256")


class InceptionFeatures(nn.Module):
    """The 2048-d pool3 features of FID's InceptionV3 (TF-2015 graph port,
    :class:`~.inception.FIDInceptionV3`: bilinear resize to 299 as in TF1,
    ``(x - 128) / 128``), from the user's weights file, loaded strictly. Gray images are
    replicated to RGB, as torch-fidelity does."""

    comparable_with_papers = True
    num_features = 2048

    def __init__(self, weights: str | os.PathLike[str]) -> None:
        super().__init__()
        self.net = FIDInceptionV3()
        # num_batches_tracked: present when the file was saved from a torch BatchNorm
        load_weights_file(
            self.net,
            weights,
            what="the FID InceptionV3",
            hint=_INCEPTION_HINT,
            ignore=("num_batches_tracked",),
        )
        self.net.requires_grad_(False)
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
        return self.net(images)

    def describe(self) -> dict[str, Any]:
        return {
            "feature_space": self.name,
            "weights": self.weights.name,
            "weights_sha256": self.sha256,
            "network": "vqkit FIDInceptionV3 (the TF-2015 FID graph, as pytorch-fid / "
            "torch-fidelity port it)",
            "comparable_with_papers": True,
        }
