"""The figures beyond MSE/PSNR that ``vqkit eval`` reports, each with a label saying what
produced it: SSIM on two conventions (pytorch-msssim's Gaussian window; scikit-image's
uniform window as LlamaGen and Open-MAGVIT2 evaluate), MS-SSIM, LPIPS, bits per pixel,
and FD/KID in each named feature space.

:class:`QualitySuite` is fed batches of real images and reconstructions (model scale,
[-0.5, 0.5]) by :func:`vqkit.evaluation.reconstruction.evaluate` and returns
``(figures, labels)``; a figure that was not asked for (or cannot be had, e.g. LPIPS
without the backbone file) is absent, never approximated.
"""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

import torch
from torch import nn

from ..data import denormalize
from ..errors import UserError
from ..losses.perceptual import LPIPS
from .frechet import FeatureDistances, paper_comparability
from .image_metrics import (
    SKIMAGE_WINDOW,
    WINDOW,
    ms_ssim,
    ms_ssim_scales,
    ssim,
    ssim_skimage,
)

__all__ = ["QualitySuite", "base_labels", "check_image_metric_packages"]


def _version(package: str) -> str:
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return package


def base_labels() -> dict[str, str]:
    """Labels of the figures :func:`evaluate` always reports."""
    return {
        "num_images": "images evaluated (an evenly strided subset with --limit)",
        "data_variance": "pixel variance of the training set, model scale (divides mse into nmse)",
        "mse": "mean squared error per pixel, model scale [-0.5, 0.5], reconstructions unclamped",
        "nmse": "mse / the training set's pixel variance",
        "psnr": "PSNR (dB), float reconstructions clamped to the valid range, peak 1",
        "perplexity": "exp(entropy) of code usage pooled over the split",
        "batch_perplexity": "mean perplexity over groups of 32 images",
        "codes_used": "codes used at least once on the split",
        "usage": "codes_used / K",
        "bits_per_pixel": (
            "one image's codes (positions x codes per position; multi-scale: every scale) "
            "x log2 K / pixels (H x W)"
        ),
    }


SKIMAGE_RANGES = {"ssim_skimage": 1.0, "ssim_skimage_range2": 2.0}
"""The papers' SSIM (:func:`ssim_skimage`) by ``data_range``: 1.0 as Open-MAGVIT2's
``evaluation.py``, 2.0 as LlamaGen's ``reconstruction_vq_ddp.py`` (on [0, 1] images)."""


def check_image_metric_packages() -> None:
    """One line naming what to install, not an ImportError at the first evaluation."""
    need = {"pytorch_msssim": "pytorch-msssim", "skimage": "scikit-image"}
    missing = [pkg for mod, pkg in need.items() if find_spec(mod) is None]
    if missing:
        raise UserError(
            f"SSIM / MS-SSIM need {' and '.join(missing)}: pip install 'vqkit[eval]' "
            "(or leave them out: --no-eval-ssim)"
        )


