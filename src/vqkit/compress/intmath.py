"""Integer arithmetic with the same bits on every machine: the primitives of the exact
coding prior (:mod:`.exact`).

A real number ``x`` is held as an integer ``X`` with ``f`` fractional bits,
``x ~ X / 2**f`` (fixed point, power-of-two scales only). Every operation here is exact
integer arithmetic on int64 tensors (additions, products, shifts, floor divisions,
comparisons), whose result does not depend on the CPU's vector units, the thread count,
the order of a reduction or the device:

* **Matrix products** (:func:`matmul`) run through a float64 GEMM on integer-valued
  operands whose bounds the caller guarantees: ``|a| < 2**A``, ``|b| < 2**B`` and an
  inner size ``n`` with ``A + B + log2(n) <= 53``. Every partial sum, in any order and
  with or without FMA, is then an integer below ``2**53``, which float64 holds exactly:
  the GEMM returns the exact integer product whatever kernel computes it. (int64
  matrix products exist on the CPU but not on CUDA, and run far slower.)
* **Nonlinearities** are tables built from Python's ``decimal`` module (libmpdec: integer
  software arithmetic, the same digits everywhere) and looked up with integer indices:
  :func:`exp2_neg` (``2**-u``, the softmax), :func:`gelu` (``x * Phi(x)``, linear
  interpolation in a table of the normal CDF), :func:`rope_tables` (cos / sin).
  ``math``'s and torch's float ``exp`` / ``erf`` / ``cos`` are never used: their last
  bit differs between libm versions and vector kernels.
* **Square roots** (the twin's LayerNorm): the float64 square root of an integer below
  ``2**53``, which float64 holds exactly; IEEE-754 rounds the root correctly on every
  conforming machine, so its truncation is the same integer everywhere.
* **Scales** are chosen from bounds by :func:`frac_bits`, a function of an integer or
  float's binary exponent only.

float64 tensors appear only as GEMM operands and as the constriction input of
:func:`frequencies`; both hold integers below ``2**53``.
"""

from __future__ import annotations

import decimal
import functools
import math

import torch

__all__ = [
    "EXP_BITS",
    "EXP_SCALE",
    "PHI_BITS",
    "PHI_SCALE",
    "bit_length",
    "decimal_context",
    "exp2_neg",
    "frac_bits",
    "frequencies",
    "gelu",
    "matmul",
    "rope_tables",
    "round_decimal",
    "shift",
    "softmax_weights",
]

EXP_BITS = 12
"""Fractional bits of a softmax argument in log2 units: logits resolved to 2**-12 bits."""
EXP_SCALE = 30
"""``exp2_neg`` returns ``2**-u`` with 30 fractional bits (``2**30`` is 1)."""
PHI_BITS = 12
"""The normal-CDF table's step: 2**-12 (65,537 entries)."""
PHI_RANGE = 8
"""Phi(x) is tabulated on [-8, 8]: 0 and 1 beyond (within 2**-30 of the truth)."""
PHI_SCALE = 30
"""Fractional bits of the normal-CDF table's entries."""
_PREC = 60  # decimal digits of the table computations


def bit_length(bound: int | float) -> int:
    """The least integer e with ``|bound| < 2**e`` (negative for a bound below 1/2; an
    exact function of the binary exponent: ``math.frexp`` is exact)."""
    if bound == 0:
        return 0
    mantissa, e = math.frexp(abs(bound))
    return int(e)


def frac_bits(bound: int | float, bits: int) -> int:
    """Fractional bits f that fit every value of magnitude <= ``bound`` into ``bits``
    bits: ``bound * 2**f < 2**bits`` (f may be negative)."""
    return bits - bit_length(bound)


