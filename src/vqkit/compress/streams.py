"""The coding loops of format version 2: code maps to range-coder payloads and back,
under an exact integer prior (:class:`.exact.ExactPrior`, model 1, or
:class:`.exact_nextscale.ExactNextScale`, model 2).

**Symbol order.** A stream's N maps are coded in groups of :data:`GROUP` consecutive
maps (the last group may be smaller), one group after the other; inside a group,
position t = 0 .. T-1 in the prior's sequence order (raster order; a multi-scale
tokenizer's scales coarse to fine), and at each t the group's maps in order. A decoder
therefore holds the KV cache of one group, never of N maps: its memory does not grow
with the map count a header claims. Since the order is the sequence order, the first
scales of a group's maps come first: a decoder may stop after them (``stops``). A
stream's last map may be shorter than T (``tails``: a speech codec's last window of a
clip, :mod:`.audio`): its positions from its tail on are not coded, and at those
positions the order simply skips it.

**Encoder and decoder compute the same integers by construction**, not by running the
same float operations: the exact prior's outputs do not depend on the batch a map shares
or on whether its prefix came from a KV cache. Both loops go through the twin's
``logits_range(codes, cache, labels, lo, hi)`` between its ``boundaries`` (every
position for model 1, the scale boundaries for model 2): the encoder runs teacher-forced
passes as long as memory allows (chunks of boundaries), the decoder one step at a time
(a position, or a whole scale, whose symbols are then range-decoded position by
position), and several streams (files) are decoded side by side in one batch: each with
its own range decoder, each group whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .coder import CoderError, RangeDecoder, RangeEncoder
from .exact import ExactPrior

__all__ = ["GROUP", "StreamStats", "decode_streams", "encode_streams"]

SLACK_BITS = 128
"""A payload of b bytes never holds codes whose information content under the integer
frequencies exceeds ``8 b + SLACK_BITS`` (the range coder spends at least that much, less
its termination): a decoder that gets past it is reading a corrupt or crafted payload and
stops, so its work grows with the payload present, not with the maps a header claims."""

GROUP = 64
"""Maps per group (the format's symbol order; a decoder's batch per stream)."""
BATCH_ROWS = 256
"""At most this many maps (from several streams) share one decoding batch."""
CHUNK_BYTES = 64 << 20
"""The encoder's teacher-forced pass takes as many positions as fit this many bytes of
logits and attention scores."""


@dataclass
class StreamStats:
    """``ideal_bits``: ``sum -log2 q`` of the coded symbols under the integer
    frequencies (what a perfect coder would spend); ``codes``: symbols coded."""

    ideal_bits: float = 0.0
    codes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def _groups(n: int) -> list[slice]:
    return [slice(i, min(i + GROUP, n)) for i in range(0, n, GROUP)]


def _positions_per_chunk(model: ExactPrior, rows: int) -> int:
    per_position = rows * 8 * (3 * model.vocab_size + model.n_head * model.seq_len)
    return max(1, min(model.seq_len, CHUNK_BYTES // max(per_position, 1)))


def _bits(chosen: np.ndarray) -> float:
    """``sum -log2((w_s + 1) / 2**24)`` of the coded symbols, from their weights ``w_s``
    (float64: the encoder's statistic and the decoder's budget)."""
    return float((24.0 - np.log2(np.asarray(chosen, dtype=np.float64) + 1.0)).sum())


def _batches(counts: Sequence[int]):
    """The batches of (stream, group slice) for streams of ``counts`` maps: round r
    takes group r of every stream that has one, in batches of up to BATCH_ROWS maps.
    A batch never holds two groups of one stream: a stream's groups are coded one after
    the other (the encoder's chunked pass would interleave them)."""
    groups = [_groups(n) for n in counts]
    for r in range(max((len(g) for g in groups), default=0)):
        batch: list[tuple[int, slice]] = []
        rows = 0
        for i, g in enumerate(groups):
            if r >= len(g):
                continue
            size = g[r].stop - g[r].start
            if batch and rows + size > BATCH_ROWS:
                yield batch
                batch, rows = [], 0
            batch.append((i, g[r]))
            rows += size
        if batch:
            yield batch


def _row_ends(
    batch: list[tuple[int, slice]],
    counts: Sequence[int],
    seq_len: int,
    group_ends: Sequence[int] | None = None,
    tails: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """(rows,) the positions coded in each map of a batch: T, the stream's stop in its
    last group (``group_ends``), its tail in its last map (``tails``)."""
    ends = []
    for i, g in batch:
        last_group = g.stop == counts[i]
        end = group_ends[i] if group_ends is not None and last_group else seq_len
        row = [end] * (g.stop - g.start)
        if tails is not None and tails[i] is not None and last_group:
            row[-1] = min(end, int(tails[i]))
        ends.extend(row)
    return torch.tensor(ends, dtype=torch.long)


def _coded(ends: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(hi - lo, k) bool: which of k maps (their ``ends``) code each position of [lo, hi)."""
    return torch.arange(lo, hi)[:, None] < ends[None, :]


def encode_streams(
    model: ExactPrior,
    streams: Sequence[tuple[np.ndarray, torch.Tensor]],
    stats: list[StreamStats] | None = None,
    tails: Sequence[int | None] | None = None,
) -> list[bytes]:
    """Payloads of streams of sequences: each ``(codes (N, T) int64, labels (N,))``.
    Groups of several streams are stacked into one teacher-forced pass. ``tails[i]``
    (None: T): the positions coded of stream i's last map (the others' values there
    are read as inputs only, never coded: any valid code)."""
    encoders = [RangeEncoder() for _ in streams]
    counts = [codes.shape[0] for codes, _ in streams]
    for batch in _batches(counts):
        ends = _row_ends(batch, counts, model.seq_len, tails=tails)
        _encode_batch(model, streams, batch, ends, encoders, stats)
    return [enc.finish() for enc in encoders]


def _encode_batch(model, streams, batch, ends, encoders, stats) -> None:
    seqs = torch.cat([torch.as_tensor(streams[i][0][g]) for i, g in batch]).long()
    labels = torch.cat([torch.as_tensor(streams[i][1])[g] for i, g in batch]).long()
    n, t_len = seqs.shape
    cache = model.new_cache(n)
    for lo, hi in _chunks(model.boundaries, _positions_per_chunk(model, n)):
        logits = model.logits_range(seqs, cache, labels, lo, hi)
        weights = ExactPrior.frequencies(logits).cpu()  # (n, hi - lo, K)
        row = 0
        for i, g in batch:
            k = g.stop - g.start
            w, s = weights[row : row + k], seqs[row : row + k, lo:hi]
            # position-major inside the group: for each position, the group's maps in order
            coded = _coded(ends[row : row + k], lo, hi)
            syms, table = s.T[coded], w.transpose(0, 1)[coded]
            encoders[i].encode(syms.numpy(), table.double().numpy())
            if stats is not None:
                stats[i].ideal_bits += _bits(table.gather(-1, syms[:, None]).numpy())
                stats[i].codes += syms.numel()
            row += k


def _chunks(bounds: list[int], step: int) -> list[tuple[int, int]]:
    """The encoder's passes: ``[lo, hi)`` between boundaries, each the longest that stays
    within ``step`` positions (at least one boundary interval)."""
    out, i = [], 0
    while i < len(bounds) - 1:
        j = i + 1
        while j + 1 < len(bounds) and bounds[j + 1] - bounds[i] <= step:
            j += 1
        out.append((bounds[i], bounds[j]))
        i = j
    return out


def decode_streams(
    model: ExactPrior,
    streams: Sequence[tuple[bytes, torch.Tensor]],
    stops: Sequence[int | None] | None = None,
    tails: Sequence[int | None] | None = None,
) -> list[np.ndarray]:
    """The codes (N, T) int64 of each ``(payload, labels (N,))``; :class:`CoderError`
    when a payload cannot be decoded (truncated or corrupt). Streams are decoded side by
    side: round r takes group r of every stream that has one, in batches of up to
    BATCH_ROWS maps. ``stops[i]`` (a boundary of the model, or None: T): stream i's last
    group is decoded up to that position only (a prefix of its scales; the range decoder
    stops there), its other groups in full (their symbols come first in the payload);
    ``tails[i]``: the positions coded of stream i's last map (:func:`encode_streams`);
    the positions not decoded are left 0."""
    decoders = [RangeDecoder(payload) for payload, _ in streams]
    budget = [8.0 * len(payload) + SLACK_BITS for payload, _ in streams]
    counts = [len(labels) for _, labels in streams]
    outs = [np.zeros((n, model.seq_len), dtype=np.int64) for n in counts]
    last = [stops[i] if stops is not None and stops[i] is not None else model.seq_len
            for i in range(len(streams))]  # fmt: skip
    for batch in _batches(counts):
        ends = _row_ends(batch, counts, model.seq_len, last, tails)
        _decode_batch(model, streams, batch, ends, decoders, outs, budget)
    return outs


def _decode_batch(model, streams, batch, ends, decoders, outs, budget) -> None:
    labels = torch.cat([torch.as_tensor(streams[i][1])[g] for i, g in batch]).long()
    n = labels.shape[0]
    cache = model.new_cache(n)
    codes = torch.zeros(n, model.seq_len, dtype=torch.long)
    bounds = model.boundaries
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if lo >= int(ends.max()):
            break
        # one pass per step (a position, or a scale): its symbols, position-major
        weights = ExactPrior.frequencies(model.logits_range(codes, cache, labels, lo, hi)).cpu()
        row = 0
        for i, g in batch:
            k = g.stop - g.start
            coded = _coded(ends[row : row + k], lo, hi)
            if bool(coded.any()):
                table = weights[row : row + k].transpose(0, 1)[coded].double().numpy()
                sym = torch.from_numpy(decoders[i].decode(table))
                block = codes[row : row + k, lo:hi].T.clone()
                block[coded] = sym
                codes[row : row + k, lo:hi] = block.T
                budget[i] -= _bits(table[np.arange(len(sym)), sym.numpy()])
                if budget[i] < 0:
                    raise CoderError(
                        "cannot decode the payload: it ends before its codes do (corrupt, or "
                        "a header that claims more maps than the payload holds)"
                    )
            row += k
    row = 0
    for i, g in batch:
        k = g.stop - g.start
        outs[i][g] = codes[row : row + k].numpy()
        row += k
