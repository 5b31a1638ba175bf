"""Drawing codes from a :class:`~vqkit.prior.Prior`: guidance, temperature, top-k, top-p.

At each position the next code's logits ``l`` (V,) go through, in order:

1. classifier-free guidance (Ho & Salimans, 2022), when ``cfg_scale != 1``::

       l = l_uncond + s * (l_cond - l_uncond)

   ``s = 1`` is the plain conditional model, ``s = 0`` the unconditional one (the null
   class), ``s > 1`` sharpens towards the class. Rows for both labels run in one batch.
2. temperature: ``l / temperature``;
3. top-k: keep the k largest logits (and ties with the k-th);
4. top-p (nucleus, Holtzman et al., 2020): sort the probabilities ``softmax(l)`` in
   decreasing order and keep the shortest prefix whose mass reaches p (the most likely
   code always stays);

then one code is drawn from ``softmax(l)`` with the caller's generator, so a seed fixes
the samples. Decoding uses the prior's KV cache (``use_cache=False`` recomputes the
whole prefix at every position: the slow reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import UserError
from ..options import Options, option, positive, positive_int, unit_interval_excl_zero


class Prior(Protocol):
    """What sampling needs of a prior (:class:`vqkit.prior.Prior` is one): a KV-cached
    step, the code map's shape and the class slots."""

    config: Any

    @property
    def null_class(self) -> int | None: ...

    def new_cache(self, batch: int) -> Any: ...

    def extend(self, codes: torch.Tensor, cache: Any, labels: Any = None) -> torch.Tensor: ...

    def __call__(self, codes: torch.Tensor, labels: Any = None) -> torch.Tensor: ...


__all__ = [
    "PAD",
    "SampleOptions",
    "draw",
    "filter_logits",
    "flatten_codes",
    "guide",
    "sample",
    "tempered_logits",
    "unflatten_codes",
]


PAD = -1
"""A padded position of a sequence: the tail of a window shorter than the prior's
sequence (a speech codec's last window of a clip, :mod:`vqkit.prior.audio_codes`).
Padding is always a suffix: an autoregressive prior's loss and log-likelihood leave it
out, and the codes before it never see it (causal attention)."""


def flatten_codes(indices: torch.Tensor, code_shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Index maps (B, *code_shape) -> raster-ordered sequences (B, T), int64.

    Row-major flattening, so residual codes (B, h, w, Q) become ``[pos0 stage0 .. pos0
    stage Q-1, pos1 stage0, ..]``. Sequences (B, T) pass through."""
    shape = tuple(code_shape)
    t = math.prod(shape)
    if indices.dim() == 2 and indices.shape[1] == t:
        return indices.long()
    if tuple(indices.shape[1:]) != shape:
        raise ValueError(
            f"expected index maps (B, {', '.join(map(str, shape))}) or sequences (B, {t}); "
            f"got shape {tuple(indices.shape)}"
        )
    return indices.reshape(indices.shape[0], t).long()


def unflatten_codes(seq: torch.Tensor, code_shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Sequences (B, T) -> index maps (B, *code_shape): the inverse of :func:`flatten_codes`."""
    return seq.reshape(seq.shape[0], *code_shape)


@dataclass
class SampleOptions(Options):
    """How codes are drawn (flags of ``vqkit sample``)."""

    temperature: float = option(1.0, "divide the logits by this (> 0; < 1 sharper)", check=positive)
    top_k: int | None = option(
        None, "keep only the k most likely codes (>= 1; default all)", type=int, check=positive_int
    )
    top_p: float = option(
        1.0,
        "keep the most likely codes whose probability mass reaches p, in (0, 1]",
        check=unit_interval_excl_zero,
    )
    cfg_scale: float = option(
        1.0,
        "classifier-free guidance scale s: uncond + s * (cond - "
        "uncond); 1: conditional only, 0: unconditional",
    )


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0
) -> torch.Tensor:
    """Logits (..., V) with the codes outside the top-k, then outside the top-p nucleus,
    set to -inf (see the module docstring). ``top_k=None`` and ``top_p=1`` keep all."""
    if top_k is not None:
        if top_k < 1:
            raise UserError(f"top_k must be >= 1; got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1]; got {top_p}")
    if top_p < 1.0:  # at 1 rounding in the cumulative sum could drop tail codes
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely codes
        drop_sorted = before >= top_p  # the prefix already reached p without this code
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def tempered_logits(logits: torch.Tensor, opts: SampleOptions) -> torch.Tensor:
    """float32 ``(l - max l) / temperature`` of (..., V) logits, then top-k / top-p
    filtered: what both kinds of prior draw from (``softmax`` of it)."""
    # shifted so the largest logit is 0, divided in float64: a tiny temperature (1e-40)
    # then gives 0 and -inf (the greedy limit), never inf - inf = NaN, and the result
    # fits float32
    logits = logits.double()
    logits = ((logits - logits.amax(-1, keepdim=True)) / opts.temperature).float()
    return filter_logits(logits, opts.top_k, opts.top_p)


