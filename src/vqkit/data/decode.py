"""Decoding one image with Pillow, for every data path: :func:`decode_image`, channel
rules, oversized-image errors, :func:`read_image`.

Channel rule shared by image folders and single reads: an image is *gray* when its Pillow
mode is one of :data:`GRAY_MODES` (L, LA, 1, I, F, ...). Gray -> RGB repeats the channel
(what Pillow's ``convert("RGB")`` does, exactly); RGB -> gray is Pillow's ITU-R 601-2 luma.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ._core import channels_to_mode, resize_center_crop

__all__ = ["GRAY_MODES", "decode_image", "decode_pixels", "read_image", "too_large_message"]

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def too_large_message(where: str | os.PathLike[str], detail: object) -> str:
    """One line for Pillow's DecompressionBombError (an image over twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, e.g. 20000 x 20000), naming the file."""
    return (
        f"image too large to decode: {where}: {str(detail).rstrip('. ')}; shrink or remove "
        "it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
    )


def decode_image(item: bytes | str | os.PathLike[str], mode: str | None = None) -> tuple[Any, bool]:
    """Decode one image (its encoded bytes or a path): the one decoder of every data
    path (image folders, shards, packing, :func:`read_image`).

    ``mode``: "L" or "RGB"; None keeps the image's kind (gray -> "L", anything else ->
    "RGB"). Palette images with transparency go through RGBA. Returns ``(image,
    was_gray)``: a loaded Pillow image in that mode, and whether the source was gray
    (:data:`GRAY_MODES`). Pillow's exceptions pass through (DecompressionBombError for
    oversized images; OSError / ValueError / SyntaxError for what is not an image).
    """
    from PIL import Image

    data = Path(item).read_bytes() if isinstance(item, (str, os.PathLike)) else item
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # decode now, so a truncated or corrupt file raises here
        gray = im.mode in GRAY_MODES
        want = mode if mode is not None else ("L" if gray else "RGB")
        img = im
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning
        # a copy when nothing converts: the opened image is closed on leaving the block
        return (img.convert(want) if img.mode != want else img.copy()), gray


def decode_pixels(
    item: bytes | str | os.PathLike[str], mode: str | None, size: int | None
) -> tuple[bytes, int, int, int, bool]:
    """:func:`decode_image`, then the shorter side resized to ``size`` and the centre
    square cropped (``size`` None: unchanged). Returns ``(pixels, height, width,
    channels, was_gray)``, pixels in (H, W, C) order."""
    img, gray = decode_image(item, mode)
    if size is not None:
        img = resize_center_crop(img, size)
    return img.tobytes(), img.height, img.width, 1 if img.mode == "L" else 3, gray


def read_image(
    path: str | os.PathLike[str], channels: int | None = None, size: int | None = None
) -> torch.Tensor:
    """One image file as a uint8 tensor (C, H, W).

    ``channels``: 1 or 3 (converted if needed); None keeps the image's own (1 for gray,
    else 3). ``size``: shorter side resized to it, then centre-cropped to size x size.
    Errors name the file: FileNotFoundError if missing, ValueError if it cannot be
    decoded or is too large (Pillow's decompression-bomb limit).
    For a model input: ``normalize(read_image(p, c, s)[None])``, (1, C, H, W) in
    [-0.5, 0.5].
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    mode = None if channels is None else channels_to_mode(channels)
    if size is not None and size < 1:
        raise UserError(f"size must be positive, got {size}")
    try:
        pixels, h, w, c, _ = decode_pixels(path, mode, size)
    except Image.DecompressionBombError as e:
        raise UserError(too_large_message(path, e)) from e
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's ways of saying "not an image"
        raise UserError(f"cannot read image {path}: {e}") from e
    arr = np.frombuffer(pixels, dtype=np.uint8).reshape(h, w, c)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