def shift(x: torch.Tensor, s: int | torch.Tensor) -> torch.Tensor:
    """``x * 2**-s`` rounded half up (``floor(x / 2**s + 1/2)``) for s > 0, ``x * 2**-s``
    exactly for s <= 0. ``s``: an int, or an int64 tensor broadcasting against ``x``
    whose values are all >= 0 (a right shift per row)."""
    if isinstance(s, int):
        if s <= 0:
            return x << -s if s else x
        return (x + (1 << (s - 1))) >> s
    half = (torch.ones_like(s) << s) >> 1
    return (x + half) >> s


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact integer product ``a @ b`` of int64 tensors whose bounds the caller
    guarantees (module docstring: their bits plus log2 of the inner size at most 53),
    computed by a float64 GEMM and returned as int64."""
    return torch.matmul(a.double(), b.double()).long()


# ---- tables (Python decimal: the same digits on every machine) --------------------


def decimal_context() -> decimal.Context:
    return decimal.Context(prec=_PREC, rounding=decimal.ROUND_HALF_EVEN)


def round_decimal(x: decimal.Decimal) -> int:
    """The nearest integer (half to even)."""
    return int(x.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


def _pi(ctx: decimal.Context) -> decimal.Decimal:
    """pi to the context's precision (the recipe of Python's decimal documentation)."""
    with decimal.localcontext(ctx) as c:
        c.prec += 2
        three = decimal.Decimal(3)
        lasts, t, s, n, na, d, da = 0, three, three, 1, 0, 0, 24
        while s != lasts:
            lasts = s
            n, na = n + na, na + 8
            d, da = d + da, da + 32
            t = (t * n) / d
            s += t
    return +s


@functools.cache
def _exp2_table() -> torch.Tensor:
    """``T[j] = round(2**(EXP_SCALE - j / 2**EXP_BITS))``, j in [0, 2**EXP_BITS)."""
    ctx = decimal_context()
    ln2 = ctx.ln(decimal.Decimal(2))
    step = 1 << EXP_BITS
    vals = [
        round_decimal(
            ctx.multiply(ctx.exp(ctx.multiply(ln2, decimal.Decimal(-j) / step)), 1 << EXP_SCALE)
        )
        for j in range(step)
    ]
    return torch.tensor(vals, dtype=torch.int64)


def exp2_neg(u: torch.Tensor) -> torch.Tensor:
    """``2**(-u / 2**EXP_BITS)`` with EXP_SCALE fractional bits, for int64 ``u >= 0``:
    ``T[u mod 2**EXP_BITS] >> (u div 2**EXP_BITS)`` (floor), 0 from 2**-31 down.
    Relative error at most 2**-30 of the table plus the shift's floor."""
    table = _exp2_table().to(u.device)
    whole = torch.clamp(u >> EXP_BITS, max=62)
    return table[u & ((1 << EXP_BITS) - 1)] >> whole


_PHI_COARSE = 8  # the decimal table's step, 2**-8; refined 16-fold by Hermite below


@functools.cache
def _phi_table() -> torch.Tensor:
    """``Phi(i / 2**PHI_BITS)`` with PHI_SCALE fractional bits, i in [-R * 2**PHI_BITS,
    R * 2**PHI_BITS] (R = PHI_RANGE), then two entries 2**PHI_SCALE (the clamped top).

    Phi and its derivative phi are computed in decimal on the coarse 2**-8 grid (erf
    from its series ``2/sqrt(pi) e^(-z^2) sum_n 2^n z^(2n+1) / (2n+1)!!``: all terms
    positive, no cancellation), then refined to the 2**-12 grid by cubic Hermite
    interpolation in exact rational (Python integer) arithmetic: error below 1e-12,
    far under the table's 2**-30 rounding."""
    ctx = decimal_context()
    sqrt_2pi = ctx.sqrt(ctx.multiply(2, _pi(ctx)))
    sqrt2 = ctx.sqrt(decimal.Decimal(2))
    tiny = decimal.Decimal(10) ** -(_PREC - 5)
    n_coarse = PHI_RANGE << _PHI_COARSE
    h = decimal.Decimal(1) / (1 << _PHI_COARSE)
    cdf, pdf = [], []
    for i in range(n_coarse + 1):
        x = ctx.multiply(decimal.Decimal(i), h)
        z = ctx.divide(x, sqrt2)
        z2 = ctx.multiply(z, z)
        term, total, n = z, z, 0
        while term > tiny:
            n += 1
            term = ctx.divide(ctx.multiply(term, 2 * z2), 2 * n + 1)
            total = ctx.add(total, term)
        density = ctx.divide(ctx.exp(-z2), sqrt_2pi)
        # Phi(x) = 1/2 + e^(-z^2) / sqrt(pi) * total = 1/2 + sqrt(2) * phi(x) * total
        tail = ctx.multiply(ctx.multiply(sqrt2, density), total)
        cdf.append(ctx.add(decimal.Decimal(1) / 2, tail))
        pdf.append(density)
    # Hermite on [x0, x0 + h] at t = j / 16 with integer numerators over 16**3
    sub = 1 << (PHI_BITS - _PHI_COARSE)
    big = 1 << (PHI_SCALE + 40)  # the coarse values in fixed point, far finer than the table
    y = [round_decimal(ctx.multiply(v, big)) for v in cdf]
    m = [round_decimal(ctx.multiply(ctx.multiply(v, h), big)) for v in pdf]  # h * phi
    den = sub**3
    half = []
    for i in range(n_coarse):
        for j in range(sub):
            a, b = j, sub - j  # t = a / sub, 1 - t = b / sub
            num = (
                (b * b * (sub + 2 * a)) * y[i] + (a * b * b) * m[i]
                + (a * a * (sub + 2 * b)) * y[i + 1] - (a * a * b) * m[i + 1]
            )  # fmt: skip
            half.append(_div_round(num, den << 40))
    half.append(_div_round(y[-1], 1 << 40))
    one = 1 << PHI_SCALE
    vals = [one - v for v in reversed(half[1:])] + half + [one, one]
    return torch.tensor(vals, dtype=torch.int64)


