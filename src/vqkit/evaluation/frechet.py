"""Fréchet distance and KID between two image sets in a named feature space.

FD: ``||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` of the features' means and
(unbiased) covariances (Heusel et al. 2017); KID: the unbiased MMD^2 with the cubic
polynomial kernel ``(f.g / d + 1)^3``, averaged over random subsets (Binkowski et al.
2018). Both are torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``
fed with features vqkit extracts once (one network pass per image for both).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .features import ensure_torch_fidelity_importable

__all__ = ["FeatureDistances"]


class _Given(nn.Module):
    """The 'network' handed to torchmetrics: the features are already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FeatureDistances:
    """Collects features of real and reconstructed (or sampled) uint8 images with
    ``extractor`` and computes ``{"fd", "kid", "kid_std", "images"}``.

    KID uses ``kid_subsets`` subsets of ``min(kid_subset_size, n)`` images, drawn with a
    fixed seed (the figure does not depend on the global RNG)."""

    def __init__(
        self,
        extractor: nn.Module,
        *,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
    ) -> None:
        if kid_subsets < 1 or kid_subset_size < 2:
            raise UserError("KID needs >= 1 subset of >= 2 images")
        self.extractor = extractor
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """uint8 (B, C, H, W) batches of real images and their reconstructions."""
        self.real.append(self.extractor(real).double().cpu())
        self.fake.append(self.extractor(fake).double().cpu())

    def compute(self) -> dict[str, Any]:
        ensure_torch_fidelity_importable()  # torchmetrics.image imports it when installed
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        real, fake = torch.cat(self.real), torch.cat(self.fake)
        n = min(len(real), len(fake))
        if n < 2:
            raise UserError(f"FD and KID need at least 2 images; got {n}")
        given = _Given(real.shape[1])
        fd = FrechetInceptionDistance(feature=given, reset_real_features=False)
        fd.update(real, real=True)
        fd.update(fake, real=False)
        size = min(self.kid_subset_size, n)
        with warnings.catch_warnings():  # "saves all features": it is handed them all anyway
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            kid = KernelInceptionDistance(feature=given, subsets=self.kid_subsets, subset_size=size)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid_mean, kid_std = kid.compute()
        return {
            "fd": float(fd.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": size,
            "images": n,
        }
