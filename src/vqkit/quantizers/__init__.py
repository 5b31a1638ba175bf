"""Quantizers: one module per kind, one output type (:class:`QuantizerOutput`), one
contract (:class:`BaseQuantizer`), one registry of kinds (:mod:`.registry`).

Importing this package registers every built-in kind (each module registers itself).
"""

from .base import BaseQuantizer
from .bsq import BSQ, BSQOptions
from .codebook_base import CodebookOptions, CodebookQuantizer
from .ema import EMAOptions, VectorQuantizerEMA
from .fsq import FSQ, FSQOptions, parse_levels
from .grouped import GroupedVQ, GroupedVQOptions
from .ibq import IBQ, IBQOptions, ibq_lookup
from .lfq import LFQ, BinaryOptions, BinaryQuantizer, LFQOptions
from .multiscale import MultiScaleOptions, MultiScaleVQ
from .output import QuantizerOutput
from .registry import (
    QuantizerKind,
    QuantizerOptions,
    build_quantizer,
    get_kind,
    quantizer_kinds,
    register_quantizer,
)
from .residual import ResidualVQ, RVQOptions
from .simvq import SimVQ, SimVQOptions
from .vq import VectorQuantizer, VQOptions

__all__ = [
    "BSQ",
    "BSQOptions",
    "BinaryOptions",
    "BinaryQuantizer",
    "LFQ",
    "LFQOptions",
    "MultiScaleOptions",
    "MultiScaleVQ",
    "BaseQuantizer",
    "CodebookOptions",
    "CodebookQuantizer",
    "EMAOptions",
    "FSQ",
    "FSQOptions",
    "GroupedVQ",
    "GroupedVQOptions",
    "IBQ",
    "IBQOptions",
    "QuantizerKind",
    "QuantizerOptions",
    "QuantizerOutput",
    "RVQOptions",
    "ResidualVQ",
    "SimVQ",
    "SimVQOptions",
    "VQOptions",
    "VectorQuantizer",
    "VectorQuantizerEMA",
    "build_quantizer",
    "get_kind",
    "ibq_lookup",
    "parse_levels",
    "quantizer_kinds",
    "register_quantizer",
]