def draw(
    logits: torch.Tensor, opts: SampleOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """One code per row of (B, V) logits, int64 (B,): ``softmax`` of
    :func:`tempered_logits`, one multinomial draw per row in row order."""
    probs = torch.softmax(tempered_logits(logits, opts), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_options(options: SampleOptions | None, kwargs: dict[str, Any]) -> SampleOptions:
    """``options`` with the keyword arguments given on top (each a :class:`SampleOptions`
    field), checked."""
    if options is None:
        return SampleOptions(**kwargs)
    return SampleOptions.from_dict({**options.to_dict(), **kwargs}) if kwargs else options


def draw_labels(prior: Any, num: int, labels: Any, opts: SampleOptions) -> torch.Tensor | None:
    """The (num,) class ids of ``num`` draws (None: the null class), checked, and with
    guidance (``cfg_scale != 1``) checked to be meaningful: both kinds of prior use it."""
    if num < 0:
        raise UserError(f"num must be >= 0; got {num}")
    y = _labels(prior, num, labels)
    if opts.cfg_scale != 1.0:
        if y is None:
            raise UserError("cfg_scale != 1 needs class labels (guidance is towards a class)")
        if prior.config.class_dropout == 0:
            raise UserError(
                "this prior was trained with class_dropout=0: its null class is untrained, "
                "so classifier-free guidance (cfg_scale != 1) is meaningless"
            )
    return y


def in_eval_batches(
    prior: Any, num: int, batch_size: int | None, draw: Callable[[int, int], torch.Tensor]
) -> list[torch.Tensor]:
    """``draw(start, n)`` for consecutive batches of ``batch_size`` (default: all ``num``)
    with the prior in eval mode (its mode restored after): both kinds of prior decode so."""
    bs = batch_size or max(num, 1)
    if bs < 1:
        raise UserError(f"batch_size must be >= 1; got {bs}")
    was_training = prior.training
    prior.eval()
    try:
        return [draw(i, min(bs, num - i)) for i in range(0, num, bs)]
    finally:
        prior.train(was_training)


def _labels(prior: Prior, num: int, labels: Any) -> torch.Tensor | None:
    if labels is None:
        return None
    dev = prior.tok_emb.weight.device
    y = torch.as_tensor(labels, dtype=torch.long, device=dev).reshape(-1)
    if y.numel() == 1:
        y = y.expand(num)
    if y.numel() != num:
        raise UserError(f"expected one label or {num}; got {y.numel()}")
    c = prior.config.num_classes
    if c == 0:
        raise UserError("this prior is unconditional (trained without classes): no class ids")
    bad = (y < 0) | (y >= c)
    if bool(bad.any()):
        raise UserError(f"class id {int(y[bad][0])} out of range: the prior has classes 0..{c - 1}")
    return y


def _sample_batch(
    prior: Prior,
    labels: torch.Tensor | None,
    batch: int,
    opts: SampleOptions,
    generator: torch.Generator | None,
    use_cache: bool,
) -> torch.Tensor:
    """(batch, T) codes."""
    t_len = prior.seq_len
    dev = prior.tok_emb.weight.device
    guided = labels is not None and opts.cfg_scale != 1.0
    if guided:  # rows [0, B): the class; [B, 2B): the null class
        labels = torch.cat((labels, torch.full_like(labels, prior.null_class)))
    rows = 2 * batch if guided else batch
    out = torch.zeros(rows, t_len, dtype=torch.long, device=dev)
    cache = prior.new_cache(rows) if use_cache else None
    logits = prior.extend(out[:, :0], cache, labels)[:, -1]
    for t in range(t_len):
        if guided:
            logits = guide(logits[:batch], logits[batch:], opts.cfg_scale)
        out[:, t] = draw(logits, opts, generator).repeat(rows // batch)
        if t + 1 == t_len:
            break
        if use_cache:
            logits = prior.extend(out[:, t : t + 1], cache)[:, -1]
        else:  # the reference: the whole prefix again
            logits = prior.extend(out[:, : t + 1], None, labels)[:, -1]
    return out[:batch]


@torch.no_grad()
def sample(
    prior: Prior,
    num: int,
    options: SampleOptions | None = None,
    *,
    labels: int | torch.Tensor | list[int] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    use_cache: bool = True,
    **kwargs: Any,
) -> torch.Tensor:
    """Draw ``num`` index maps (num, *code_shape), int64, from ``prior`` in eval mode.

    Args:
        options: temperature, top_k, top_p, cfg_scale (or give them as keyword
            arguments); see :class:`SampleOptions` and the module docstring.
        labels: one class id for all, one per sample (num,), or None: the null class
            (unconditional). Guidance (``cfg_scale != 1``) needs labels.
        generator: the random source (on the prior's device); None: the global RNG.
        batch_size: samples decoded together (default: all ``num``).
        use_cache: decode with the KV cache (False: recompute the prefix each step).
    """
    opts = sample_options(options, kwargs)
    y = draw_labels(prior, num, labels, opts)
    chunks = in_eval_batches(
        prior,
        num,
        batch_size,
        lambda i, n: _sample_batch(
            prior, None if y is None else y[i : i + n], n, opts, generator, use_cache
        ),
    )
    dev = prior.tok_emb.weight.device
    seq = (
        torch.cat(chunks) if chunks else torch.zeros(0, prior.seq_len, dtype=torch.long, device=dev)
    )
    return seq.reshape(num, *prior.code_shape)
