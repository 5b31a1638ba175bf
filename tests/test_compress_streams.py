"""vqkit.compress.streams: version-2 payloads round trip (1, 64, 65, 130 maps: one group,
a full group, a group and one map, three groups), their bytes follow the documented
symbol order (re-implemented here with the range coder and the twin's frequencies), do
not depend on how the work is batched or chunked, and a payload that ends before its
codes stops the decoder after a few positions instead of decoding every claimed map.
Model 2 (the next-scale twin): the same order under one teacher-forced pass, whole
scales per pass, and ``stops`` (a prefix of the scales of each stream's last group).
``tails``: a stream's last map coded only up to a position (a speech codec's last window)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("constriction")

from vqkit.compress import streams  # noqa: E402
from vqkit.compress.coder import CoderError, RangeEncoder  # noqa: E402
from vqkit.compress.exact import ExactPrior  # noqa: E402
from vqkit.compress.streams import StreamStats, decode_streams, encode_streams  # noqa: E402

from .test_compress_exact import small_prior  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

CLASSES = 5


@pytest.fixture(scope="module")
def prior(one_thread_module):
    """4 x 5 maps (T = 20) of 32 codes, 5 classes: about 3 bits per code."""
    return small_prior(classes=CLASSES, shape=(4, 5), attn=2.0, seed=3)


@pytest.fixture(scope="module")
def model(prior):
    return ExactPrior(prior)


def _stream(prior, n: int, seed: int, kind: str = "sampled") -> tuple[np.ndarray, torch.Tensor]:
    """(codes (n, T) int64, labels (n,)): maps sampled from the prior, its most likely
    maps (top_k=1: a few bits per map) or uniform codes (the most bits per map)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES + 1, (n,), generator=g)
    if kind == "uniform":
        codes = torch.randint(0, prior.config.vocab_size, (n, prior.seq_len), generator=g)
    else:
        top_k = 1 if kind == "likely" else None
        codes = prior.sample(n, generator=g, top_k=top_k).reshape(n, -1)
    return codes.numpy().astype(np.int64), labels


def _reference_payload(model: ExactPrior, codes: np.ndarray, labels: torch.Tensor) -> bytes:
    """The documented symbol order, written out: groups of 64 consecutive maps, one after
    the other; inside a group, for t = 0 .. T-1, the group's maps in order; each code
    under the twin's integer frequencies given its own map's prefix and label."""
    enc = RangeEncoder()
    seq = torch.from_numpy(codes)
    for start in range(0, codes.shape[0], 64):
        g = slice(start, start + 64)
        k = seq[g].shape[0]
        logits = model.extend(seq[g, :-1], model.new_cache(k), labels[g])
        w = ExactPrior.frequencies(logits)  # (k, T, K)
        for t in range(codes.shape[1]):
            enc.encode(codes[g, t], w[:, t].double().numpy())
    return enc.finish()


@pytest.mark.parametrize("n", [1, 64, 65, 130])
def test_round_trip_and_the_symbol_order(prior, model, n):
    codes, labels = _stream(prior, n, seed=n)
    stats = [StreamStats()]
    (payload,) = encode_streams(model, [(codes, labels)], stats)
    (back,) = decode_streams(model, [(payload, labels)])
    assert back.dtype == np.int64 and back.shape == codes.shape
    np.testing.assert_array_equal(back, codes)
    assert payload == _reference_payload(model, codes, labels)
    # the statistics: sum -log2((w_s + 1) / 2**24), the codes coded
    seq = torch.from_numpy(codes)
    w = ExactPrior.frequencies(model.extend(seq[:, :-1], model.new_cache(n), labels))
    ideal = float((24 - torch.log2(w.gather(-1, seq[..., None]).double() + 1)).sum())
    assert stats[0].codes == codes.size
    assert stats[0].ideal_bits == pytest.approx(ideal, rel=1e-12)
    # the payload is those bits plus the coder's termination (the w_k + 1 of 2**24 model)
    assert ideal - 40 <= 8 * len(payload) <= ideal + 64  # 0xFF padding: measured -18 at worst


def test_another_order_gives_other_bytes(prior, model):
    """The reference above can tell orders apart: map-major inside a group, or one group
    of all 65 maps, code other bytes."""
    codes, labels = _stream(prior, 65, seed=65)
    (payload,) = encode_streams(model, [(codes, labels)])
    seq = torch.from_numpy(codes)
    w = ExactPrior.frequencies(model.extend(seq[:, :-1], model.new_cache(65), labels))
    map_major, one_group = RangeEncoder(), RangeEncoder()
    for i in range(65):
        map_major.encode(codes[i], w[i].double().numpy())
    for t in range(codes.shape[1]):
        one_group.encode(codes[:, t], w[:, t].double().numpy())
    assert map_major.finish() != payload and one_group.finish() != payload


