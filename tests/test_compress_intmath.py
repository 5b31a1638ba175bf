"""vqkit.compress.intmath: every primitive against an independent reference (Python
integers, float64 ``erf`` / ``cos`` / ``2**x``), at the edges of the
documented bounds, and the tables the same in a fresh process on ATen's default
(scalar) kernels."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vqkit.compress import intmath as im

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

ONE = 1 << im.EXP_SCALE  # 2**30: exp2_neg's and softmax_weights' 1
PHI_ONE = 1 << im.PHI_SCALE


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- shift -------------------------------------------------------------------------


def _round_half_up(x: int, s: int) -> int:
    """floor(x / 2**s + 1/2) of Python integers."""
    return (2 * x + (1 << s)) // (1 << (s + 1))


def test_shift_rounds_half_up_for_both_signs():
    # exact halves: -1.5 -> -1, -0.5 -> 0, 0.5 -> 1, 1.5 -> 2 (half up, not to even)
    halves = torch.tensor([-3, -1, 1, 3])
    assert im.shift(halves, 1).tolist() == [-1, 0, 1, 2]
    assert im.shift(torch.tensor([-6, -2, 2, 6]), 2).tolist() == [-1, 0, 1, 2]
    g = _gen(1)
    x = torch.cat([torch.randint(-(1 << 50), 1 << 50, (3000,), generator=g), torch.arange(-70, 70)])
    for s in (1, 2, 3, 7, 12, 30, 45):
        want = [_round_half_up(v, s) for v in x.tolist()]
        assert im.shift(x, s).tolist() == want, s
    # s <= 0: an exact left shift
    assert im.shift(x, 0).tolist() == x.tolist()
    assert im.shift(x[:10], -3).tolist() == [v * 8 for v in x[:10].tolist()]


def test_shift_by_a_tensor_of_per_row_shifts():
    g = _gen(2)
    x = torch.randint(-(1 << 40), 1 << 40, (6, 50), generator=g)
    x[:, :4] = torch.tensor([-3, -1, 1, 3])  # halves for s = 1
    s = torch.tensor([0, 1, 2, 5, 17, 33])[:, None]
    got = im.shift(x, s)
    want = [
        [_round_half_up(v, int(s[r])) if s[r] else v for v in row]
        for r, row in enumerate(x.tolist())
    ]
    assert got.tolist() == want


# ---- matmul ------------------------------------------------------------------------


def _exact_product(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """int64 numpy product: exact (no BLAS, no rounding) while sums stay below 2**63."""
    return a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)


def test_matmul_is_exact_at_the_bound_edges():
    """|a| < 2**22, |b| < 2**15 and an inner size of 2**16 (22 + 15 + 16 = 53): sums
    reach 2**53 - 2**38, yet every partial sum is an integer float64 holds."""
    a_max, b_max = (1 << 22) - 1, (1 << 15) - 1
    for n in (1 << 14, 1 << 16):
        g = _gen(n)
        a = torch.randint(-a_max, a_max + 1, (3, n), generator=g)
        b = torch.randint(-b_max, b_max + 1, (n, 4), generator=g)
        a[0], b[:, 0] = a_max, b_max  # one sum at the very top: n * a_max * b_max
        a[1], b[:, 1] = -a_max, b_max  # and the bottom
        a[2, ::2], a[2, 1::2] = a_max, -a_max + 1  # alternating: odd partial sums
        want = _exact_product(a, b)
        got = im.matmul(a, b)
        assert got.dtype == torch.int64
        assert np.array_equal(got.numpy(), want)
        assert want[0, 0] == n * a_max * b_max > n << 36
        # float32 operands and sums cannot hold these: the float64 GEMM is what makes it exact
        wrong = torch.matmul(a.float(), b.float()).double()
        assert not torch.equal(wrong, torch.from_numpy(want).double())


def test_matmul_batched_small_operands():
    g = _gen(3)
    a = torch.randint(-(1 << 20), 1 << 20, (2, 3, 5, 64), generator=g)
    b = torch.randint(-(1 << 20), 1 << 20, (2, 3, 64, 7), generator=g)
    want = np.einsum("bhik,bhkj->bhij", a.numpy(), b.numpy())
    assert np.array_equal(im.matmul(a, b).numpy(), want)


# ---- exp2_neg ----------------------------------------------------------------------


def test_exp2_neg_against_float64():
    step = 1 << im.EXP_BITS
    g = _gen(4)
    u = torch.cat([torch.arange(0, 3 * step), torch.randint(0, 40 * step, (20000,), generator=g)])
    got = im.exp2_neg(u)
    ref = torch.tensor([2.0 ** (-v / step) * ONE for v in u.tolist()], dtype=torch.float64)
    err = got.double() - ref
    # table rounded to nearest (0.5 of a unit), then a floor by the whole part: [-1.5, 0.5]
    assert float(err.max()) <= 0.5 + 1e-6 and float(err.min()) >= -1.5 - 1e-6
    # the table itself (u < 2**12): rounded to the nearest unit of 2**-30
    assert float(err[:step].abs().max()) <= 0.5 + 1e-6
    # relative error where the value is above 2**-20 (2**10 units)
    big = ref > (ONE >> 20)
    assert float((err[big].abs() / ref[big]).max()) <= 1.5 / (1 << 10)
    assert int(im.exp2_neg(torch.tensor([0]))) == ONE
    assert int(im.exp2_neg(torch.tensor([step]))) == ONE >> 1  # exactly 1/2
    # monotone non-increasing, zero from 2**-31 on and for huge arguments
    grid = im.exp2_neg(torch.arange(0, 33 * step))
    assert bool((grid[1:] <= grid[:-1]).all())
    far = torch.tensor([31 * step, 31 * step + 5, 62 * step, 1 << 40, (1 << 62) - 1])
    assert im.exp2_neg(far).tolist() == [0] * 5


# ---- the normal CDF table and GELU -------------------------------------------------


def test_phi_table_against_float64_erf():
    table = im._phi_table()
    top = im.PHI_RANGE << im.PHI_BITS
    assert table.shape == (2 * top + 3,) and table.dtype == torch.int64
    i = np.arange(-top, top + 1)
    x = i / float(1 << im.PHI_BITS)
    ref = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x]) * PHI_ONE
    err = np.abs(table[:-2].numpy() - ref)
    # rounded to the nearest unit (0.5) plus the Hermite refinement's error (< 1e-12 of 1)
    assert err.max() <= 0.5 + 0.01, (err.max(), x[err.argmax()])
    # symmetric T[-i] = 2**30 - T[i], Phi(0) = 1/2, monotone, the clamped top entries 1
    half = table[: 2 * top + 1]
    assert torch.equal(half.flip(0), PHI_ONE - half)
    assert int(half[top]) == PHI_ONE >> 1
    assert bool((table[1:] >= table[:-1]).all())
    assert table[-3:].tolist() == [PHI_ONE] * 3 and int(table[0]) == 0


def _gelu_ref(x: np.ndarray) -> np.ndarray:
    return x * np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])


@pytest.mark.parametrize("f", [12, 16, 20])
def test_gelu_against_float64_erf_gelu(f):
    """Error per value: Phi at x rounded to the 2**-12 grid (|x| phi(x) 2**-13, at most
    0.242 * 2**-13 = 3e-5), the table's 2**-31 times |x|, the output's 2**-(f+1)."""
    g = _gen(f)
    scale = float(1 << f)
    xi = torch.cat(
        [
            torch.randint(int(-10 * scale), int(10 * scale), (20000,), generator=g),
            torch.randint(int(-2 * scale), int(2 * scale), (20000,), generator=g),
            torch.tensor(
                [0, 1, -1, int(8 * scale), -int(8 * scale), int(9 * scale), -int(9 * scale)]
            ),
        ]
    )
    got = im.gelu(xi, f).double().numpy() / scale
    x = xi.double().numpy() / scale
    ref = _gelu_ref(x)
    phi = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    bound = 1.05 * np.abs(x) * phi * 2.0**-13 + np.abs(x) * 2.0**-31 + 2.0 ** -(f + 1) + 1e-12
    err = np.abs(got - ref)
    assert (err <= bound).all(), (float(err.max()), x[(err - bound).argmax()])
    assert err.max() <= 3.2e-5 + 2.0 ** -(f + 1)
    # beyond [-8, 8]: the identity and zero
    assert int(im.gelu(torch.tensor([9 << f]), f)) == 9 << f
    assert int(im.gelu(torch.tensor([-(9 << f)]), f)) == 0
    assert int(im.gelu(torch.tensor([0]), f)) == 0


def test_gelu_needs_the_tables_resolution():
    with pytest.raises(ValueError, match="at least 12 fractional bits"):
        im.gelu(torch.tensor([1]), 11)


# ---- rope ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_pos,head_dim", [(50, 16), (30, 32), (7, 2)])
def test_rope_tables_against_float64(n_pos, head_dim):
    cos, sin = im.rope_tables(n_pos, head_dim)
    assert cos.shape == sin.shape == (n_pos, head_dim // 2) and cos.dtype == torch.int64
    inv = 10000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(n_pos, dtype=np.float64)[:, None] * inv[None, :]
    unit = 1 << 14
    # rounded to the nearest 2**-14: within half a unit, plus float64's own error
    assert np.abs(cos.numpy() - np.cos(angles) * unit).max() <= 0.5 + 1e-6
    assert np.abs(sin.numpy() - np.sin(angles) * unit).max() <= 0.5 + 1e-6
    assert cos[0].tolist() == [unit] * (head_dim // 2) and sin[0].tolist() == [0] * (head_dim // 2)
    c8, s8 = im.rope_tables(n_pos, head_dim, bits=8)
    assert np.abs(c8.numpy() - np.cos(angles) * 256).max() <= 0.5 + 1e-9
    assert np.abs(s8.numpy() - np.sin(angles) * 256).max() <= 0.5 + 1e-9


# ---- softmax weights and frequencies -------------------------------------------------


def test_softmax_weights_with_a_valid_mask():
    g = _gen(5)
    y = torch.randint(-(40 << 12), 40 << 12, (64, 37), generator=g)
    valid = torch.rand(64, 37, generator=g) < 0.6
    valid[:, 3] = True  # every row has a valid entry
    y[valid.logical_not()] += 100 << 12  # masked entries are the largest: must not count
    w = im.softmax_weights(y, valid)
    assert bool((w[~valid] == 0).all())
    top = torch.where(valid, y, torch.iinfo(torch.int64).min).amax(-1, keepdim=True)
    ismax = valid & (y == top)
    assert bool((w[ismax] == ONE).all()) and bool((w[valid & ~ismax] < ONE).all())
    assert torch.equal(w[valid], im.exp2_neg((top - y).expand_as(y)[valid]))
    ref = torch.pow(2.0, (y - top).double() / (1 << 12)) * ONE
    assert float((w.double() - ref)[valid].abs().max()) <= 1.5
    # no mask: the row's maximum is exactly 1; a broadcasting (causal) mask
    w0 = im.softmax_weights(y)
    assert bool((w0.amax(-1) == ONE).all())
    causal = torch.arange(8)[None, :] <= torch.arange(8)[:, None]
    yc = torch.randint(-(1 << 14), 1 << 14, (2, 3, 8, 8), generator=g)
    wc = im.softmax_weights(yc, causal)
    assert bool((wc[..., ~causal] == 0).all()) and bool((wc.amax(-1) == ONE).all())
    assert torch.equal(wc[..., 0, :1], torch.full((2, 3, 1), ONE))


def _check_frequencies(y: torch.Tensor) -> torch.Tensor:
    """The documented contract of frequencies(y), checked with Python integers."""
    k = y.shape[-1]
    free = (1 << 24) - k
    w = im.frequencies(y)
    assert w.shape == y.shape and w.dtype == torch.int64
    assert bool((w >= 0).all())
    assert bool((w.sum(-1) == free).all())
    e = im.softmax_weights(y)  # 2**(y - max) with 30 fractional bits
    for row_y, row_e, row_w in zip(
        y.reshape(-1, k), e.reshape(-1, k), w.reshape(-1, k), strict=True
    ):
        ev, wv = row_e.tolist(), row_w.tolist()
        total = sum(ev)
        floors = [v * free // total for v in ev]  # proportional, floored
        first = row_y.tolist().index(int(row_y.max()))  # the first maximum
        rest = free - sum(floors)
        assert 0 <= rest < k
        want = floors.copy()
        want[first] += rest
        assert wv == want
    # and proportional to float64 2**(y - max) (the table's error, the floors)
    p = torch.softmax(y.double() / (1 << 12) * math.log(2.0), dim=-1) * free
    assert float((w.double() - p).abs().max()) <= 1 + k + float(p.max()) * 2.0**-9
    return w


def test_frequencies_sum_floor_and_remainder_on_the_first_maximum():
    g = _gen(6)
    _check_frequencies(torch.randint(-(20 << 12), 20 << 12, (50, 33), generator=g))
    # K = 2 (one symbol far below: weight 0, the other everything)
    w = _check_frequencies(torch.tensor([[0, 0], [5 << 12, 0], [0, -(40 << 12)], [7, 7]]))
    assert w[2].tolist() == [(1 << 24) - 2, 0]
    assert w[0].tolist() == [(1 << 23) - 1, (1 << 23) - 1]
    assert w[3, 0] == w[3, 1]
    # ties: the remainder goes to the first of the tied maxima only
    y = torch.tensor([[3, 9, 1, 9, 9, 0, -4]], dtype=torch.int64) << 12
    w = _check_frequencies(y)[0].tolist()
    assert w[1] >= w[3] == w[4] and w[1] - w[3] < 7
    flat = _check_frequencies(torch.zeros(1, 3, dtype=torch.int64))[0].tolist()
    free = (1 << 24) - 3
    assert flat == [free // 3 + free % 3, free // 3, free // 3]


def test_frequencies_with_2_pow_16_symbols():
    g = _gen(7)
    y = torch.randint(-(30 << 12), 10 << 12, (2, 1 << 16), generator=g)
    y[0, 12345] = 25 << 12  # a peak
    w = _check_frequencies(y)
    assert int(w[0].argmax()) == 12345


# ---- the same tables everywhere ------------------------------------------------------

_TABLE_SCRIPT = """
import hashlib, torch
from vqkit.compress import intmath as im
g = torch.Generator().manual_seed(11)
x = torch.randint(-(12 << 16), 12 << 16, (5000,), generator=g)
y = torch.randint(-(30 << 12), 30 << 12, (40, 300), generator=g)
v = torch.randint(0, 1 << 52, (5000,), generator=g)
a = torch.randint(-(1 << 21), 1 << 21, (16, 2048), generator=g)
b = torch.randint(-(1 << 14), 1 << 14, (2048, 24), generator=g)
out = {
    "exp2": im.exp2_neg(torch.arange(0, 40 << 12)),
    "phi": im._phi_table(),
    "rope": torch.cat(im.rope_tables(64, 16)),
    "rope32": torch.cat(im.rope_tables(17, 32)),
    "gelu": im.gelu(x, 16),
    "freq": im.frequencies(y),
    "sqrt": torch.sqrt(v.double()).long(),  # the LayerNorm's root of an exact float64
    "matmul": im.matmul(a, b),
}
for name, t in sorted(out.items()):
    print(name, hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())