class QualitySuite:
    """SSIM on both conventions and MS-SSIM (``image_metrics``; absent for images under 11
    px, MS-SSIM under 21 px), LPIPS (``lpips``), FD and KID in each of ``extractors``
    (keyed by ``key``: e.g. ``{"rfid": InceptionFeatures(...)}``)."""

    def __init__(
        self,
        *,
        image_metrics: bool = True,
        lpips: LPIPS | None = None,
        extractors: dict[str, nn.Module] | None = None,
        kid_subset_size: int = 1000,
    ) -> None:
        if image_metrics:
            check_image_metric_packages()
        self.image_metrics = image_metrics
        self.lpips = lpips
        self.distances = {
            k: FeatureDistances(e, kid_subset_size=kid_subset_size)
            for k, e in (extractors or {}).items()
        }
        self.sums: dict[str, float] = {}
        self.n = 0
        self.scales = 0
        self.channels = 0

    def _add(self, key: str, values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(values.double().sum())

    @torch.no_grad()
    def update(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        """Real ``x`` and reconstructions ``recon``, (B, C, H, W) on the model's scale."""
        real, fake = denormalize(x), denormalize(recon)
        if self.image_metrics and min(x.shape[-2:]) >= WINDOW:  # smaller: SSIM absent
            fake_cpu, real_cpu = fake.cpu(), real.cpu()
            self._add("ssim", ssim(fake_cpu, real_cpu))
            for key, data_range in SKIMAGE_RANGES.items():
                self._add(key, ssim_skimage(fake_cpu, real_cpu, data_range))
            if ms_ssim_scales(min(x.shape[-2:])) >= 2:
                value, self.scales = ms_ssim(fake.cpu(), real.cpu())
                self._add("ms_ssim", value)
        if self.lpips is not None:
            a, b = x.clamp(-0.5, 0.5), recon.clamp(-0.5, 0.5)
            if a.shape[1] == 1:  # gray: replicated to RGB (labelled)
                a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
            lp = self.lpips.to(x.device)
            self._add("lpips", lp(LPIPS.from_model_scale(b), LPIPS.from_model_scale(a)))
        for d in self.distances.values():
            d.update(real, fake)
        self.n += x.shape[0]
        self.channels = x.shape[1]

    def compute(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(figures, labels)``: means over the images and FD/KID per feature space."""
        figures: dict[str, Any] = {k: v / self.n for k, v in self.sums.items()}
        labels: dict[str, Any] = {}
        conv = "uint8 images, data range 255, Gaussian window 11, sigma 1.5"
        if "ssim" in figures:
            labels["ssim"] = (
                f"SSIM ({_version('pytorch-msssim')}), {conv}; mean over images (not the "
                "tokenizer papers' convention: see ssim_skimage)"
            )
        paper = {1.0: "Open-MAGVIT2's evaluation.py", 2.0: "LlamaGen's reconstruction_vq_ddp.py"}
        for key, data_range in SKIMAGE_RANGES.items():
            if key in figures:
                labels[key] = (
                    f"SSIM ({_version('scikit-image')} structural_similarity), "
                    f"{SKIMAGE_WINDOW}x{SKIMAGE_WINDOW} uniform window, sample covariance, "
                    f"uint8 / 255 as float32, data_range {data_range:g}: the convention of "
                    f"{paper[data_range]}; mean over images"
                )
        if "ms_ssim" in figures:
            std = (
                "the standard 5 scales"
                if self.scales == 5
                else f"{self.scales} scales (the standard 5 need > 160 px; weights renormalised)"
            )
            labels["ms_ssim"] = f"MS-SSIM ({_version('pytorch-msssim')}), {conv}, {std}"
        if "lpips" in figures:
            gray = "; gray replicated to RGB" if self.channels == 1 else ""
            labels["lpips"] = (
                "LPIPS-VGG v0.1 (heads shipped with vqkit, the user's VGG16 weights), "
                f"images clamped to [-1, 1]{gray}; mean over images"
            )
        if "lpips" in figures and not math.isfinite(figures["lpips"]):
            raise UserError(
                f"LPIPS is not finite ({figures['lpips']}) on these images: the VGG16 weights "
                "file overflows on them"
            )
        for key, dist in self.distances.items():
            out = dist.compute()
            info = dist.extractor.describe()
            bad = [k for k in ("fd", "kid") if not math.isfinite(out[k])]
            if bad:  # else eval.json would hold a silent null
                source = info.get("weights") or info.get("name") or dist.extractor.name
                raise UserError(
                    f"{key}: {' and '.join(bad).upper()} not finite: the features of "
                    f"{source} overflow on these images"
                )
            figures[key] = out["fd"]
            figures[f"{key}_kid"] = out["kid"]
            figures[f"{key}_kid_std"] = out["kid_std"]
            n, space = out["images"], bool(info.get("comparable_with_papers"))
            comparable, caveat = paper_comparability(space, n, out["features"])
            name = dist.extractor.name
            if comparable:
                what = "rFID"
            else:  # papers' space on too few images is not rFID as papers report it
                what = f"FD ({name}) on {n} images" if space else f"FD ({name})"
            labels[key] = {
                **info,
                "figure": what,
                "computed_by": "vqkit FD / KID (torchmetrics' formulas, float64) on "
                "vqkit-extracted features",
                "images": n,
                "feature_dims": out["features"],
                "full_rank_covariance": out["full_rank"],
                "feature_space_comparable_with_papers": space,
                "comparable_with_papers": comparable,
                "caveat": caveat,
            }
            if out["kid_std"] is None:
                draws = (
                    f"one draw of all {n} images (no more images than the subset size "
                    f"{dist.kid_subset_size}: no spread measured, _std null)"
                )
            else:
                draws = (
                    f"mean (and _std) over {out['kid_subsets']} subsets of "
                    f"{out['kid_subset_size']} of the {n} images"
                )
            labels[f"{key}_kid"] = (
                f"KID in the same feature space ({what}): cubic polynomial kernel, {draws}"
            )
        return figures, labels
