"""The next-scale prior's exact twin (format model 2): the coding probabilities of a
next-scale (VAR) prior (:mod:`vqkit.prior.nextscale`) in the integer arithmetic of
:mod:`.exact`, the same bits on every machine.

:class:`ExactNextScale` quantizes the prior's weights as :class:`.exact.ExactPrior`
does (the same blocks, LayerNorms, head and frequencies) and differs only where the
float next-scale prior differs from the autoregressive one:

* **Inputs** (``L`` positions, no extra class position): at a position of scale 0 the
  class row ``cls[y]``; at position p of scale k >= 1 the integer sum ``sum_{t<k}
  tok[c[a_t(p)]]`` over p's ancestors (:func:`vqkit.prior.nextscale.layout`'s gather
  table, t ascending; integers, so the order cannot change the sum), then ``+ pos[p] +
  lvl[level(p)]`` (the learned positions and scale embeddings, ``round(E 2**16)`` like
  every embedding). No RoPE (the next-scale kind refuses it).
* **Attention** is block-causal: position p sees the keys q with ``level(q) <=
  level(p)``, the integer softmax over those only.
* **Passes**: the codes of scale k are a function of the label and the codes of the
  scales < k only, so the positions of one scale are computed in one pass, attending to
  the cached coarser scales and to themselves (:meth:`ExactNextScale.logits_range` with
  ``[lo, hi)`` on scale boundaries, :attr:`ExactNextScale.boundaries`). The encoder
  runs whole scales at once (all L positions when they fit), the decoder one scale at a
  time; every operation acts on one row and every product is exact, so a position's
  integers do not depend on the batch, on the chunk or on whether the coarser scales
  came from the cache (tested bit for bit).

Its digest (:meth:`.exact.ExactPrior.digest`) hashes the model number (2) with the
config (kind and scales included), every integer tensor (``lvl`` too) and every scale,
so it never equals a model-1 digest.
"""

from __future__ import annotations

from typing import Any

import torch

from ..prior import KVCache
from ..prior.nextscale import layout, scale_starts
from .exact import RESIDUAL_BITS, ExactPrior, _q

__all__ = ["ExactNextScale", "exact_twin"]


class ExactNextScale(ExactPrior):
    """The integer twin of a next-scale :class:`vqkit.prior.Prior` (module docstring).
    :meth:`logits_range` gives the log2-unit logits (int64, EXP_BITS fractional bits) of
    whole scales; :meth:`logits` the teacher-forced pass over all L positions."""

    KIND = "next-scale"
    MODEL = 2

    def __init__(self, prior: Any) -> None:
        super().__init__(prior)  # refuses the other kinds; blocks, norms, head, tok, cls, pos
        self.scales = [int(s) for s in prior.config.scales]
        self.starts = scale_starts(self.scales)
        with torch.no_grad():
            self.lvl = _q(prior.lvl_emb.weight, RESIDUAL_BITS)
        self.level, self.mask, self.ancestors = layout(self.scales)

    def to(self, device: torch.device | str) -> ExactNextScale:
        super().to(device)
        self.lvl = self.lvl.to(self.device)
        self.level, self.mask, self.ancestors = (
            t.to(self.device) for t in (self.level, self.mask, self.ancestors)
        )
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "lvl": self.lvl}

    @property
    def boundaries(self) -> list[int]:
        """The scale boundaries ``start_0 = 0 < start_1 < .. < start_S = L``: a pass
        computes whole scales (a position sees every position of its own scale)."""
        return list(self.starts)

    def inputs(self, codes: torch.Tensor, labels: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The integer inputs (B, hi - lo, C) at RESIDUAL_BITS of positions ``[lo, hi)``:
        ``cls[y]`` on scale 0, else the ancestor sum; ``+ pos + lvl``. ``codes`` (B, L):
        only the scales coarser than position ``hi - 1``'s are read."""
        codes, labels = codes.to(self.device), labels.to(self.device)
        b, length = codes.shape[0], self.seq_len
        emb = torch.cat((self.tok[codes], self.tok.new_zeros(b, 1, self.tok.shape[1])), dim=1)
        anc = self.ancestors[:, lo:hi]  # L (the zero row) where a scale is not coarser
        x = self.tok.new_zeros(b, hi - lo, self.tok.shape[1])
        for t in range(anc.shape[0]):  # t ascending (exact: any order gives these integers)
            if bool((anc[t] < length).any()):
                x = x + emb[:, anc[t]]
        first = (self.level[lo:hi] == 0)[None, :, None]
        x = torch.where(first, self.cls[labels][:, None], x)
        return x + self.pos[lo:hi] + self.lvl[self.level[lo:hi]]

    @torch.inference_mode()
    def logits_range(
        self, codes: torch.Tensor, cache: KVCache, labels: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        """The log2-unit logits (B, hi - lo, V) of positions ``[lo, hi)``, two scale
        boundaries, given ``codes`` (B, L) (only the scales before ``hi``'s last are
        read) and ``labels`` (B,); the cache holds positions ``[0, lo)`` and is advanced
        to ``hi``. Block-causal: position p attends to the keys of scales ``<= level(p)``."""
        if cache.length != lo or lo not in self.starts or hi not in self.starts or hi <= lo:
            raise ValueError(
                f"positions [{lo}, {hi}) after a cache of {cache.length}: next-scale passes "
                f"take whole scales (boundaries {self.starts})"
            )
        if codes.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} codes per sequence; got {codes.shape[1]}")
        x = self.inputs(codes, labels, lo, hi)
        valid = self.mask[lo:hi, :hi]
        for i, block in enumerate(self.blocks):
            x = block(x, i, cache, valid)
        cache.advance(hi - lo)
        return self.head(self.ln_f(x))

    def logits(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: the logits (B, L, V) of every position in one pass."""
        return self.logits_range(codes, self.new_cache(codes.shape[0]), labels, 0, self.seq_len)

    def extend(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ValueError(
            "extend is the autoregressive twin's; a next-scale twin computes whole scales "
            "(logits_range, logits)"
        )


def exact_twin(prior: Any) -> ExactPrior:
    """The exact twin of ``prior`` by its kind: :class:`ExactNextScale` (model 2) for a
    next-scale prior, :class:`.exact.ExactPrior` (model 1) otherwise (which refuses a
    masked prior in one line)."""
    if prior.config.next_scale:
        return ExactNextScale(prior)
    return ExactPrior(prior)