print("capability", torch.backends.cpu.get_cpu_capability())
"""


def test_tables_and_results_are_the_same_in_a_process_on_default_kernels():
    here = subprocess.run(
        [sys.executable, "-c", _TABLE_SCRIPT], capture_output=True, text=True, timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}
    there = subprocess.run(
        [sys.executable, "-c", _TABLE_SCRIPT], capture_output=True, text=True, timeout=100, env=env
    )
    assert here.returncode == 0 and there.returncode == 0, (here.stderr, there.stderr)
    lines_here, lines_there = here.stdout.splitlines(), there.stdout.splitlines()
    assert lines_there[-1].lower() == "capability default"
    assert lines_here[:-1] == lines_there[:-1]
    assert len(lines_here) == 9
    # and this process (tables built here, maybe already cached) agrees too
    mine = dict(line.split() for line in lines_here[:-1])
    assert mine["phi"] == hashlib.sha256(im._phi_table().numpy().tobytes()).hexdigest()


def test_frac_bits_and_bit_length():
    assert im.bit_length(0) == 0 and im.bit_length(1) == 1 and im.bit_length(255) == 8
    assert im.bit_length(256) == 9 and im.bit_length(-256) == 9 and im.bit_length(0.5) == 0
    assert im.bit_length(2.0**40 - 1) == 40 and im.bit_length(2.0**40) == 41
    # every value of magnitude <= bound fits: bound * 2**f < 2**bits
    for bound in (0.013, 0.5, 0.75, 1.0, 3.9, 1000.0, 2.0**-20):
        f = im.frac_bits(bound, 15)
        assert bound * 2.0**f < 2**15
        if bound >= 0.5:  # and the most bits that fit (bit_length is >= 0: not below 1/2)
            assert bound * 2.0 ** (f + 1) >= 2**15
