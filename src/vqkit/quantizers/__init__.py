"""Quantizers: one module per kind, one output type (:class:`QuantizerOutput`)."""

from .base import BaseQuantizer, CodebookQuantizer, QuantizerOutput
from .ema import VectorQuantizerEMA
from .fsq import FSQ
from .residual import ResidualVQ
from .vq import VectorQuantizer

__all__ = [
    "BaseQuantizer",
    "CodebookQuantizer",
    "FSQ",
    "QuantizerOutput",
    "ResidualVQ",
    "VectorQuantizer",
    "VectorQuantizerEMA",
]
