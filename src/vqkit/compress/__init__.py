"""Compress: a tokenizer's code maps entropy-coded with its prior.

``encode(images, prior) -> bytes`` and ``decode(bytes, prior) -> images`` (uint8
(N, C, H, W)); ``encode_codes`` / ``decode_codes`` for index maps (lossless);
``load_codec(PRIOR_DIR)`` loads the prior, its exact integer twin and its tokenizer once.
:mod:`.codec` holds the API and the codec, :mod:`.exact` (on :mod:`.intmath`) the prior's
integer twin whose coding frequencies are the same on every machine (and
:mod:`.exact_nextscale` the next-scale prior's), :mod:`.streams` the
coding loops of format version 2, :mod:`.legacy` version-1 files, :mod:`.coder` the range
coder (constriction), :mod:`.format` the ``.vqz`` container (docs/format.md), :mod:`.cli`
the ``vqkit compress`` / ``vqkit decompress`` commands. Needs ``pip install
'vqkit[compress]'`` (constriction).
"""

from .codec import (
    Codec,
    DecodeError,
    codes_to_images,
    decode,
    decode_codes,
    encode,
    encode_codes,
    images_to_codes,
    load_codec,
    prior_hash,
)
from .format import FormatError, Header

__all__ = [
    "Codec",
    "DecodeError",
    "FormatError",
    "Header",
    "codes_to_images",
    "decode",
    "decode_codes",
    "encode",
    "encode_codes",
    "images_to_codes",
    "load_codec",
    "prior_hash",
]
