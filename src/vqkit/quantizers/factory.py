"""One constructor for every quantizer kind: ``build_quantizer(kind, dim, **options)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import BaseQuantizer
from .ema import VectorQuantizerEMA
from .fsq import FSQ
from .residual import ResidualVQ
from .vq import VectorQuantizer

__all__ = ["QUANTIZER_KINDS", "build_quantizer", "parse_levels"]

QUANTIZER_KINDS = ("ema", "vq", "rvq", "fsq")
"""``ema``: :class:`VectorQuantizerEMA`; ``vq``: :class:`VectorQuantizer`; ``rvq``:
:class:`ResidualVQ` (stages ``vq`` or ``ema``); ``fsq``: :class:`FSQ`."""


def parse_levels(levels: str | Sequence[int]) -> list[int]:
    """``"8,5,5,5"`` or ``[8, 5, 5, 5]`` -> ``[8, 5, 5, 5]``."""
    if isinstance(levels, str):
        try:
            return [int(v) for v in levels.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"levels must be comma-separated ints; got {levels!r}") from None
    return [int(v) for v in levels]


def build_quantizer(kind: str, dim: int, **options: Any) -> BaseQuantizer:
    """A quantizer of ``kind`` for inputs with ``dim`` channels.

    ``options`` are the constructor's keyword arguments, e.g.
    ``build_quantizer("ema", 64, num_embeddings=512, decay=0.99)``,
    ``build_quantizer("rvq", 64, num_embeddings=1024, num_quantizers=4, stage="ema")``,
    ``build_quantizer("fsq", 64, levels=[8, 5, 5, 5])`` (in/out projections since
    64 != 4). ``levels`` may be a string ``"8,5,5,5"``.
    """
    options = dict(options)
    if kind == "vq":
        return VectorQuantizer(options.pop("num_embeddings", 512), dim, **options)
    if kind == "ema":
        return VectorQuantizerEMA(options.pop("num_embeddings", 512), dim, **options)
    if kind == "rvq":
        return ResidualVQ(
            options.pop("num_quantizers", 4), options.pop("num_embeddings", 512), dim, **options
        )
    if kind == "fsq":
        levels = parse_levels(options.pop("levels", [8, 5, 5, 5]))
        return FSQ(levels, dim, **options)
    raise ValueError(f"quantizer kind must be one of {QUANTIZER_KINDS}; got {kind!r}")
