"""Generate: priors over a tokenizer's codes, autoregressive, masked (MaskGIT) or
next-scale (VAR, over a multi-scale tokenizer's scales).

:class:`Prior` (one transformer for the three kinds, :mod:`vqkit.prior.transformer`),
:func:`sample`, the filters and the raster order (:func:`flatten_codes`) of
:mod:`vqkit.prior.sampling`, the masked kind's
schedules and parallel decoding in :mod:`vqkit.prior.masked`, the next-scale kind's
inputs, block-causal mask and S-pass sampling in :mod:`vqkit.prior.nextscale`, editing in
:mod:`vqkit.prior.editing`, the training job of :mod:`vqkit.prior.trainer` and the
prior run read back by :mod:`vqkit.prior.loading` (:func:`load_prior`,
:func:`load_sample_tokenizer`) and the ``vqkit prior`` / ``vqkit sample`` commands of
:mod:`vqkit.prior.cli`.
"""

from .codes import CodeData, Tokenizer, load_codes, load_tokenizer
from .config import PriorConfig, PriorTrainConfig
from .loading import load_prior, load_sample_tokenizer
from .masked import MaskedSampleOptions, decode
from .pretrained import load_prior_tokenizer
from .sampling import SampleOptions, filter_logits, flatten_codes, guide, sample, unflatten_codes
from .trainer import PriorTrainer
from .transformer import KVCache, Prior

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
    "load_prior",
    "load_prior_tokenizer",
    "load_sample_tokenizer",
    "load_tokenizer",
    "sample",
    "unflatten_codes",
]
