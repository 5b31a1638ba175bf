"""Generate: priors over a tokenizer's codes, autoregressive or masked (MaskGIT).

:class:`Prior` (one transformer for both kinds, :mod:`vqkit.prior.transformer`),
:func:`sample` and the filters of :mod:`vqkit.prior.sampling`, the masked kind's
schedules and parallel decoding in :mod:`vqkit.prior.masked`, editing in
:mod:`vqkit.prior.editing`, the training job of :mod:`vqkit.prior.trainer` and the
``vqkit prior`` / ``vqkit sample`` commands of :mod:`vqkit.prior.cli`.
"""

from .codes import CodeData, Tokenizer, load_codes, load_tokenizer
from .config import PriorConfig, PriorTrainConfig
from .masked import MaskedSampleOptions, decode
from .pretrained import load_prior_tokenizer
from .sampling import SampleOptions, filter_logits, guide, sample
from .trainer import PriorTrainer
from .transformer import KVCache, Prior, flatten_codes, unflatten_codes

__all__ = [
    "CodeData",
    "KVCache",
    "MaskedSampleOptions",
    "Prior",
    "PriorConfig",
    "PriorTrainConfig",
    "PriorTrainer",
    "SampleOptions",
    "Tokenizer",
    "decode",
    "filter_logits",
    "flatten_codes",
    "guide",
    "load_codes",
    "load_prior_tokenizer",
    "load_tokenizer",
    "sample",
    "unflatten_codes",
]
