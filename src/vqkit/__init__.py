"""vqkit: vector quantization for PyTorch.

The VQ-VAE quantizer layers (gradient-trained and EMA) on an exact, chunked
nearest-code search that never builds the N x K distance matrix.
"""

from .metrics import code_counts, perplexity, usage_fraction
from .quantizers import FSQ, QuantizerOutput, ResidualVQ, VectorQuantizer, VectorQuantizerEMA
from .quantizers.bsq import BSQ
from .quantizers.grouped import GroupedVQ
from .quantizers.ibq import IBQ
from .quantizers.lfq import LFQ
from .quantizers.multiscale import MultiScaleVQ
from .quantizers.simvq import SimVQ
from .search import nearest_code, squared_distances

__version__ = "0.1.0"

__all__ = [
    "BSQ",
    "FSQ",
    "GroupedVQ",
    "IBQ",
    "LFQ",
    "MultiScaleVQ",
    "QuantizerOutput",
    "ResidualVQ",
    "SimVQ",
    "VectorQuantizer",
    "VectorQuantizerEMA",
    "code_counts",
    "nearest_code",
    "perplexity",
    "squared_distances",
    "usage_fraction",
    "__version__",
]
