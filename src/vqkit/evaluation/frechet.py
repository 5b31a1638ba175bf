"""Fréchet distance and KID between two image sets in a named feature space.

FD: ``||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` of the features' means and
(unbiased) covariances (Heusel et al. 2017); KID: the unbiased MMD^2 with the cubic
polynomial kernel ``(f.g / d + 1)^3``, averaged over random subsets (Binkowski et al.
2018). Both are computed here in float64 on features vqkit extracts once (one network
pass per image for both), the way torchmetrics' ``FrechetInceptionDistance`` /
``KernelInceptionDistance`` compute them (the trace of the square root as the sum of the
square roots of the eigenvalues of ``S_r S_f``; KID's subsets drawn by ``randperm``).
torchmetrics is not imported: its image package imports torch-fidelity when that is
installed, which in turn needs torchvision.

How far a figure can be trusted depends on the image count N, and is labelled, not
hidden. Below 2 images there is no covariance: refused. N images in F feature
dimensions give covariances of rank at most N - 1, so below F + 1 images FD compares
rank-deficient estimates (``full_rank``: false). FD's estimate is biased upward by a term
that shrinks like 1/N (Chong & Forsyth 2020, "Effectively Unbiased FID"): a figure is
comparable with a paper's only on the paper's image count, and papers' rFID uses 50,000
(ImageNet validation) or at least 10,000 images (:data:`PAPER_MIN_IMAGES`; see
:func:`paper_comparability`). KID is unbiased, but its spread over subsets means nothing
when every subset is all the images: with N <= the subset size it is one draw of all N,
reported without a standard deviation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError

__all__ = [
    "PAPER_MIN_IMAGES",
    "FeatureDistances",
    "frechet_distance",
    "kernel_distance",
    "paper_comparability",
]

PAPER_MIN_IMAGES = 10_000
"""The fewest images papers compute rFID on (50,000: the ImageNet validation set of
taming-transformers, LlamaGen, Open-MAGVIT2; 10,000: a CIFAR-10 test split)."""


def paper_comparability(space_comparable: bool, images: int, features: int) -> tuple[bool, str]:
    """``(comparable_with_papers, caveat)`` of an FD on ``images`` images in a space of
    ``features`` dimensions: comparable only in papers' feature space
    (``space_comparable``) and on at least :data:`PAPER_MIN_IMAGES` images; the caveat
    says why not (or, when comparable, that a paper's figure is matched only at the same
    image count)."""
    why = []
    if images <= features:
        why.append(
            f"{images} images in {features} feature dimensions: each covariance has rank "
            f"at most {images - 1} < {features}"
        )
    if images < PAPER_MIN_IMAGES:
        why.append(
            f"{images} images, papers use {PAPER_MIN_IMAGES:,} or 50,000 (FD's bias shrinks "
            "like 1/N, so it is larger on fewer images)"
        )
    if not space_comparable:
        why.append("not papers' feature space")
    if why:
        return False, "not comparable with papers: " + "; ".join(why)
    return True, "comparable with a paper's figure on the same number of images only"


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD of two feature sets (N, F), (M, F), in float64: ``||mu_r - mu_f||^2 +
    tr(S_r) + tr(S_f) - 2 sum_i sqrt(lambda_i(S_r S_f))`` (the eigenvalues of the product
    of two PSD matrices are real and non-negative up to rounding; their real parts)."""
    real, fake = real.double(), fake.double()
    d = real.shape[1]
    s_r, s_f = (torch.cov(x.T).reshape(d, d) for x in (real, fake))  # (d, d) also for d = 1
    mean = (real.mean(0) - fake.mean(0)).square().sum()
    root = torch.linalg.eigvals(s_r @ s_f).sqrt().real.sum()
    return float(mean + s_r.trace() + s_f.trace() - 2 * root)


def _poly_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of (m, d) sets with the kernel ``(x.y / d + 1)^3``."""
    m, d = x.shape
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return off / (m * (m - 1)) - 2 * k_xy.sum() / m**2


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """KID of two feature sets: mean and (population) std of :func:`_poly_mmd` over
    ``subsets`` pairs of random subsets of ``subset_size`` rows, drawn without
    replacement by ``randperm`` from a generator seeded with ``seed``, in float64."""
    g = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=g)[:subset_size]]
        f = fake[torch.randperm(len(fake), generator=g)[:subset_size]]
        scores.append(_poly_mmd(r, f))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))


class FeatureDistances:
    """Collects features of real and reconstructed (or sampled) uint8 images with
    ``extractor`` and computes ``{"fd", "kid", "kid_std", "kid_subsets",
    "kid_subset_size", "images", "features", "full_rank"}``.

    KID uses ``kid_subsets`` subsets of ``kid_subset_size`` images, drawn with a fixed
    seed (the figure does not depend on the global RNG); with no more images than that,
    one draw of all of them (every subset would be the same set), ``kid_std`` None and
    ``kid_subsets`` 1. ``full_rank``: more images than feature dimensions."""

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
        real, fake = torch.cat(self.real), torch.cat(self.fake)
        n = min(len(real), len(fake))
        if n < 2:
            raise UserError(f"FD and KID need at least 2 images; got {n}")
        if n <= self.kid_subset_size:  # every subset is all n images: one draw, no spread
            size, subsets = n, 1
            kid, kid_std = float(_poly_mmd(real[:n], fake[:n])), None
        else:
            size, subsets = self.kid_subset_size, self.kid_subsets
            kid, kid_std = kernel_distance(real, fake, subsets, size, self.seed)
        return {
            "fd": frechet_distance(real, fake),
            "kid": kid,
            "kid_std": kid_std,
            "kid_subsets": subsets,
            "kid_subset_size": size,
            "images": n,
            "features": real.shape[1],
            "full_rank": n > real.shape[1],
        }
