"""Quantizers: one module per kind, one output type (:class:`QuantizerOutput`)."""

from .base import BaseQuantizer, CodebookQuantizer, QuantizerOutput
from .ema import VectorQuantizerEMA
from .vq import VectorQuantizer

__all__ = [
    "BaseQuantizer",
    "CodebookQuantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "VectorQuantizerEMA",
]
