"""The masked prior (MaskGIT, Chang et al. 2022): mask schedules, the training objective,
masked cross-entropy at fixed ratios, and iterative parallel decoding.

A masked prior (:class:`~vqkit.prior.Prior` with ``kind="masked"``) scores every code
of a map given the codes left visible (:meth:`~vqkit.prior.Prior.fill`). Codes are the
T tokens of the raster order of :func:`~vqkit.prior.flatten_codes`: for residual or
grouped codes (h, w, Q) the Q indices of a position are Q tokens, one after the other
(stage or group 0 first), each masked, scored and decoded on its own; an edit region
hides all Q tokens of the positions it covers.

**Schedules.** ``gamma(r)``, r in [0, 1], is the fraction of the map still hidden:
``cosine`` ``cos(pi r / 2)`` (MaskGIT's default), ``arccos`` ``arccos(r) / (pi / 2)``,
``linear`` ``1 - r``; all fall from gamma(0) = 1 to gamma(1) = 0.

**Training.** For each map draw r ~ U[0, 1), hide ``n = clamp(ceil(gamma(r) T), 1, T)``
codes chosen uniformly at random, and minimise the cross-entropy of the hidden codes
only, ``-mean_{t hidden} log p(c_t | c_visible, y)`` (nats; logged in bits per hidden
code). Class dropout (the null class) is as in the autoregressive prior, so one model
gives both terms of classifier-free guidance.

**Metric.** :func:`masked_bits`: the same cross-entropy with exactly ``round(rho T)``
codes hidden per map, for fixed ratios rho (:data:`EVAL_RATIOS`: 0.25, 0.5, 0.9), masks
drawn from a fixed seed (the same masks at every evaluation). It is not a likelihood:
each hidden code is scored on its own given the visible ones, whereas the
autoregressive prior's NLL is ``-log p(c)`` of the whole map per code; the two measure
different things and are not to be compared as numbers.

**Decoding** (:func:`decode`), S passes for the n hidden codes of a map (all T for a
new sample, the region's codes for an edit). The codes still hidden after pass s are
``m_s = floor(n gamma(s / S))``, forced strictly decreasing to ``m_S = 0``
(:func:`reveal_counts`: codes revealed per pass, each >= 1, summing to n; S <= n).
Pass s: logits of every code (guided, divided by the temperature, top-k / top-p
filtered exactly as :mod:`vqkit.prior.sampling`: :func:`~vqkit.prior.sampling.tempered_logits`,
so a tiny temperature is the greedy limit), one draw ``x_t`` per hidden code,
its confidence ``log p(x_t) + tau_s g_t`` with Gumbel noise ``g_t`` and the choice
temperature annealed to zero, ``tau_s = tau (1 - (s + 1) / S)``; the
``m_{s-1} - m_s`` most confident hidden codes are fixed (never hidden again), the
others stay hidden. One generator drives the draws and the noise: same seed, same maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..options import Options, nonneg, option, positive_int
from .config import SCHEDULE_NAMES, PriorConfig, schedule_name
from .sampling import (
    SampleOptions,
    draw_labels,
    flatten_codes,
    guide,
    in_eval_batches,
    tempered_logits,
)

__all__ = [
    "DEFAULT_STEPS",
    "EVAL_RATIOS",
    "MaskedObjective",
    "MaskedSampleOptions",
    "check_schedule",
    "decode",
    "gamma",
    "masked_bits",
    "masked_loss",
    "ratio_mask",
    "reveal_counts",
    "training_mask",
]

EVAL_RATIOS = (0.25, 0.5, 0.9)
DEFAULT_STEPS = 10  # MaskGIT's 8 to 12 passes at 8 x 8 maps
LEGACY_STEPS = "steps"  # decode_steps's name before it was renamed, still read


def check_schedule(name: str) -> None:
    """ValueError (one line) unless ``name`` is a schedule."""
    if name not in SCHEDULE_NAMES:
        raise UserError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")


def gamma(schedule: str, r: torch.Tensor | float) -> torch.Tensor | float:
    """The hidden fraction ``gamma(r)`` of a schedule at r in [0, 1] (see the module
    docstring): a float for a float, else a tensor in the tensor's dtype."""
    check_schedule(schedule)
    if not torch.is_tensor(r):  # the decoding schedule: plain floats, no tensor overhead
        r = min(max(float(r), 0.0), 1.0)
        if schedule == "cosine":
            return math.cos(0.5 * math.pi * r)
        return math.acos(r) / (0.5 * math.pi) if schedule == "arccos" else 1.0 - r
    r = r.clamp(0.0, 1.0)
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * r)
    if schedule == "arccos":
        return torch.arccos(r) / (0.5 * math.pi)
    return 1.0 - r