def test_streams_together_equal_each_alone(prior, model):
    items = [_stream(prior, n, seed=100 + n) for n in (3, 66, 1, 129)]
    alone = [encode_streams(model, [item])[0] for item in items]
    together = encode_streams(model, items)
    assert together == alone
    pairs = [(p, labels) for p, (_, labels) in zip(alone, items, strict=True)]
    decoded = decode_streams(model, pairs)
    for (codes, labels), out, payload in zip(items, decoded, alone, strict=True):
        np.testing.assert_array_equal(out, codes)
        np.testing.assert_array_equal(decode_streams(model, [(payload, labels)])[0], codes)


def test_chunks_and_batches_do_not_change_the_bytes(prior, model, monkeypatch):
    items = [_stream(prior, n, seed=200 + n) for n in (130, 5)]
    want = encode_streams(model, items)
    # one position per pass, a few, most: a stream's groups must not interleave their chunks
    for chunk in (1, 300_000, 2_000_000):
        monkeypatch.setattr(streams, "CHUNK_BYTES", chunk)
        assert encode_streams(model, items) == want, chunk
    monkeypatch.setattr(streams, "BATCH_ROWS", 64)  # every group its own pass
    assert encode_streams(model, items) == want
    decoded = decode_streams(
        model, [(p, labels) for p, (_, labels) in zip(want, items, strict=True)]
    )
    for (codes, _), out in zip(items, decoded, strict=True):
        np.testing.assert_array_equal(out, codes)


class _Counting:
    """Counts the twin's extend calls (the decoder's work)."""

    def __init__(self, model: ExactPrior) -> None:
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return ExactPrior.extend(self.model, *args, **kwargs)


