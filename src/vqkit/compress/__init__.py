"""Compress: a tokenizer's code maps entropy-coded with its prior.

``encode(images, prior) -> bytes`` and ``decode(bytes, prior) -> images`` (uint8
(N, C, H, W)); ``encode_codes`` / ``decode_codes`` for index maps (lossless);
``load_codec(PRIOR_DIR)`` loads the prior and its tokenizer once. :mod:`.codec` holds
the autoregressive coding loop and its determinism rules, :mod:`.coder` the range
coder (constriction), :mod:`.format` the ``.vqz`` container, :mod:`.cli` the
``vqkit compress`` / ``vqkit decompress`` commands. Needs ``pip install
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
