"""Per-image resize and crop for streamed data (runs in DataLoader workers; the decode
is :func:`vqkit.data.decode.decode_image`, shared with every other data path).

``crop="center"`` is :func:`vqkit.data._core.resize_center_crop` (shorter side resized to
``image_size`` with Pillow's antialiased bicubic filter, then the centre square), the same
pixels :func:`vqkit.data.load_image_folder` gives for the same ``image_size``.
``crop="random"`` takes a square of ``U(crop_scale, 1)`` times the shorter side at a random
position, then resizes it to ``image_size`` (antialiased bicubic); with ``crop_scale=1``
that is a random offset along the longer side only (a no-op for square images).
Random crops draw from a generator seeded per sample by (seed, epoch, shard, key), so a
resumed run crops exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np

from ..errors import UserError
from ._core import resize_center_crop

__all__ = ["CROPS", "IMAGE_KEYS", "crop_resize", "sample_rng", "to_array"]

CROPS = ("center", "random")
# WebDataset member extensions read as the image of a sample, in order of preference
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff", "gif")


def sample_rng(seed: int, epoch: int, shard: str, key: str) -> random.Random:
    """A generator for one sample's random crop, independent of where it is read."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{shard}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def crop_resize(
    img: Any,
    size: int | None,
    crop: str = "center",
    rng: random.Random | None = None,
    crop_scale: float = 1.0,
) -> Any:
    """Resize/crop a Pillow image to ``size`` x ``size`` (``size=None``: unchanged)."""
    if size is None:
        return img
    if crop == "center":
        return resize_center_crop(img, size)
    if crop != "random" or rng is None:
        raise UserError(f"crop must be one of {CROPS} (random needs an rng); got {crop!r}")
    from PIL import Image

    w, h = img.size
    side = min(w, h)
    if crop_scale < 1.0:
        side = max(1, round(side * rng.uniform(crop_scale, 1.0)))
    left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    if (side, side) != (w, h):
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def to_array(img: Any) -> np.ndarray:
    """Pillow "L"/"RGB" image -> uint8 array (C, H, W)."""
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