def test_a_payload_that_ends_early_stops_after_a_few_positions(prior, model, monkeypatch):
    """A header may claim 100,000 maps (1,563 groups: 31,260 positions to decode) over a
    payload of a few dozen bytes; the bit budget stops the decoder within the first
    group's first positions, with a CoderError."""
    counter = _Counting(model)
    monkeypatch.setattr(model, "extend", counter)
    many = torch.full((100_000,), CLASSES, dtype=torch.long)
    rng = np.random.default_rng(0)
    for payload in (bytes(rng.integers(0, 256, 40, dtype=np.uint8)), b"\x00" * 16, b""):
        counter.calls = 0
        start = time.perf_counter()
        with pytest.raises(CoderError, match="cannot decode the payload"):
            decode_streams(model, [(payload, many)])
        assert counter.calls <= 4, counter.calls  # the first extend, then a few positions
        assert time.perf_counter() - start < 5.0
    # a valid payload cut in half, under its own labels: stops in its second group (one
    # stream is decoded a group a pass: T extend calls a group)
    codes, labels = _stream(prior, 130, seed=7)
    (payload,) = encode_streams(model, [(codes, labels)])
    counter.calls = 0
    np.testing.assert_array_equal(decode_streams(model, [(payload, labels)])[0], codes)
    full = counter.calls
    assert full == 3 * codes.shape[1]
    counter.calls = 0
    with pytest.raises(CoderError):
        decode_streams(model, [(payload[: len(payload) // 2], labels)])
    assert counter.calls < 2 * codes.shape[1], counter.calls
    # the same payload whole, under a header that claims 100 times the maps: its first two
    # groups decode as written, the third (2 maps written, 64 claimed) runs out
    counter.calls = 0
    with pytest.raises(CoderError):
        decode_streams(model, [(payload, torch.cat([labels] * 100))])
    assert counter.calls <= 3 * codes.shape[1], counter.calls


def test_the_bit_budget_never_refuses_a_valid_stream(prior, model):
    """Streams of 1 to 70 maps of likely, sampled and uniform codes (a few bits to 5+ bits
    a code), the shortest payloads included, all decode."""
    rng = np.random.default_rng(1)
    items = []
    for i in range(45):
        kind = ("likely", "sampled", "uniform")[i % 3]
        n = int(rng.choice([1, 1, 2, 3, 5, 8, 64, 65, 70])) if i % 9 else 1
        items.append(_stream(prior, n, seed=300 + i, kind=kind))
    payloads = encode_streams(model, items)
    sizes = sorted(len(p) for p in payloads)
    assert sizes[0] <= 8  # some payloads are a handful of bytes
    decoded = decode_streams(model, [(p, y) for p, (_, y) in zip(payloads, items, strict=True)])
    for (codes, _), out in zip(items, decoded, strict=True):
        np.testing.assert_array_equal(out, codes)


# ---- model 2: the next-scale twin, whole scales per pass; a prefix of the scales ------


@pytest.fixture(scope="module")
def ns_model(one_thread_module):
    """(next-scale prior over scales 1, 2, 3, 5 (L = 39) of 32 codes, 3 classes, its twin)."""
    from vqkit.compress.exact_nextscale import ExactNextScale

    from .test_compress_exact_nextscale import small_nextscale

    prior = small_nextscale(seed=5)
    return prior, ExactNextScale(prior)


def _ns_stream(prior, n: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, prior.null_class + 1, (n,), generator=g)
    return prior.sample(n, generator=g).reshape(n, -1).numpy().astype(np.int64), labels


@pytest.mark.parametrize("n", [1, 65])
def test_next_scale_round_trip_and_the_symbol_order(ns_model, monkeypatch, n):
    """The documented order (groups of 64; inside a group, position by position in the
    sequence order, the group's maps at each), each code under the teacher-forced
    logits of one pass over all L positions; the same bytes whatever the chunking."""
    prior, model = ns_model
    codes, labels = _ns_stream(prior, n, seed=n)
    (payload,) = encode_streams(model, [(codes, labels)])
    np.testing.assert_array_equal(decode_streams(model, [(payload, labels)])[0], codes)
    enc = RangeEncoder()
    seq = torch.from_numpy(codes)
    for start in range(0, n, 64):
        g = slice(start, start + 64)
        w = ExactPrior.frequencies(model.logits(seq[g], labels[g]))
        for t in range(codes.shape[1]):
            enc.encode(codes[g, t], w[:, t].double().numpy())
    assert payload == enc.finish()
    monkeypatch.setattr(streams, "CHUNK_BYTES", 1)  # one scale per pass
    assert encode_streams(model, [(codes, labels)]) == [payload]


@pytest.mark.parametrize("which", ["next-scale", "autoregressive"])
def test_stops_decode_the_first_scales_of_the_last_group(ns_model, which):
    """stops[i] = start_n: the last group of stream i up to there (the rest left 0), its
    earlier groups in full; the decoder's passes end there (model 2: n passes)."""
    prior, model = ns_model
    if which == "autoregressive":
        from .test_compress_exact_nextscale import small_nextscale

        prior = small_nextscale(kind="autoregressive", seed=5)
        model = ExactPrior(prior)
    items = [_ns_stream(prior, n, seed=400 + n) for n in (3, 70)]
    payloads = encode_streams(model, items)
    stop = 5  # scales 1 and 2
    pairs = [(p, y) for p, (_, y) in zip(payloads, items, strict=True)]
    calls = []
    real = model.logits_range
    model.logits_range = lambda *a: calls.append(a[3]) or real(*a)
    try:
        out = decode_streams(model, pairs, [stop, stop])
    finally:
        del model.logits_range
    (c3, _), (c70, _) = items
    np.testing.assert_array_equal(out[0][:, :stop], c3[:, :stop])
    assert not out[0][:, stop:].any()
    np.testing.assert_array_equal(out[1][:64], c70[:64])  # the first group: in full
    np.testing.assert_array_equal(out[1][64:, :stop], c70[64:, :stop])
    assert not out[1][64:, stop:].any()
    # round 0: groups 0 of both streams in one batch, the 70-map stream's first group in
    # full; round 1: its last group up to the stop
    full = model.boundaries[:-1]
    assert calls == full + [b for b in full if b < stop]
    # None: in full
    out = decode_streams(model, pairs, [None, stop])
    np.testing.assert_array_equal(out[0], c3)


def _reference_tails(
    model: ExactPrior, codes: np.ndarray, labels: torch.Tensor, tail: int
) -> bytes:
    """The documented order with a short last map: at position t, every map of the group
    in order, the stream's last map only while t < tail."""
    enc = RangeEncoder()
    seq = torch.from_numpy(codes)
    n = codes.shape[0]
    for start in range(0, n, 64):
        g = slice(start, min(start + 64, n))
        k = seq[g].shape[0]
        w = ExactPrior.frequencies(model.extend(seq[g, :-1], model.new_cache(k), labels[g]))
        for t in range(codes.shape[1]):
            rows = [r for r in range(k) if start + r < n - 1 or t < tail]
            enc.encode(codes[g][rows, t], w[rows, t].double().numpy())
    return enc.finish()


@pytest.mark.parametrize("n", [1, 65])
def test_tails_code_a_short_last_map(prior, model, n):
    codes, labels = _stream(prior, n, seed=7)
    tail = 7
    junk = codes.copy()
    junk[-1, tail:] = 0  # the uncoded positions: read as inputs only, never coded
    stats = [StreamStats()]
    (payload,) = encode_streams(model, [(junk, labels)], stats, tails=[tail])
    assert payload == _reference_tails(model, junk, labels, tail)
    assert stats[0].codes == (n - 1) * codes.shape[1] + tail
    (back,) = decode_streams(model, [(payload, labels)], tails=[tail])
    assert np.array_equal(back[:-1], codes[:-1]) and np.array_equal(
        back[-1, :tail], codes[-1, :tail]
    )
    assert not back[-1, tail:].any()  # not decoded: left 0
