"""The next-scale prior (VAR, Tian et al. 2024) over a multi-scale tokenizer's codes.

A multi-scale tokenizer (``--quantizer multiscale``) gives one image ``S`` scales of sides
``s_0 < .. < s_{S-1}`` (the quantizer contract's ``code_group_shapes``; the prior's
``config.scales``), one ``(L,)`` sequence, ``L = sum_k s_k^2``: scale 0's ``s_0 x s_0``
map in raster order, then scale 1's, .. Position ``p`` of scale ``k`` (``level(p) = k``)
at row i, column j of its map is ``p = start_k + i s_k + j``, ``start_k = sum_{t<k}
s_t^2``. The prior factorises over scales, each scale's codes independent given the
coarser ones::

    p(c | y) = prod_k prod_{p in scale k} p(c_p | c_{scales < k}, y)

**Model** (:class:`~vqkit.prior.Prior` with ``kind="next-scale"``; the same blocks, head
and embeddings as the other kinds), exactly L positions, no extra class position:

* input at a position of scale 0: ``cls_emb(y)`` (the null class when unconditional or
  dropped by class dropout);
* input at position p of scale k >= 1: ``sum_{t=0}^{k-1} tok_emb(c[a_t(p)])``, summed in
  that order, where ``a_t(p)`` is p's ancestor on scale t, nearest-neighbour in integer
  arithmetic: ``(i, j) -> (i s_t // s_k, j s_t // s_k)``, i.e.
  ``a_t(p) = start_t + (i s_t // s_k) s_t + (j s_t // s_k)``. It is an index gather
  (:func:`layout`'s ``ancestors`` table (S, L): ``a_t(p)``, or ``L`` where ``t >=
  level(p)``, a zero row), so an integer twin can reproduce it bit for bit;
* plus ``pos_emb[p]`` (L learned positions) and ``lvl_emb[level(p)]`` (S learned scale
  embeddings), then dropout and the blocks (rotary positions are refused for this kind);
* attention is block-causal: position p attends to key q iff ``level(q) <= level(p)``
  (:func:`layout`'s ``mask`` (L, L), True = attend, the ``attn_mask`` of
  :func:`torch.nn.functional.scaled_dot_product_attention`);
* the output at position p (``head(ln_f(x_p))``) is the logits of ``c_p``.

So the logits of scale k are a function of the label and the codes of scales < k only:
:func:`logits` is one teacher-forced pass over all L positions, the training loss the
mean cross-entropy over them (:meth:`Prior.loss`), ``log p(c | y)`` their sum
(:meth:`Prior.log_prob`).

**Sampling** (:func:`sample`): S passes. Pass k feeds scale k's ``s_k^2`` inputs (known
once scales < k are drawn) through the blocks, the KV cache holding scales < k (the new
block attends to the cache and to itself, which the mask allows entirely), and draws all
of scale k's codes at once from its logits: classifier-free guidance, temperature, top-k,
top-p exactly as the autoregressive prior (:mod:`vqkit.prior.sampling`: ``guide``,
``draw``), one multinomial draw per code in row-major (map, position) order from the
caller's generator. ``use_cache=False`` recomputes scales 0..k at every pass (the
reference). ``keep_scales=n`` with ``codes`` keeps the first n scales of given maps and
draws the finer ones (an edit of the detail of an image; on the command line ``vqkit
sample --edit IMAGE --keep-scales N``, :mod:`vqkit.prior.scale_editing`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserError
from .sampling import (
    SampleOptions,
    draw,
    draw_labels,
    flatten_codes,
    guide,
    in_eval_batches,
    sample_options,
)

__all__ = ["inputs", "layout", "logits", "passes", "sample", "scale_starts"]


def scale_starts(scales: list[int]) -> list[int]:
    """``[start_0, .., start_S]``: where each scale begins in the sequence, then L."""
    out = [0]
    for s in scales:
        out.append(out[-1] + s * s)
    return out


def layout(scales: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(level, mask, ancestors) of the scales (see the module docstring):

    * ``level`` int64 (L,): the scale of each position;
    * ``mask`` bool (L, L): ``mask[p, q] = level(q) <= level(p)`` (True = p attends to q);
    * ``ancestors`` int64 (S, L): ``a_t(p)`` where ``t < level(p)``, else L (a zero row).
    """
    starts = scale_starts(scales)
    length = starts[-1]
    level = torch.cat([torch.full((s * s,), k, dtype=torch.long) for k, s in enumerate(scales)])
    mask = level[None, :] <= level[:, None]
    ancestors = torch.full((len(scales), length), length, dtype=torch.long)
    for k, sk in enumerate(scales):
        i = torch.arange(sk).repeat_interleave(sk)  # row, column of each position of scale k
        j = torch.arange(sk).repeat(sk)
        for t in range(k):
            st = scales[t]
            ancestors[t, starts[k] : starts[k + 1]] = starts[t] + (i * st // sk) * st + j * st // sk
    return level, mask, ancestors


def inputs(prior: Any, codes: torch.Tensor, labels: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The token inputs (B, hi - lo, C) of positions ``[lo, hi)`` before positions and
    scale embeddings: ``cls_emb(y)`` on scale 0, the ancestor sum elsewhere.

    ``codes`` (B, L): only the codes of scales coarser than position ``hi - 1``'s are
    read (the others may hold anything); ``labels`` (B,) class ids, the null class
    included (no dropout here)."""
    emb = prior.tok_emb(codes)
    emb = torch.cat((emb, emb.new_zeros(emb.shape[0], 1, emb.shape[2])), dim=1)  # row L: 0
    anc = prior.scale_ancestors[:, lo:hi]
    x = emb.new_zeros(emb.shape[0], hi - lo, emb.shape[2])
    for t in range(anc.shape[0]):  # t ascending: the documented order of the sum
        if bool((anc[t] < codes.shape[1]).any()):
            x = x + emb[:, anc[t]]
    first = (prior.scale_level[lo:hi] == 0)[None, :, None]
    return torch.where(first, prior.cls_emb(labels)[:, None], x)


def _blocks(prior: Any, x: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
    """Logits (B, n, V) of positions ``[start, start + n)`` from their token inputs (B, n,
    C), the cache (when given) holding positions ``[0, start)`` and advanced past them."""
    end = start + x.shape[1]
    x = x + prior.pos_emb.weight[start:end] + prior.lvl_emb(prior.scale_level[start:end])
    x = prior.drop(x)
    mask = prior.scale_mask[start:end, :end]
    for block in prior.blocks:
        x = block(x, start, cache, None, mask)
    if cache is not None:
        cache.advance(x.shape[1])
    return prior.head(prior.ln_f(x))


def logits(prior: Any, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher-forced logits (B, L, V) of codes (B, L) (or (B, *code_shape)): row p scores
    ``c_p`` given the label and the codes of the scales coarser than p's. Runs in the
    model's current mode (dropout and class dropout in training)."""
    seq = flatten_codes(codes, prior.code_shape)
    if seq.shape[1] != prior.seq_len:
        raise ValueError(f"expected {prior.seq_len} codes per sequence; got {seq.shape[1]}")
    y = prior._labels(labels, seq.shape[0], seq.device)
    return _blocks(prior, inputs(prior, seq, y, 0, seq.shape[1]), 0, None)


def passes(
    prior: Any,
    codes: torch.Tensor,
    labels: torch.Tensor | None,
    choose: Callable[[int, torch.Tensor], torch.Tensor],
    keep_scales: int = 0,
    use_cache: bool = True,
) -> torch.Tensor:
    """Scale by scale: for k = keep_scales .. S-1, the logits (B, s_k^2, V) of scale k
    given the codes so far go to ``choose(k, logits)``, whose (B, s_k^2) codes become
    scale k's. ``codes`` (B, L): the first ``keep_scales`` scales are kept (the rest is
    not read); returns a new (B, L). With the KV cache each pass runs scale k's positions
    only; ``use_cache=False`` recomputes scales 0..k (the reference). The model's
    current mode; ``labels`` None: the null class."""
    scales = prior.config.scales
    starts = scale_starts(scales)
    codes = codes.clone()
    y = prior._labels(labels, codes.shape[0], codes.device)
    cache = prior.new_cache(codes.shape[0]) if use_cache else None
    if cache is not None and keep_scales > 0:  # the kept scales in one chunk
        _blocks(prior, inputs(prior, codes, y, 0, starts[keep_scales]), 0, cache)
    for k in range(keep_scales, len(scales)):
        lo, hi = starts[k], starts[k + 1]
        if cache is not None:
            out = _blocks(prior, inputs(prior, codes, y, lo, hi), lo, cache)
        else:
            out = _blocks(prior, inputs(prior, codes, y, 0, hi), 0, None)[:, lo:]
        codes[:, lo:hi] = choose(k, out)
    return codes


def _sample_batch(
    prior: Any,
    labels: torch.Tensor | None,
    given: torch.Tensor,
    opts: SampleOptions,
    generator: torch.Generator | None,
    keep_scales: int,
    use_cache: bool,
) -> torch.Tensor:
    """(b, L) codes: ``given``'s first ``keep_scales`` scales, the rest drawn."""
    b = given.shape[0]
    guided = labels is not None and opts.cfg_scale != 1.0
    if guided:  # rows [0, b): the class; [b, 2b): the null class
        labels = torch.cat((labels, torch.full_like(labels, prior.null_class)))
    rows = 2 if guided else 1

    def choose(k: int, out: torch.Tensor) -> torch.Tensor:
        if guided:
            out = guide(out[:b], out[b:], opts.cfg_scale)
        n, v = out.shape[1], out.shape[2]
        return draw(out.reshape(b * n, v), opts, generator).view(b, n).repeat(rows, 1)

    return passes(prior, given.repeat(rows, 1), labels, choose, keep_scales, use_cache)[:b]


@torch.no_grad()
def sample(
    prior: Any,
    num: int,
    options: SampleOptions | None = None,
    *,
    labels: int | torch.Tensor | list[int] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    use_cache: bool = True,
    codes: torch.Tensor | None = None,
    keep_scales: int = 0,
    **kwargs: Any,
) -> torch.Tensor:
    """Draw ``num`` code sequences (num, L), int64, from a next-scale prior in eval mode,
    in S passes (see the module docstring).

    Args:
        options: temperature, top_k, top_p, cfg_scale (:class:`SampleOptions`, or as
            keyword arguments).
        labels: one class id, one per sample (num,), or None (the null class).
        generator: the random source (on the prior's device); None: the global RNG.
        batch_size: sequences drawn together (default all).
        use_cache: the KV cache (False: recompute the coarser scales at every pass).
        codes, keep_scales: keep the first ``keep_scales`` scales (in [0, S-1]) of the
            given codes (num, L) and draw the finer ones.
    """
    opts = sample_options(options, kwargs)
    y = draw_labels(prior, num, labels, opts)
    scales, length = prior.config.scales, prior.seq_len
    dev = prior.tok_emb.weight.device
    if isinstance(keep_scales, bool) or not 0 <= keep_scales < len(scales):
        raise UserError(
            f"keep_scales must be an int in [0, {len(scales) - 1}] (the prior has "
            f"{len(scales)} scales); got {keep_scales!r}"
        )
    if keep_scales and codes is None:
        raise UserError("keep_scales needs the codes whose coarse scales are kept")
    if codes is None:
        codes = torch.zeros(num, length, dtype=torch.long, device=dev)
    codes = flatten_codes(codes.to(dev), prior.code_shape)
    if codes.shape[0] != num:
        raise UserError(f"expected {num} code sequences; got {codes.shape[0]}")
    chunks = in_eval_batches(
        prior,
        num,
        batch_size,
        lambda i, n: _sample_batch(
            prior,
            None if y is None else y[i : i + n],
            codes[i : i + n],
            opts,
            generator,
            keep_scales,
            use_cache,
        ),
    )
    seq = torch.cat(chunks) if chunks else codes
    return seq.reshape(num, *prior.code_shape)
