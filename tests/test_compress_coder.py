"""vqkit.compress.coder: the range coder round trip, integer probabilities that keep
every symbol codable (also those given probability 0), the cost against a float64
``-log2 p`` reference, the shortened payload, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("constriction")

from vqkit.compress.coder import RangeDecoder, RangeEncoder, ideal_bits  # noqa: E402


def _dists(rng: np.random.Generator, n: int, k: int, spread: float) -> np.ndarray:
    logits = rng.normal(size=(n, k)) * spread
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _draw(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(1) < u).sum(1), p.shape[1] - 1)


def _code(symbols: np.ndarray, probs: np.ndarray, chunks: int = 1) -> bytes:
    enc = RangeEncoder()
    for s, p in zip(np.array_split(symbols, chunks), np.array_split(probs, chunks), strict=True):
        enc.encode(s, p)
    return enc.finish()


def _decode(payload: bytes, probs: np.ndarray, chunks: int = 1) -> np.ndarray:
    dec = RangeDecoder(payload)
    return np.concatenate([dec.decode(p) for p in np.array_split(probs, chunks)])


@pytest.mark.parametrize("k", [2, 7, 512])
def test_round_trip_in_steps_of_any_size(k):
    rng = np.random.default_rng(k)
    for n, chunks in ((1, 1), (49, 49), (300, 7)):
        p = _dists(rng, n, k, spread=3.0)
        s = _draw(rng, p)
        # encoded in one call, decoded step by step (the autoregressive pattern)
        np.testing.assert_array_equal(_decode(_code(s, p), p, chunks), s)
        np.testing.assert_array_equal(_decode(_code(s, p, chunks), p), s)


def test_zero_and_tiny_probabilities_stay_codable():
    """Symbols the float table calls impossible (0, or far below 2**-24) still code,
    each costing at most about 24 bits (the smallest integer probability, 2**-24)."""
    k, n = 512, 40
    p = np.full((n, k), 1e-30)
    p[:, 0] = 1.0
    p[:, 5] = 0.0
    s = np.where(np.arange(n) % 2 == 0, 5, 511)
    payload = _code(s, p)
    np.testing.assert_array_equal(_decode(payload, p), s)
    assert 8 * len(payload) <= n * 24.5 + 64


def test_cost_is_the_float64_information_content_plus_a_constant():
    """Payload bits against an independent float64 reference ``sum -log2 p(s)``: a
    short stream pays the coder's termination (< 64 bits), a long one under 0.5 %."""
    rng = np.random.default_rng(0)
    for n, k in ((49, 512), (20000, 512), (5000, 16)):
        p = _dists(rng, n, k, spread=2.5)
        s = _draw(rng, p)
        ref = float(-np.log2(p[np.arange(n), s].astype(np.float64)).sum())
        assert ideal_bits(s, p * 3.0) == pytest.approx(ref, rel=1e-12)  # normalised per row
        bits = 8 * len(_code(s, p))
        assert ref - 8 <= bits <= ref * 1.005 + 64, (n, k, bits, ref)
    # a peaked distribution: fractions of a bit per symbol (no 1-bit floor per symbol)
    p = _dists(rng, 4000, 64, spread=0.1)
    p[:, 3] += 200.0
    s = np.full(4000, 3)
    ref = float(-np.log2(p[:, 3] / p.sum(1)).sum())
    assert 8 * len(_code(s, p)) <= ref * 1.01 + 64 < 4000 / 4


def test_payload_is_shortened_only_while_it_still_decodes():
    rng = np.random.default_rng(3)
    shortened = 0
    for _ in range(60):
        n = int(rng.integers(1, 60))
        p = _dists(rng, n, 32, spread=2.0)
        s = _draw(rng, p)
        enc = RangeEncoder()
        enc.encode(s, p)
        full = len(enc._enc.get_compressed()) * 4  # the coder's own words
        payload = enc.finish()
        shortened += full - len(payload)
        assert len(payload) <= full
        np.testing.assert_array_equal(_decode(payload, p), s)
    assert shortened > 60  # about a byte or more per stream on average


def test_bad_input():
    enc = RangeEncoder()
    with pytest.raises(ValueError, match=r"symbols must be in \[0, 4\)"):
        enc.encode(np.array([4]), np.ones((1, 4)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        enc.encode(np.array([0]), np.array([[0.5, np.nan]]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        enc.encode(np.array([0]), np.array([[0.5, -0.1]]))
    with pytest.raises(ValueError, match=r"expected probabilities \(2, K\)"):
        enc.encode(np.array([0, 1]), np.ones((3, 4)))
