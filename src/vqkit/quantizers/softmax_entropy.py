"""IBQ's lookup and its entropy penalty as ONE tiled computation over a softmax of an
explicit codebook, never the N x K matrix (Shi et al. 2024; the MAGVIT-v2 entropy form
used by its reference code).

With ``s_nk = x_n.e_k`` (N rows, K codes) the layer needs

* the lookup ``q_n = sum_k (onehot + p1 - sg[p1])_nk e_k``, ``p1 = softmax(s_n)``: value
  ``e_{argmax_k s_nk}``, gradient through ``p1``;
* the per-sample entropy ``H_n = H(p2_n)``, ``p2 = softmax(a)``, ``a = s / T``, meaned
  over the kept rows;
* the batch entropy ``H(P) = -sum_k P_k log P_k`` of ``P_k = mean_n p2_nk`` (EXACT;
  ``0 log 0 = 0``; the reference code adds 1e-5 inside the log).

Every tile holds WHOLE rows (``rows x K``), so each row's softmax statistics are
complete inside its tile and one GEMM ``x E^T`` per tile serves all three terms.

Forward, one pass: ``s`` (product 1), the row max ``m_n`` and its first index (the
code), the centred logits in base 2, ``s2 = (s - m) log2 e`` (``<= 0``; ``exp2`` runs
twice as fast as ``exp`` on CPU), ``a2 = s2 / T``, the unnormalised ``u = 2^a2`` with
``Z2_n = sum_k u_nk``, ``abar_n = sum_k u_nk a2_nk / Z2_n``, ``H_n = ln 2 (log2 Z2_n -
abar_n)`` and the tile's share of ``P`` (``(w / Z2) @ u``). No second pass, and no tile
is normalised: ``1 / Z`` goes into row figures. The lookup's softmax is not formed in the
forward (its value is the argmax).

Backward, one recomputing pass: ``s2`` again (product 2; the forward's very operations,
so ``u`` is bit for bit the forward's), ``g E^T`` (product 3; only for the lookup), then
the gradient of all terms w.r.t. the logits in one tile::

    dL/ds_nj = p1_nj (g_n.e_j - sum_k p1_nk g_n.e_k)                        (lookup)
             + p2_nj (alpha_n (ac_nj - abar_n) + beta_n (log P_j - c_n)) / T  (entropy)

with ``p1 = 2^s2 / sum_k 2^s2``, ``p2 = u / Z2``, ``ac - abar = ln 2 (a2 - abar)``
(centred), ``c_n = sum_k p2_nk log P_k`` (formed centred: ``log P_j - c_n = lp_j - sum_k
p2_nk lp_k``, ``lp = log P - log P_{top_n}``), ``alpha_n = -g_s w_n / N_local``,
``beta_n = -g_b w_n ws / N_global`` (``w`` the keep mask, ``ws`` the world size); the
entropy part is ``u (A a2 - C) + B u lp`` with row figures ``A = alpha ln 2 / (T Z2)``,
``B = beta / (T Z2)``, ``C = A abar + B c``. Then ``dL/dx = dL/ds E`` (product 4),
``dL/dE = dL/ds^T x + index_add(g)`` (product 5; the hard one-hot routes ``g`` to the
chosen code).
Five N x D x K products per step in all (main's separate lookup and entropy took ten).

Centring matters: at T = 0.01 the raw ``a`` reach 100-1000, and ``a - abar`` formed
from raw values lost up to all of the gradient's digits in float32 on sharp batches;
centred, every term is of the size of the result, and the float32 gradient's error is
that of the float32 logits alone (tests/test_softmax_entropy.py; the base-2 scaling and
the row figures did not change it at the table's precision).

Each tile's elementwise work is the in-place PyTorch passes of :func:`_forward_tile`
and :func:`_backward_tile`, on every device and dtype. (A C kernel of the same work,
built with ``-march=native``, saved 6-10 % of the K = 16384 training step with the
penalty and 1-9 % without; built so that its bits did not depend on the host, the step
took 1.9x as long as with these passes. It was retired: docs/results.md, "Large
codebooks at the floor".)

Memory: the K-float marginal, O(N + K) row and code figures and four (rows x K) tiles
within ``max_scratch_bytes`` (at least one row).

Distributed: with ``sync`` the marginal and the row count are summed over the ranks of
``group`` (one all-reduce of K + 1 floats), so ``H(P)`` is the GLOBAL batch's; its
gradient is multiplied by the world size so that DDP's averaging gives the exact
gradient (each rank back-propagates through its own rows), as in
:mod:`vqkit.quantizers.entropy`. The per-sample term is the local mean (DDP's averaging
makes it the global mean for equal local batches).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..distributed import all_reduce_sum, world_size
from ..search import check_finite_pair, check_pair
from .base import fp32_region

__all__ = [
    "IBQ_MIN_ROWS",
    "IBQ_SCRATCH_BYTES",
    "LOG2E",
    "clamped_exp2",
    "ibq_scratch_bytes",
    "ibq_terms",
    "check_terms_args",
    "row_max",
    "whole_rows",
    "softmax_entropy_terms",
]

IBQ_SCRATCH_BYTES = 16 * 2**20
"""Default bound on the four live (rows x K) tiles (raised for large K by
:func:`ibq_scratch_bytes`)."""
IBQ_MIN_ROWS = 16
"""Whole rows per tile that :func:`ibq_scratch_bytes` provides for at any K."""

_MAX_ROWS = 256
LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
_EXP2_FLOOR = -64.0
"""Exponents (base 2) are clamped here before ``exp2``; at T = 0.01 most logits of a
row lie below. A clamped term is at most
``2^-64`` where the row's largest is 1, so the ``K <= 2^18`` clamped terms of a row move
its sum by at most ``2^-46`` relative: far below float32 resolution. Why not lower:
below -126 float32 ``exp2`` goes subnormal and leaves its vectorised path (7x slower on
CPU; ``exp`` below -87, 75x), and products of clamped terms with the row figures
(~1e-3) go subnormal too (vector code pays a microcode assist for each). ``exp2``
itself runs twice as fast as ``exp`` here (0.55 against 1.05 ns an element), hence the
base-2 logits."""
_ARGMAX_BLOCK = 128


def ibq_scratch_bytes(num_codes: int, itemsize: int = 4) -> int:
    """IBQ's default scratch bound for ``num_codes`` codes: ``IBQ_SCRATCH_BYTES``, or
    room for ``IBQ_MIN_ROWS`` whole rows in the fused Function's four (rows x K) tiles
    where that is more (above K = 2^16; 64 MiB at 2^18). Why: each tile's five
    products stream the whole codebook (and ``dL/dE``) from memory, so 4-row tiles at
    K = 2^18 left the layer memory-bound: 16 rows took it from 28 s to 16 s (N = 2048,
    D = 64, 1 thread; the code-tiled lookup was unchanged, 7.8-8.0 s)."""
    k = num_codes if isinstance(num_codes, int) and num_codes > 0 else 0  # validated later
    return max(IBQ_SCRATCH_BYTES, IBQ_MIN_ROWS * _row_bytes(k, itemsize))


def _row_bytes(k: int, itemsize: int) -> int:
    """Bytes one whole row of ``k`` codes takes in the four (rows x K) tiles that live at
    once in :func:`ibq_terms`' backward (the one place this rule is written)."""
    return 4 * itemsize * max(k, 1)


