"""Reading format version 1: files whose probabilities came from the float prior.

Version 1 (vqkit 0.1.0) coded every map of a stream under ``softmax(float64(logits))``
of the float prior, run by one KV-cached loop on one CPU thread, position by position
over all N maps at once (t outer, maps inner), and let constriction quantize those
floats. Such a file decodes only where the float prior computes the very same bits as
on the machine that wrote it: the same ATen CPU kernel set and oneDNN ISA, thread count,
torch version and device. Elsewhere the decoded codes fail the file's checksum and the
file is refused (never decoded to a wrong image). Version 2 (:mod:`.streams`,
:mod:`.exact`) has no such limit; re-compressing a version-1 file's decoded maps with
this vqkit makes one.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..prior import Prior
from .coder import RangeDecoder

__all__ = ["MAX_V1_MAPS", "decode_float"]

CODING_THREADS = 1
"""CPU threads of the version-1 loop: the writer's setting (another thread count sums
a matrix product in another order and moves logits by an ulp)."""
MAX_V1_MAPS = 4096
"""A version-1 stream is decoded as one batch (its symbol order interleaves all maps):
at most this many maps, so a header cannot size the KV cache."""


@torch.inference_mode()
def decode_float(prior: Prior, payload: bytes, labels: torch.Tensor) -> np.ndarray:
    """The codes (N, T) int64 of a version-1 payload (N = len(labels)), decoded with the
    float prior exactly as version 1 encoded them. :class:`.coder.CoderError` when the
    payload cannot be decoded; the caller compares the checksum."""
    n, t_len = labels.shape[0], prior.seq_len
    if n > MAX_V1_MAPS:
        raise UserError(
            f"a version-1 stream of {n} maps: this vqkit decodes at most {MAX_V1_MAPS} maps "
            "from a version-1 file (its maps are decoded as one batch)"
        )
    dec = RangeDecoder(payload)
    dev = next(prior.parameters()).device
    was_training, threads = prior.training, torch.get_num_threads()
    prior.eval()
    torch.set_num_threads(CODING_THREADS)
    try:
        cache = prior.new_cache(n)
        out = np.zeros((n, t_len), dtype=np.int64)
        empty = torch.zeros(n, 0, dtype=torch.long, device=dev)
        logits = prior.extend(empty, cache, labels.to(dev))[:, -1]
        for t in range(t_len):
            probs = torch.softmax(logits.double(), dim=-1).cpu().numpy()
            out[:, t] = dec.decode(probs)
            if t + 1 == t_len:
                break
            logits = prior.extend(torch.from_numpy(out[:, t : t + 1]).to(dev), cache)[:, -1]
    finally:
        prior.train(was_training)
        torch.set_num_threads(threads)
    return out
