"""Entropy coding of symbols under given categorical distributions: a range coder from
`constriction <https://bamler-lab.github.io/constriction/>`_.

A symbol ``s`` coded under probabilities ``p`` (one row of K floats) costs about
``-log2 q(s)`` bits, where ``q`` is ``p`` quantized to integers: constriction's
``Categorical(perfect=False)`` rescales ``p`` to fixed-point probabilities of 24 bits
(``q(k) = n_k / 2**24``, ``sum_k n_k = 2**24``) and gives every symbol ``n_k >= 1``,
also those whose float probability is 0 or underflows, so that any code the tokenizer
can emit stays encodable (at most 24 bits for a code the prior calls impossible). The
quantization is integer and IEEE float64 arithmetic, so the encoder and the decoder get
the same ``q`` from the same ``p``, bit for bit.

The range coder (constriction's ``queue`` coder) works first in, first out: the encoder
codes the symbols in the order the decoder will ask for them, so an autoregressive
model can hand it one step's distributions at a time on both sides. Its output is a
sequence of 32-bit words ending in the coder's final state (the lower end of its last
interval, written in full); :meth:`RangeEncoder.finish` stores the words big-endian
and drops trailing bytes the decoder does not need: the decoder pads the last word
with 0xFF bytes, which lands inside the final interval when it is wide enough (zeros
would fall below its lower end). The encoder decodes the shortened stream before it
drops a byte, so a kept byte count always decodes. Measured on random streams: about
1.9 bytes saved per stream. The stream's overhead over ``sum -log2 q`` is the coder's
termination: a few dozen bits per stream, whatever its length.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

__all__ = ["CoderError", "RangeDecoder", "RangeEncoder", "ideal_bits"]

VERIFY_BYTES = 64 << 20


class CoderError(UserError):
    """The payload cannot be decoded (truncated or corrupt)."""


def _constriction():
    try:
        import constriction
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError(
            "vqkit compress needs the 'constriction' package: pip install 'vqkit[compress]'"
        ) from e
    return constriction


def _family():
    """The model family: a categorical over ``{0 .. K-1}`` whose table comes per symbol;
    ``perfect=False`` is the fast leaky quantization (every symbol keeps n_k >= 1), the
    one both sides must agree on."""
    return _constriction().stream.model.Categorical(perfect=False)


def _check(probs: np.ndarray, n: int) -> np.ndarray:
    probs = np.ascontiguousarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != n:
        raise ValueError(f"expected probabilities ({n}, K); got {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probabilities must be finite and >= 0")
    return probs


class RangeEncoder:
    """Accumulates symbols with their distributions, in decoding order; :meth:`finish`
    returns the payload bytes."""

    def __init__(self) -> None:
        c = _constriction()
        self._enc = c.stream.queue.RangeEncoder()
        self._family = _family()
        # kept to verify the shortened payload; (n_i,) symbols and (n_i, K) tables, up
        # to VERIFY_BYTES of tables (a long stream gains nothing worth keeping them for)
        self._symbols: list[np.ndarray] | None = []
        self._probs: list[np.ndarray] = []
        self._kept = 0

    def encode(self, symbols: np.ndarray, probs: np.ndarray) -> None:
        """Code ``symbols`` (n,) in ``{0 .. K-1}``, symbol i under ``probs[i]`` (n, K)
        (non-negative, finite; need not sum to 1: constriction normalises)."""
        symbols = np.ascontiguousarray(symbols, dtype=np.int32).reshape(-1)
        probs = _check(probs, symbols.shape[0])
        if symbols.size and (symbols.min() < 0 or symbols.max() >= probs.shape[1]):
            raise ValueError(f"symbols must be in [0, {probs.shape[1]})")
        self._enc.encode(symbols, self._family, probs)
        self._kept += probs.nbytes
        if self._symbols is not None and self._kept <= VERIFY_BYTES:
            self._symbols.append(symbols)
            self._probs.append(probs)
        else:
            self._symbols, self._probs = None, []

    def finish(self) -> bytes:
        """The payload: the coder's words big-endian, shortened by the trailing bytes
        that are not needed to decode every symbol (verified here, at most 8; only for
        streams of up to VERIFY_BYTES of tables)."""
        full = self._enc.get_compressed().astype(">u4").tobytes()
        data = full
        if self._symbols is None:
            return data
        for cut in range(1, min(8, len(full)) + 1):
            shorter = full[: len(full) - cut]
            if not self._decodes(shorter):
                break
            data = shorter
        return data

    def _decodes(self, payload: bytes) -> bool:
        assert self._symbols is not None
        try:
            dec = RangeDecoder(payload)
            return all(
                np.array_equal(dec.decode(p), s)
                for s, p in zip(self._symbols, self._probs, strict=True)
            )
        except CoderError:
            return False


class RangeDecoder:
    """Decodes a payload of :class:`RangeEncoder` given the same distributions in the
    same order."""

    def __init__(self, payload: bytes) -> None:
        c = _constriction()
        padded = bytes(payload) + b"\xff" * (-len(payload) % 4)  # see the module docstring
        words = np.frombuffer(padded, dtype=">u4").astype(np.uint32)
        try:
            self._dec = c.stream.queue.RangeDecoder(words)
        except (ValueError, RuntimeError, AssertionError) as e:  # constriction's ways
            raise CoderError(f"cannot decode the payload: {e}") from e
        self._family = _family()

    def decode(self, probs: np.ndarray) -> np.ndarray:
        """The next ``n`` symbols, int64 (n,), symbol i under ``probs[i]`` (n, K)."""
        probs = _check(probs, probs.shape[0] if probs.ndim == 2 else -1)
        try:
            out = self._dec.decode(self._family, probs)
        except (ValueError, RuntimeError, AssertionError) as e:  # constriction's ways
            raise CoderError(f"cannot decode the payload: {e}") from e
        return np.asarray(out, dtype=np.int64)


def ideal_bits(symbols: np.ndarray, probs: np.ndarray) -> float:
    """``sum_i -log2 p_i(s_i)`` of the float distributions (normalised per row), in
    float64: the information content a perfect coder would reach."""
    probs = np.asarray(probs, dtype=np.float64)
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    p = probs[np.arange(symbols.shape[0]), symbols] / probs.sum(axis=1)
    return float(-np.log2(p).sum())