def whole_rows(k: int, itemsize: int, scratch: int) -> int:
    """Whole rows of ``k`` codes that one tile of :func:`ibq_terms` holds within
    ``scratch`` bytes (four (rows x K) tiles live at once in the backward), at most
    256; 0 where not even one row fits (a tile then holds one row anyway)."""
    return min(_MAX_ROWS, scratch // _row_bytes(k, itemsize))


def _row_tile(n: int, k: int, itemsize: int, scratch: int) -> int:
    """Rows per tile for ``n`` rows: :func:`whole_rows`, at least one."""
    return max(1, min(max(n, 1), whole_rows(k, itemsize, scratch)))


def _scratch(rows: int, k: int, like: torch.Tensor) -> torch.Tensor | None:
    """A flat buffer reused by every tile (eager only): fresh tile-sized allocations
    fragment glibc's heap (RSS grew ~4x over the live tiles). Dynamo cannot trace
    ``out=`` into views of it, so compiled graphs allocate per tile instead."""
    if torch.compiler.is_compiling():
        return None
    return torch.empty(rows * k, dtype=like.dtype, device=like.device)


def _view(buf: torch.Tensor | None, rows: int, k: int) -> torch.Tensor | None:
    return None if buf is None else buf[: rows * k].view(rows, k)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return a @ b if out is None else torch.mm(a, b, out=out)


def clamped_exp2(a: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``2^max(a, _EXP2_FLOOR)``, into ``out`` when there is one."""
    if out is None:
        return a.clamp(min=_EXP2_FLOOR).exp2_()
    return torch.clamp(a, min=_EXP2_FLOOR, out=out).exp2_()


def row_max(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum of ``s`` (rows, K) and its first index: the maxima of blocks
    of 128 codes, the first block holding the row's maximum, the first position in it.
    ``s.max(1)``'s indices cost 1 ns an element on CPU, this 0.1."""
    rows, k = s.shape
    b = _ARGMAX_BLOCK
    full = k - k % b
    bm = s[:, :full].view(rows, full // b, b).amax(2)
    if full < k:
        bm = torch.cat([bm, s[:, full:].amax(1, keepdim=True)], 1)
    m = bm.amax(1)
    mc = m.unsqueeze(1)
    block = (bm == mc).to(torch.uint8).argmax(1)  # argmax: the first of equal maxima
    cols = (block.unsqueeze(1) * b + torch.arange(b, device=s.device)).clamp_(max=k - 1)
    return m, block * b + (s.gather(1, cols) == mc).to(torch.uint8).argmax(1)


class _IBQTerms(torch.autograd.Function):
    """See the module docstring. Inputs ``x`` (N, d), ``e`` (K, d), ``w`` (N,) keep
    weights (1 kept, 0 padded) or None; ``inv_t`` 0 switches the entropy off, ``lookup``
    False the lookup's gradient. Outputs ``(q (N, d), idx (N,), sample, batch)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        e: torch.Tensor,
        w: torch.Tensor | None,
        inv_t: float,
        lookup: bool,
        sync: bool,
        group: dist.ProcessGroup | None,
        scratch: int,
    ) -> tuple[torch.Tensor, ...]:
        # autocast off in both passes: AOT autograd traces them under the caller's autocast
        with fp32_region(x.device):
            n, k = x.shape[0], e.shape[0]
            ent = inv_t > 0
            rows = _row_tile(n, k, x.element_size(), scratch)
            buf_s = _scratch(min(rows, n), k, x)
            buf_p = _scratch(min(rows, n), k, x) if ent else None
            et = e.t()
            idx = torch.empty(n, dtype=torch.int64, device=x.device)
            m = x.new_empty(n)  # row max of s
            z2 = x.new_empty(n)  # sum_k 2^a2_nk
            abar = x.new_empty(n)  # sum_k p2_nk a2_nk (base 2)
            marg = x.new_zeros(k)
            wv = x.new_ones(n) if w is None else w
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                s = _mm(x[r0:r1], et, _view(buf_s, r1 - r0, k))
                mb, ib = row_max(s)  # ties to the lowest index
                m[r0:r1], idx[r0:r1] = mb, ib
                if ent:  # (the lookup alone needs only m and the index here)
                    u_buf = _view(buf_p, r1 - r0, k)
                    z2[r0:r1], abar[r0:r1] = _forward_tile(s, mb, wv[r0:r1], inv_t, marg, u_buf)
            sample = batch = x.new_zeros(())
            n_loc = x.new_tensor(float(n)) if w is None else w.sum()
            total, ws = n_loc, 1
            if ent:
                h = _LN2 * (z2.log2() - abar)  # H(p2_n) in nats, both terms centred
                sample = (h.sum() if w is None else h @ w) / n_loc.clamp(min=1.0)
                if sync:
                    ws = world_size(group)
                    marg, total = all_reduce_sum([marg, total], group)
                big_p = marg / total.clamp(min=1.0)
                log_p = torch.log(big_p.clamp(min=torch.finfo(big_p.dtype).tiny))
                batch = -(big_p * log_p).sum()
            else:
                log_p = marg
            ctx.save_for_backward(x, e, w, idx, m, z2, abar, log_p, n_loc, total)
            ctx.cfg = (inv_t, lookup, ws, rows)
            ctx.device = x.device
            ctx.mark_non_differentiable(idx)
            return F.embedding(idx, e), idx, sample, batch

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_q: Any, _g_idx: Any, g_s: Any, g_b: Any) -> tuple[Any, ...]:
        with fp32_region(ctx.device):
            return _IBQTerms._backward(ctx, g_q, g_s, g_b)

    @staticmethod
    def _backward(ctx: Any, g_q: Any, g_s: Any, g_b: Any) -> tuple[Any, ...]:
        x, e, w, idx, m, z2, abar, log_p, n_loc, total = ctx.saved_tensors
        inv_t, lookup, ws, rows = ctx.cfg
        ent = inv_t > 0
        n, k = x.shape[0], e.shape[0]
        lookup = lookup and g_q is not None
        ent = ent and (g_s is not None or g_b is not None)
        if lookup:
            g_q = g_q.to(x.dtype).contiguous()  # a stride-0 grad made each GEMM copy
        if ent:
            # per-sample term: a local mean (1 / N_local); batch term: P averages the
            # GLOBAL batch (1 / N_global), times the world size since DDP averages ranks
            zero = x.new_zeros(())
            alpha = -(g_s if g_s is not None else zero) / n_loc.clamp(min=1.0)
            beta = -(g_b if g_b is not None else zero) * ws / total.clamp(min=1.0)
            wv = x.new_ones(n) if w is None else w
            # row figures of dL/ds = p (A a2 + B lp - C) with p = p2 z2 (see the module
            # docstring): ln 2 from the base-2 a2, 1 / T, 1 / z2; padded rows get none
            a_row = alpha * wv * (_LN2 * inv_t) / z2
            b_row = beta * wv * inv_t / z2
        et = e.t()
        dx = torch.empty_like(x)
        de = torch.zeros_like(e)
        bufs = [_scratch(min(rows, n), k, x) for _ in range(4)]
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            nb, xb = r1 - r0, x[r0:r1]
            if not (lookup or ent):
                dx[r0:r1] = 0
                continue
            tiles = [_view(b, nb, k) for b in bufs]
            # the forward's very logits and passes, so that p is bit for bit that of abar
            # and z2 and sum_j dL/ds_nj = 0 holds to rounding (a mismatch of 1 ulp in p
            # cost 3x in the float32 gradient of sharp rows)
            s = _mm(xb, et, tiles[0])
            gl = _mm(g_q[r0:r1], et, tiles[1]) if lookup else None  # g_n.e_k
            terms = None
            if ent:  # row figures, and log P_top(n) to centre log P in the row
                top = log_p[idx[r0:r1]]
                terms = (log_p, top, a_row[r0:r1], b_row[r0:r1], abar[r0:r1], z2[r0:r1])
            dls = _backward_tile(s, gl, m[r0:r1], inv_t, terms, tiles)
            if tiles[0] is None:  # traced: no out= into a view
                dx[r0:r1] = dls @ e
            else:
                torch.mm(dls, e, out=dx[r0:r1])
            de.addmm_(dls.t(), xb)
        if lookup:
            de.index_add_(0, idx, g_q)
        need_x, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (dx if need_x else None), (de if need_e else None), *([None] * 6)


def _forward_tile(
    s: torch.Tensor,
    m: torch.Tensor,
    w: torch.Tensor,
    inv_t: float,
    marg: torch.Tensor,
    u_buf: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, abar)`` of one tile of raw logits ``s`` (rows, K) with row maxima ``m`` and
    row weights ``w``: ``a2 = (s - m) log2(e) / T``, ``u = 2^max(a2, _EXP2_FLOOR)``,
    ``z = sum_k u``, ``abar = sum_k u a2 / z``; adds the rows' share ``(w / z) @ u`` to
    ``marg`` (K,). In place: ``s`` overwritten, ``u`` in ``u_buf`` where there is one,
    never normalised (``1 / z`` goes to row figures)."""
    # centred logits in base 2 (<= 0, 0 at the maximum): 2^s = e^(logit - m)
    s.sub_(m.unsqueeze(1)).mul_(LOG2E)
    s.mul_(inv_t)  # a2: the entropy's centred logits / T, base 2
    u = clamped_exp2(s, u_buf)
    z = u.sum(1)  # >= 1: the maximum's term is 2^0
    abar = s.mul_(u).sum(1) / z  # sum_k p2 a2; s is not needed after
    marg += (w / z) @ u
    return z, abar


def _backward_tile(
    s: torch.Tensor,
    gl: torch.Tensor | None,
    m: torch.Tensor,
    inv_t: float,
    terms: tuple[torch.Tensor, ...] | None,
    tiles: list[torch.Tensor | None],
) -> torch.Tensor:
    """dL/ds of one tile of raw logits ``s`` (rows, K) with row maxima ``m``: the
    lookup's part from ``gl = g E^T`` (None: none), the entropy's from ``terms = (log_p
    (K,), top, a_row, b_row, abar, z2)`` (rows each; None: none); formulas in the module
    docstring. In place: ``s`` and ``gl`` overwritten, ``tiles[2:4]`` free tiles (None
    when traced); the result is ``s`` or ``gl``."""
    s.sub_(m.unsqueeze(1)).mul_(LOG2E)
    dls = inv_z1 = None  # the lookup's part is dls * inv_z1
    if gl is not None:
        p1 = clamped_exp2(s, tiles[2])  # the lookup's softmax times z1
        inv_z1 = 1.0 / p1.sum(1, keepdim=True)
        # p1 (g.e - r), r = sum_k p1 g.e, as p1 g.e - p1 r: no extra tile
        gl.mul_(p1)
        dls = gl.addcmul_(p1, gl.sum(1, keepdim=True) * inv_z1, value=-1.0)
    if terms is None:
        assert dls is not None and inv_z1 is not None
        return dls.mul_(inv_z1)
    log_p, top, a_r, b_r, abar, z2 = terms
    s.mul_(inv_t)  # a2
    p = clamped_exp2(s, tiles[2])
    # lp = log P - log P_top(n), centred like the logits, so that a sharp row's top entry
    # (a sum of tiny tail terms) is not the difference of two numbers near log P_top
    top = top.unsqueeze(1)
    lp = torch.sub(log_p, top, out=tiles[3]) if tiles[3] is not None else log_p - top
    lpp = lp.mul_(p)  # p lp: c = sum p2 lp = sum (p lp) / z2
    c_r = a_r * abar + b_r * lpp.sum(1) / z2  # A abar + B c
    # p (A a2 - C) + B p lp: alpha (ac - abar) + beta (lp - c) times p2 / T; in place
    # (addcmul(-C, a2, A, out=s) took 4x as long: two broadcast operands leave its
    # vectorised loop)
    t = s.mul_(a_r.unsqueeze(1)).sub_(c_r.unsqueeze(1))
    t.mul_(p).addcmul_(lpp, b_r.unsqueeze(1))
    return t if dls is None else t.addcmul_(dls, inv_z1)


def check_terms_args(
    x: torch.Tensor,
    codebook: torch.Tensor,
    keep: torch.Tensor | None,
    max_scratch_bytes: int,
    check_finite: bool,
    user: str,
) -> None:
    """One-line TypeError / ValueError unless ``x`` (N, d) and ``codebook`` (K, d) are
    finite floating tensors of one dtype and device, ``keep`` None or (N,) bool there,
    and ``max_scratch_bytes`` a positive int (``check_finite``: one min/max pass over
    each, skipped while tracing)."""
    check_pair(x, codebook)
    if x.dtype != codebook.dtype:
        raise TypeError(
            f"{user}: x and codebook must share a dtype; got {x.dtype} and {codebook.dtype}"
        )
    if keep is not None and (
        not isinstance(keep, torch.Tensor)
        or keep.dtype != torch.bool
        or keep.shape != (x.shape[0],)
        or keep.device != x.device
    ):
        got = (
            f"{keep.dtype} {tuple(keep.shape)} on {keep.device}"
            if isinstance(keep, torch.Tensor)
            else type(keep).__name__
        )
        raise ValueError(
            f"{user}: keep must be a bool ({x.shape[0]},) tensor on {x.device}; got {got}"
        )
    if (
        isinstance(max_scratch_bytes, bool)
        or not isinstance(max_scratch_bytes, int)
        or max_scratch_bytes < 1
    ):
        raise ValueError(
            f"{user}: max_scratch_bytes must be a positive int; got {max_scratch_bytes!r}"
        )
    if check_finite and not torch.compiler.is_compiling():
        check_finite_pair(x, codebook, user)


def ibq_terms(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float | None,
    keep: torch.Tensor | None = None,
    *,
    lookup: bool = True,
    sync: bool = False,
    group: dist.ProcessGroup | None = None,
    max_scratch_bytes: int = IBQ_SCRATCH_BYTES,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """IBQ's lookup and entropy terms in one tiled pass each way (module docstring).

    Args:
        x: (N, d) rows; codebook: (K, d), the same floating dtype.
        temperature: T of the entropy's softmax; None switches the entropy off (the two
            entropy outputs are then zeros without gradient).
        keep: (N,) bool, False for padded rows: left out of both entropy terms (the
            lookup covers every row).
        lookup: False leaves the lookup's softmax gradient out (the codes are still
            returned).
        check_finite: raise ValueError naming the rows where ``x`` or ``codebook``
            holds NaN/Inf (wrong shapes, dtypes or devices always raise).
    Returns:
        ``(codes (N, d), indices (N,), mean per-sample entropy, batch entropy)``: codes
        are exactly ``codebook[argmax_k x.e_k]`` (ties to the lowest index) with the
        gradient of ``(onehot + p - sg[p]) @ E``, ``p = softmax(x E^T)``; entropies in
        nats of ``softmax(x E^T / T)``.
    """
    check_terms_args(x, codebook, keep, max_scratch_bytes, check_finite, "ibq_terms")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    w = None if keep is None else keep.to(x.dtype)
    inv_t = 0.0 if temperature is None else 1.0 / float(temperature)
    return _IBQTerms.apply(
        x, codebook, w, inv_t, bool(lookup), bool(sync), group, int(max_scratch_bytes)
    )


def softmax_entropy_terms(
    x: torch.Tensor,
    codebook: torch.Tensor,
    temperature: float,
    keep: torch.Tensor | None = None,
    *,
    sync: bool = False,
    group: dist.ProcessGroup | None = None,
    max_scratch_bytes: int = IBQ_SCRATCH_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean per-sample entropy, batch entropy)`` in nats of ``softmax(x E^T / T)`` for
    rows ``x`` (N, d) over the codes ``codebook`` (K, d), float32, differentiable in
    both; ``keep`` (N,) bool leaves rows out (padding). The entropy half of
    :func:`ibq_terms`; an empty batch gives zeros (and, with ``sync``, still joins the
    all-reduce)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    check_pair(x, codebook)
    x, codebook = x.to(torch.float32), codebook.to(torch.float32)
    check_terms_args(x, codebook, keep, max_scratch_bytes, True, "softmax_entropy_terms")
    if keep is not None:
        x = x[keep]
    _, _, sample, batch = ibq_terms(
        x,
        codebook,
        temperature,
        lookup=False,
        sync=sync,
        group=group,
        max_scratch_bytes=max_scratch_bytes,
        check_finite=False,
    )
    return sample, batch