def _div_round(a: int, b: int) -> int:
    """round(a / b) of Python integers, half up, b > 0."""
    return (2 * a + b) // (2 * b)


def gelu(x: torch.Tensor, f: int) -> torch.Tensor:
    """``x * Phi(x)`` (GELU, erf form) of int64 ``x`` with ``f >= PHI_BITS`` fractional
    bits, in the same format: Phi at ``x`` rounded to the table's 2**-12 grid (error
    below 2**-13 * max Phi' = 5e-5), 0 / 1 outside [-8, 8]."""
    if f < PHI_BITS:
        raise ValueError(f"gelu needs at least {PHI_BITS} fractional bits; got {f}")
    table = _phi_table().to(x.device)
    top = PHI_RANGE << PHI_BITS
    step = f - PHI_BITS
    half = (1 << step) >> 1
    idx = torch.clamp(((x + half) >> step) + top, 0, 2 * top + 2)
    return (x * table[idx] + (1 << (PHI_SCALE - 1))) >> PHI_SCALE


@functools.cache
def rope_tables(n_pos: int, head_dim: int, base: int = 10000, bits: int = 14):
    """(cos, sin) int64 (n_pos, head_dim / 2) with ``bits`` fractional bits of the
    angles ``pos * base**(-2i / head_dim)`` (the float prior's
    :func:`vqkit.prior.transformer.rope_tables`), computed in decimal."""
    ctx = decimal_context()
    two_pi = ctx.multiply(2, _pi(ctx))
    ln_base = ctx.ln(decimal.Decimal(base))
    scale = decimal.Decimal(1 << bits)
    inv = [
        ctx.exp(ctx.multiply(ln_base, decimal.Decimal(-i) / head_dim))
        for i in range(0, head_dim, 2)
    ]
    cos, sin = [], []
    for pos in range(n_pos):
        row_c, row_s = [], []
        for f in inv:
            c, s = _cos_sin(ctx.remainder(ctx.multiply(pos, f), two_pi), ctx)
            row_c.append(round_decimal(ctx.multiply(c, scale)))
            row_s.append(round_decimal(ctx.multiply(s, scale)))
        cos.append(row_c)
        sin.append(row_s)
    return torch.tensor(cos, dtype=torch.int64), torch.tensor(sin, dtype=torch.int64)


def _cos_sin(a: decimal.Decimal, ctx: decimal.Context) -> tuple[decimal.Decimal, ...]:
    """cos and sin of ``a`` in [0, 2 pi) by their Taylor series (all digits decimal)."""
    tiny = decimal.Decimal(10) ** -(_PREC - 5)
    c = s = decimal.Decimal(0)
    term, k = decimal.Decimal(1), 0
    while True:  # term = a^k / k!
        if k % 4 == 0:
            c = ctx.add(c, term)
        elif k % 4 == 1:
            s = ctx.add(s, term)
        elif k % 4 == 2:
            c = ctx.subtract(c, term)
        else:
            s = ctx.subtract(s, term)
        k += 1
        term = ctx.divide(ctx.multiply(term, a), k)
        if abs(term) < tiny and k > 2:
            break
    return c, s


# ---- softmax over fixed-point logits -----------------------------------------------


def softmax_weights(y: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``2**(y - max y)`` per row of int64 ``y`` (log2 units with EXP_BITS fractional
    bits) with EXP_SCALE fractional bits: unnormalised softmax weights in
    ``[0, 2**30]``, the row's maximum exactly ``2**30``. ``valid`` (bool, broadcasting):
    entries outside it weigh 0 and are left out of the maximum."""
    if valid is not None:
        low = torch.iinfo(torch.int64).min >> 2
        y = torch.where(valid, y, low)
    top = y.amax(dim=-1, keepdim=True)
    w = exp2_neg(top - y)
    return w if valid is None else torch.where(valid, w, 0)


def frequencies(y: torch.Tensor, precision: int = 24) -> torch.Tensor:
    """The coder's integer distribution of int64 logits ``y`` (..., K) in log2 units:
    weights ``w_k >= 0`` with ``sum_k w_k = 2**precision - K`` exactly, proportional
    (floor) to ``2**(y_k - max y)``, the rounding remainder on the row's first maximum.
    The range coder gives symbol k the frequency ``w_k + 1`` out of ``2**precision``
    (constriction's leaky categorical: see :mod:`.coder`)."""
    k = y.shape[-1]
    free = (1 << precision) - k
    e = softmax_weights(y)  # <= 2**30; times free < 2**24: below 2**54
    w = torch.div(e * free, e.sum(dim=-1, keepdim=True), rounding_mode="floor")
    rest = free - w.sum(dim=-1, keepdim=True)
    first = torch.argmax(y, dim=-1, keepdim=True)  # the first maximum (torch's rule)
    return w.scatter_add_(-1, first, rest)
