"""Generate: an autoregressive prior over a tokenizer's codes.

:class:`Prior` (a decoder-only transformer, :mod:`vqkit.prior.transformer`),
:func:`sample` and the filters of :mod:`vqkit.prior.sampling`, the training loop of
:mod:`vqkit.prior.trainer` and the ``vqkit prior`` / ``vqkit sample`` commands of
:mod:`vqkit.prior.cli`.
"""

from .codes import CodeData, Tokenizer, load_codes, load_tokenizer
from .config import PriorConfig, PriorTrainConfig
from .pretrained import load_prior_tokenizer
from .sampling import SampleOptions, filter_logits, guide, sample
from .trainer import PriorTrainer
from .transformer import KVCache, Prior, flatten_codes, unflatten_codes

__all__ = [
    "CodeData",
    "KVCache",
    "Prior",
    "PriorConfig",
    "PriorTrainConfig",
    "PriorTrainer",
    "SampleOptions",
    "Tokenizer",
    "filter_logits",
    "flatten_codes",
    "guide",
    "load_codes",
    "load_prior_tokenizer",
    "load_tokenizer",
    "sample",
    "unflatten_codes",
]