def reveal_counts(n: int, steps: int, schedule: str) -> list[int]:
    """Codes revealed by each of ``steps`` passes over ``n`` hidden codes: S ints >= 1
    summing to n. The codes still hidden after pass s are ``floor(n gamma(s / S))``,
    clamped into ``[S - s, m_{s-1} - 1]`` so every pass reveals at least one code."""
    check_schedule(schedule)
    if steps < 1:
        raise UserError(f"steps must be a positive int; got {steps}")
    if steps > n:
        raise UserError(
            f"--decode-steps {steps} is more than the {n} codes to decode: each pass fixes at "
            "least one"
        )
    hidden = [n]
    for s in range(1, steps + 1):
        m = math.floor(n * gamma(schedule, s / steps) + 1e-9)
        hidden.append(max(min(m, hidden[-1] - 1), steps - s))
    return [a - b for a, b in zip(hidden, hidden[1:], strict=False)]


def training_mask(
    batch: int,
    length: int,
    schedule: str,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(batch, length) bool, True = hidden: per row r ~ U[0, 1), ``clamp(ceil(gamma(r)
    length), 1, length)`` positions uniformly at random (the global RNG unless a
    generator is given: a resumed run draws the same masks)."""
    r = torch.rand(batch, device=device, generator=generator)
    n = torch.ceil(gamma(schedule, r.double()) * length).long().clamp(1, length)
    scores = torch.rand(batch, length, device=device, generator=generator)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < n[:, None]


def ratio_mask(
    batch: int, length: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, length) bool on the generator's device: exactly ``clamp(round(ratio
    length), 1, length)`` hidden positions per row, uniformly at random."""
    n = min(max(round(ratio * length), 1), length)
    dev = generator.device if generator is not None else None
    scores = torch.rand(batch, length, generator=generator, device=dev)
    return scores.argsort(dim=1).argsort(dim=1) < n


def masked_loss(logits: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of the hidden codes: logits (B, T, V), codes (B, T),
    mask (B, T) True = hidden; float32 also for half-precision logits."""
    sel = logits[mask]
    return F.cross_entropy(sel.float(), codes[mask])


@torch.no_grad()
def masked_bits(
    model: Any,
    seq: torch.Tensor,
    labels: torch.Tensor | None,
    ratio: float,
    *,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Mean ``-log2 p(c_t | c_visible, y)`` over the hidden codes of the sequences (N, T)
    with ``round(ratio T)`` hidden per map (masks from ``seed``, the same at every call);
    the model's current mode (the trainer calls it in eval mode)."""
    dev = model.tok_emb.weight.device
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, seq.shape[0], batch_size):
        x = seq[i : i + batch_size].to(dev)
        mask = ratio_mask(x.shape[0], x.shape[1], ratio, g).to(dev)
        y = labels[i : i + batch_size].to(dev) if labels is not None else None
        logits = model.fill(x, mask, y)
        ce = F.cross_entropy(logits[mask].double(), x[mask], reduction="sum")
        total += float(ce)
        count += int(mask.sum())
    return total / max(count, 1) / math.log(2.0)


class MaskedObjective:
    """The masked kind's part of the prior job (:class:`~vqkit.prior.PriorTrainer`): its
    training loss and its evaluation; the run loop, optimizer, checkpoints and logs are
    the job's, shared with the autoregressive kind."""

    best_key = "test_masked_bits"

    def __init__(self, config: PriorConfig) -> None:
        if not config.masked:
            raise UserError("MaskedObjective is for a masked prior (kind='masked')")
        self.schedule = config.mask_schedule

    def loss(self, net: Any, seq: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Masks drawn from the schedule, the hidden codes' mean cross-entropy (nats)."""
        mask = training_mask(seq.shape[0], seq.shape[1], self.schedule, seq.device)
        return masked_loss(net(seq, labels, mask), seq, mask)

    def evaluate(
        self,
        model: Any,
        test: tuple[torch.Tensor, torch.Tensor | None],
        train: tuple[torch.Tensor, torch.Tensor | None],
    ) -> dict[str, float]:
        """``test_masked_bits_<pct>`` at each of :data:`EVAL_RATIOS`, their mean
        ``test_masked_bits`` (the best checkpoint's criterion) and
        ``train_masked_bits_50``; bits per hidden code."""
        out: dict[str, float] = {}
        for i, rho in enumerate(EVAL_RATIOS):
            out[f"test_masked_bits_{round(rho * 100)}"] = masked_bits(model, *test, rho, seed=i)
        out["test_masked_bits"] = sum(out.values()) / len(EVAL_RATIOS)
        out["train_masked_bits_50"] = masked_bits(model, *train, 0.5, seed=1)
        return out


@dataclass
class MaskedSampleOptions(Options):
    """How a masked prior decodes (flags of ``vqkit sample``; refused for an
    autoregressive prior)."""

    decode_steps: int | None = option(
        None,
        f"masked prior: decoding passes (default {DEFAULT_STEPS}, or the codes to decode if fewer)",
        type=int,
        check=positive_int,
    )
    schedule: str = option(
        "cosine",
        "masked prior: codes still hidden after each pass, gamma(s/S) (cosine, arccos, linear)",
        check=schedule_name,
    )
    choice_temperature: float = option(
        4.5,
        "masked prior: Gumbel noise on the confidences that choose the codes to keep, "
        "annealed to 0 over the passes; 0: the most likely draws are kept",
        check=nonneg,
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> MaskedSampleOptions:
        """Also reads ``steps``, the name of ``decode_steps`` before it was renamed (so
        that metadata written then, e.g. an ``edit.json``, keeps loading)."""
        return super().from_dict(_renamed(values, where), where=where)

    def resolved(self, hidden: int) -> MaskedSampleOptions:
        """These options with ``decode_steps`` made explicit for ``hidden`` codes to
        decode per map (default: ``min(DEFAULT_STEPS, hidden)``): what :func:`decode`
        runs, and what ``samples.json`` records so that a sample can be drawn again."""
        if self.decode_steps is not None:
            return self
        return replace(self, decode_steps=min(DEFAULT_STEPS, hidden))


def _renamed(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with the old name ``steps`` read as ``decode_steps`` (a None
    ``decode_steps`` counts as not given; two different values are refused)."""
    if LEGACY_STEPS not in values:
        return values
    values = dict(values)
    old = values.pop(LEGACY_STEPS)
    if values.get("decode_steps") not in (None, old):
        raise UserError(
            f"{where}: steps (the old name of decode_steps) is {old!r} but decode_steps is "
            f"{values['decode_steps']!r}; give decode_steps only"
        )
    values["decode_steps"] = old
    return values


def _split_options(
    options: SampleOptions | None, masked: MaskedSampleOptions | None, kwargs: dict[str, Any]
) -> tuple[SampleOptions, MaskedSampleOptions]:
    names = {f.name for f in fields(SampleOptions)}
    mnames = {f.name for f in fields(MaskedSampleOptions)} | {LEGACY_STEPS}
    unknown = set(kwargs) - names - mnames
    if unknown:
        raise TypeError(f"decode() got unexpected options {sorted(unknown)}")
    base = options.to_dict() if options is not None else {}
    opts = SampleOptions.from_dict({**base, **{k: v for k, v in kwargs.items() if k in names}})
    mbase = masked.to_dict() if masked is not None else {}
    given = _renamed({k: v for k, v in kwargs.items() if k in mnames}, "decode()")
    mopts = MaskedSampleOptions.from_dict({**mbase, **given})
    return opts, mopts


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: Any) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _decode_batch(
    prior: Any,
    labels: torch.Tensor | None,
    codes: torch.Tensor,
    hidden: torch.Tensor,
    opts: SampleOptions,
    mopts: MaskedSampleOptions,
    steps: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Fill the hidden codes of (b, T) sequences (the same count in every row)."""
    b, t_len = codes.shape
    n = int(hidden[0].sum())
    counts = reveal_counts(n, steps, mopts.schedule)
    guided = labels is not None and opts.cfg_scale != 1.0
    rows_labels = labels
    if guided:  # rows [0, b): the class; [b, 2b): the null class
        rows_labels = torch.cat((labels, torch.full_like(labels, prior.null_class)))
    codes, hidden = codes.clone(), hidden.clone()
    for s, k in enumerate(counts):
        rows = (codes.repeat(2, 1), hidden.repeat(2, 1)) if guided else (codes, hidden)
        logits = prior.fill(rows[0], rows[1], rows_labels)
        if guided:
            logits = guide(logits[:b], logits[b:], opts.cfg_scale)
        # draws and confidences of the hidden codes only (row-major order of (b, T))
        sel = tempered_logits(logits[hidden], opts)
        logp = torch.log_softmax(sel, dim=-1)
        x = torch.multinomial(logp.exp(), 1, generator=generator)
        c = logp.gather(-1, x).squeeze(-1)
        tau = mopts.choice_temperature * (1.0 - (s + 1) / steps)
        if tau > 0:
            c = c + tau * _gumbel(c.shape, generator, c.device)
        # a hidden code's confidence stays above the fixed codes' -inf: a huge choice
        # temperature overflows tau g to -inf, and topk would then re-pick a fixed code
        # and leave a hidden one undecoded
        c = c.clamp(min=torch.finfo(c.dtype).min)
        draw = codes.masked_scatter(hidden, x.squeeze(-1))
        # fixed codes have no confidence: they are never chosen again
        conf = torch.full(codes.shape, float("-inf"), device=codes.device).masked_scatter(hidden, c)
        chosen = torch.topk(conf, k, dim=1).indices
        reveal = torch.zeros_like(hidden).scatter_(1, chosen, True)
        codes = torch.where(reveal, draw, codes)
        hidden &= ~reveal
    return codes


@torch.no_grad()
def decode(
    prior: Any,
    num: int,
    options: SampleOptions | None = None,
    *,
    masked: MaskedSampleOptions | None = None,
    labels: int | torch.Tensor | list[int] | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    codes: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``num`` index maps (num, *code_shape), int64, from a masked prior in eval mode.

    Args:
        options: temperature, top_k, top_p, cfg_scale (:class:`SampleOptions`);
        masked: decode_steps, schedule, choice_temperature (:class:`MaskedSampleOptions`);
            both may also be given as keyword arguments (``steps``: decode_steps's old
            name).
        labels: one class id, one per map (num,), or None (the null class).
        generator: the random source (on the prior's device); None: the global RNG.
        batch_size: maps decoded together (default all).
        codes, hidden: an edit: the known codes (num, *code_shape) or (num, T) and the
            codes to regenerate (bool, same shape, True = regenerate; the same count in
            every map). Default: every code hidden (a new sample).
    """
    opts, mopts = _split_options(options, masked, kwargs)
    y = draw_labels(prior, num, labels, opts)
    t_len, dev = prior.seq_len, prior.tok_emb.weight.device
    if codes is None:
        codes = torch.zeros(num, t_len, dtype=torch.long, device=dev)
        hidden = torch.ones(num, t_len, dtype=torch.bool, device=dev)
    elif hidden is None:
        raise UserError("an edit needs the mask of the codes to regenerate (hidden)")
    codes = flatten_codes(codes.to(dev), prior.code_shape)
    hidden = hidden.to(dev, torch.bool).reshape(codes.shape)
    if codes.shape[0] != num:
        raise UserError(f"expected {num} code maps; got {codes.shape[0]}")
    n = hidden.sum(1)
    if num and bool((n != n[0]).any()):
        raise UserError("every map of an edit must regenerate the same number of codes")
    if num and int(n[0]) == 0:
        raise UserError("nothing to decode: the region covers no code position")
    steps = mopts.resolved(int(n[0]) if num else 1).decode_steps
    if num:
        reveal_counts(int(n[0]), steps, mopts.schedule)  # checks steps against the codes
    chunks = in_eval_batches(
        prior,
        num,
        batch_size,
        lambda i, n: _decode_batch(
            prior,
            None if y is None else y[i : i + n],
            codes[i : i + n],
            hidden[i : i + n],
            opts,
            mopts,
            steps,
            generator,
        ),
    )
    seq = torch.cat(chunks) if chunks else codes
    return seq.reshape(num, *prior.code_shape)
