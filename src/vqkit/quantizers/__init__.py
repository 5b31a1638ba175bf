"""Quantizers: one module per kind, one output type (:class:`QuantizerOutput`)."""

from .base import BaseQuantizer, CodebookQuantizer, QuantizerOutput
from .ema import VectorQuantizerEMA
from .factory import QUANTIZER_KINDS, build_quantizer, parse_levels
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
    "QUANTIZER_KINDS",
    "build_quantizer",
    "parse_levels",
]
