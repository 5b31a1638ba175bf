"""In-memory dataset container, normalisation and small image helpers.

Images are kept as uint8 (N, C, H, W) for the whole split: 50k CIFAR images are 150 MB
in uint8 and 600 MB as float32, so the float conversion happens per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UserError

__all__ = [
    "ImageData",
    "data_variance",
    "denormalize",
    "normalize",
]


def archive_error(path: object, e: BaseException) -> ValueError:
    """One line for an archive tarfile cannot read: tarfile's own message for an unknown
    format lists every method it tried, one per line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if first.startswith("file could not be opened successfully"):
        first = "not a tar archive, plain or gzip/bzip2/xz compressed"
    return UserError(f"{path}: corrupt or truncated archive ({first.rstrip(':')})")


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class ImageData:
    """One split of an image dataset, held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), C in {1, 3}, values 0..255.
        labels: int64 tensor (N,); all zeros when the source has no classes.
        classes: class names, index i is label i; empty when the source has no classes.
        source: where the data came from (path or name), for messages and logs.
        split: the split name ("train", "test", ...).
        skipped: paths of unreadable images that were left out (image folders only).
        converted: images whose channel count was changed on loading (gray -> RGB or
            RGB -> gray) to give the split one channel count.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    source: str = ""
    split: str = ""
    skipped: tuple[str, ...] = field(default=(), repr=False)
    converted: int = 0

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise UserError(
                f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.images.shape[1] not in (1, 3):
            raise UserError(
                f"images must have 1 or 3 channels, got shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise UserError(
                f"labels must be int64 of shape ({self.images.shape[0]},), got {self.labels.dtype} "
                f"with shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of channels C (1 = grayscale, 3 = RGB)."""
        return int(self.images.shape[1])

    @property
    def hw(self) -> tuple[int, int]:
        """Spatial size (H, W)."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def image_size(self) -> int:
        """Side length of the (square) images; ValueError if they are not square."""
        h, w = self.hw
        if h != w:
            raise UserError(f"images are not square ({h}x{w}); use .hw instead")
        return h

    @property
    def num_classes(self) -> int:
        """len(classes), or 1 when the source has no class structure."""
        return max(len(self.classes), 1)

    def normalized(self, index: torch.Tensor | slice | Sequence[int] | None = None) -> torch.Tensor:
        """Float32 images in [-0.5, 0.5], shape (n, C, H, W), for the given index (all if None)."""
        x = self.images if index is None else self.images[index]
        return normalize(x)

    def subset(self, index: torch.Tensor | slice | Sequence[int]) -> ImageData:
        """A new ImageData with the selected rows (e.g. ``data.subset(slice(0, 1000))``)."""
        if isinstance(index, Sequence) and not isinstance(index, torch.Tensor):
            index = torch.as_tensor(list(index), dtype=torch.long)
        images, labels = self.images[index], self.labels[index]
        if images.dim() == 3:  # a single int index; keep the batch dimension
            images, labels = images.unsqueeze(0), labels.reshape(1)
        # the conversion count describes the whole load, not the subset
        return ImageData(
            images, labels, self.classes, self.source, self.split, self.skipped, self.converted
        )

    def to(self, device: torch.device | str) -> ImageData:
        """Copy of this split with images and labels on ``device`` (still uint8)."""
        return ImageData(
            self.images.to(device),
            self.labels.to(device),
            self.classes,
            self.source,
            self.split,
            self.skipped,
            self.converted,
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (for logs and run metadata)."""
        return {
            "source": self.source,
            "split": self.split,
            "num_images": len(self),
            "shape": list(self.images.shape[1:]),
            "classes": list(self.classes),
            "skipped": len(self.skipped),
            "converted": self.converted,
        }


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 ``x / 255 - 0.5`` in [-0.5, 0.5] (VQ-VAE scale)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0).sub_(0.5)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: float in [-0.5, 0.5] -> uint8 0..255 (rounded, clamped)."""
    return ((x.detach().float() + 0.5) * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def data_variance(data: ImageData | torch.Tensor | np.ndarray) -> float:
    """Population variance (ddof=0) of all pixels on the normalised scale ``x / 255 - 0.5``.

    Accepts an ImageData, or uint8 images of any shape. This is the ``data_variance`` the
    VQ-VAE reconstruction loss is divided by. Computed exactly from a 256-bin histogram with
    float64 arithmetic, so it needs no float copy of the data.
    """
    if isinstance(data, ImageData):
        x = data.images
    elif isinstance(data, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(data))
    else:
        x = data
    if x.dtype != torch.uint8:
        raise TypeError(f"data_variance expects uint8 images, got {x.dtype}")
    if x.numel() == 0:
        raise UserError("data_variance of an empty dataset")
    counts = torch.bincount(x.reshape(-1).to(torch.int64).cpu(), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0 - 0.5
    n = counts.sum()
    mean = (counts * values).sum() / n
    return float((counts * (values - mean) ** 2).sum() / n)


def resize_center_crop(image: Any, size: int) -> Any:
    """Pillow image -> shorter side resized to ``size``, then centre-cropped to size x size."""
    from PIL import Image

    w, h = image.size
    if (w, h) == (size, size):
        return image
    if min(w, h) != size:
        # max(size, ...) guards against rounding the longer side below the crop size.
        if w <= h:
            nw, nh = size, max(size, round(h * size / w))
        else:
            nw, nh = max(size, round(w * size / h)), size
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
        w, h = nw, nh
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def transform_array(images: np.ndarray, channels: int | None, image_size: int | None) -> np.ndarray:
    """Convert uint8 (N, C, H, W) images to ``channels`` and/or ``image_size`` with Pillow.

    Returns the input unchanged when nothing needs doing. RGB -> grayscale uses Pillow's
    ITU-R 601-2 luma; grayscale -> RGB repeats the channel.
    """
    n, c, h, w = images.shape
    want_c = c if channels is None else channels
    if want_c not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    need_resize = image_size is not None and (h, w) != (image_size, image_size)
    if want_c == c and not need_resize:
        return images
    if not need_resize:
        if c == 1:  # 1 -> 3: plain repeat, identical to Pillow's L -> RGB
            return np.ascontiguousarray(np.repeat(images, 3, axis=1))
    from PIL import Image

    mode = "RGB" if want_c == 3 else "L"
    size = image_size if image_size is not None else None
    out_h, out_w = (size, size) if size is not None else (h, w)
    out = np.empty((n, want_c, out_h, out_w), dtype=np.uint8)
    for i in range(n):
        arr = images[i, 0] if c == 1 else images[i].transpose(1, 2, 0)
        im = Image.fromarray(np.ascontiguousarray(arr), mode="L" if c == 1 else "RGB")
        if im.mode != mode:
            im = im.convert(mode)
        if size is not None:
            im = resize_center_crop(im, size)
        a = np.asarray(im)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def channels_to_mode(channels: int) -> str:
    """1 -> "L", 3 -> "RGB"; anything else is a ValueError."""
    if channels == 1:
        return "L"
    if channels == 3:
        return "RGB"
    raise UserError(f"channels must be 1 or 3, got {channels!r}")
