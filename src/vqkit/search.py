"""Exact nearest-code search under squared L2 distance, without an N x K matrix.

The distance between a query ``x`` and a code ``e`` is expanded as

    ||x - e||^2 = ||x||^2 + ||e||^2 - 2 x.e

The cross term is a GEMM. The search walks over tiles of queries (rows) and codes
(columns); for each tile ``||e||^2 - 2 x.e`` is written by one GEMM of augmented
operands ``[x, 1] . [-2e, ||e||^2]^T`` into a scratch buffer that is reused for
every tile (no separate bias pass), reduced to a per-row minimum, and
merged into a running best. ``||x||^2`` is constant along a row, so it is added
only to the N winning values at the end, which are then clamped at 0 (the
expansion can go slightly negative through cancellation).

Peak extra memory is one scratch tile (bounded by ``max_scratch_bytes``) plus
O(N + K) vectors; the dense N x K matrix never exists.

Everything is computed in float32, also for float16/bfloat16 inputs and inside
``torch.autocast`` (the search is excluded from it). Ties resolve
to the lowest index, like ``torch.argmin``: tiles are visited in increasing code
order and a later tile replaces the running best only when strictly smaller.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "DEFAULT_SCRATCH_BYTES",
    "check_finite_pair",
    "check_pair",
    "faiss_available",
    "nearest_code",
    "scratch_bytes",
    "squared_distances",
]

DEFAULT_SCRATCH_BYTES = 32 * 2**20
"""Default bound on the scratch tile: 32 MiB."""

# FAISS tiles 4096 queries x 1024 codes; larger code tiles mean fewer merges.
_MAX_TILE_N = 4096
_MAX_TILE_K = 2048
# Group width of the two-level row argmin (see _row_min).
_GROUP = 64

Backend = Literal["auto", "torch", "faiss"]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def check_pair(x: torch.Tensor, codebook: torch.Tensor) -> None:
    """TypeError / ValueError, one line each, unless ``x`` (N, D) and ``codebook`` (K >=
    1, D) are floating tensors with values, of one width D, on one device."""
    if not isinstance(x, torch.Tensor) or not isinstance(codebook, torch.Tensor):
        raise TypeError("x and codebook must be torch.Tensors")
    if x.is_meta or codebook.is_meta:  # shapes only: no values to search
        raise ValueError(
            "x and codebook must hold values; got a meta tensor (materialise it first, e.g. "
            "module.to_empty(device=...) and load the weights)"
        )
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D); got {tuple(x.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D); got {tuple(codebook.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"dimension mismatch: x has D={x.shape[1]} but codebook has D={codebook.shape[1]}"
        )
    if codebook.shape[0] < 1:
        raise ValueError("codebook must hold at least one code (K >= 1)")
    for name, t in (("x", x), ("codebook", codebook)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if x.device != codebook.device:
        raise ValueError(
            f"x is on {x.device} but codebook is on {codebook.device}; move them to one device"
        )


def check_finite_pair(x: torch.Tensor, codebook: torch.Tensor, user: str = "nearest_code") -> None:
    """ValueError if a query row or a code holds NaN/Inf (``user`` names the caller in
    the message). A NaN/Inf code would otherwise attract every query with a NaN
    distance, and a NaN query get an arbitrary index.

    One fused min/max pass per tensor (NaN and Inf both surface in min or max) and a
    single host sync; the per-row diagnosis runs only on the error path."""
    if x.numel() == 0:
        return
    ends = torch.stack([*torch.aminmax(x.detach()), *torch.aminmax(codebook.detach())])
    if bool(torch.isfinite(ends).all()):
        return
    for name, t, rows in (("x", x, "query rows"), ("codebook", codebook, "codebook rows")):
        bad = (~torch.isfinite(t.detach()).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            first = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise ValueError(
                f"{name} has NaN or Inf in {len(bad)} of {t.shape[0]} {rows} ({first}); "
                f"{user} needs finite values"
            )


def _tile_sizes(n: int, k: int, max_scratch_bytes: int) -> tuple[int, int]:
    """Tile shape (rows, codes) whose fp32 scratch fits the budget."""
    budget = max(1, max_scratch_bytes // 4)
    tile_k = min(k, _MAX_TILE_K)
    if tile_k > budget:
        tile_k = budget
    # Rows stay at most _MAX_TILE_N even when all codes fit one column tile: a tile
    # that stays in cache for the row-min pass beats fewer, larger GEMMs (at N=32768,
    # K=512: 4096-row tiles ran the search in 1.1x the GEMM floor, 16384-row tiles 2.1x).
    tile_n = max(1, min(n, _MAX_TILE_N, budget // tile_k))
    return tile_n, tile_k


def _row_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (min value, first argmin) of a 2-D tile.

    On CPU ``Tensor.min(dim)`` with indices runs about 10x slower than the
    vectorised ``amin``. So the row is cut into groups of ``_GROUP`` contiguous
    columns: ``amin`` finds each group's minimum, a short ``min`` over the group
    minima picks the first group that holds the row minimum, and an ``argmin``
    over that group's ``_GROUP`` values gives the first position inside it. The
    lowest winning index always lies in the first winning group, so the result
    is identical to ``s.min(1)``.
    """
    rows, cols = s.shape
    if s.device.type != "cpu" or cols < 4 * _GROUP:
        return s.min(dim=1)
    main = cols - cols % _GROUP
    n_groups = main // _GROUP
    if main == cols:
        groups = s.view(rows * n_groups, _GROUP)
    else:
        groups = s[:, :main].reshape(rows * n_groups, _GROUP)
    val, grp = groups.amin(dim=1).view(rows, n_groups).min(dim=1)
    # index_select of whole 64-float rows is far faster than gather here.
    row_start = torch.arange(0, rows * n_groups, n_groups, device=s.device)
    members = groups.index_select(0, row_start + grp)
    idx = grp * _GROUP + members.argmin(dim=1)
    if main < cols:
        tail_val, tail_idx = s[:, main:].min(dim=1)
        better = tail_val < val
        val = torch.where(better, tail_val, val)
        idx = torch.where(better, tail_idx + main, idx)
    return val, idx


@torch.no_grad()
def _nearest_torch(
    x: torch.Tensor, codebook: torch.Tensor, code_sqnorm: torch.Tensor, max_scratch_bytes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    k = codebook.shape[0]
    tile_n, tile_k = _tile_sizes(n, k, max_scratch_bytes)
    if torch.compiler.is_compiling():
        return _nearest_traced(x, codebook, code_sqnorm, tile_n, tile_k)
    # ||e||^2 - 2 x.e as ONE plain GEMM of augmented operands [x, 1] . [-2e, ||e||^2]^T.
    # addmm(bias, ...) would first copy the broadcast bias into every tile, a full
    # extra pass over the tile that cost more than the GEMM itself at small D and K.
    xa = torch.empty(n, d + 1, dtype=torch.float32, device=x.device)
    xa[:, :d] = x
    xa[:, d] = 1.0
    ea = torch.empty(k, d + 1, dtype=torch.float32, device=x.device)
    torch.mul(codebook, -2.0, out=ea[:, :d])
    ea[:, d] = code_sqnorm
    scratch = torch.empty(tile_n * tile_k, dtype=torch.float32, device=x.device)
    best_val = torch.empty(n, dtype=torch.float32, device=x.device)
    best_idx = torch.empty(n, dtype=torch.int64, device=x.device)
    for r0 in range(0, n, tile_n):
        r1 = min(n, r0 + tile_n)
        xb = xa[r0:r1]
        run_val = best_val[r0:r1]
        run_idx = best_idx[r0:r1]
        for c0 in range(0, k, tile_k):
            c1 = min(k, c0 + tile_k)
            s = scratch[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            torch.mm(xb, ea[c0:c1].t(), out=s)  # ||x||^2 is added to the winners only
            val, idx = _row_min(s)
            if c0 == 0:
                run_val.copy_(val)
                run_idx.copy_(idx)
            else:
                better = val < run_val  # strict: earlier tile wins ties
                run_val.copy_(torch.where(better, val, run_val))
                run_idx.copy_(torch.where(better, idx + c0, run_idx))
    return best_idx, best_val


def _nearest_traced(
    x: torch.Tensor, codebook: torch.Tensor, code_sqnorm: torch.Tensor, tile_n: int, tile_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tiled search for ``torch.compile``: Dynamo cannot trace ``out=`` into
    views of a scratch buffer, so each tile is a fresh (N_t, K_t) GEMM result (the same
    bound on memory, no reuse) and the merge is functional. Same ties (strict <)."""
    k = codebook.shape[0]
    neg2e = codebook * -2.0
    vals, idxs = [], []
    for r0 in range(0, x.shape[0], tile_n):
        xb = x[r0 : r0 + tile_n]
        best_val = best_idx = None
        for c0 in range(0, k, tile_k):
            s = torch.addmm(code_sqnorm[c0 : c0 + tile_k], xb, neg2e[c0 : c0 + tile_k].t())
            val, idx = s.min(dim=1)
            if best_val is None:
                best_val, best_idx = val, idx
            else:
                better = val < best_val
                best_val = torch.where(better, val, best_val)
                best_idx = torch.where(better, idx + c0, best_idx)
        vals.append(best_val)
        idxs.append(best_idx)
    return torch.cat(idxs), torch.cat(vals)


@torch.no_grad()
def _nearest_faiss(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.contiguous().numpy())
    dist, idx = index.search(x.contiguous().numpy(), 1)
    return torch.from_numpy(idx[:, 0]).long(), torch.from_numpy(dist[:, 0])


def nearest_code(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    code_sqnorm: torch.Tensor | None = None,
    max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
    backend: Backend = "torch",
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for every query, and its squared distance.

    Args:
        x: queries, shape (N, D), any floating dtype.
        codebook: codes, shape (K, D), on the same device as ``x``.
        code_sqnorm: optional precomputed ``||e_k||^2`` (K,), float32.
        max_scratch_bytes: bound on the scratch tile; the search never holds
            more than this much of the N x K distance matrix at once.
        backend: ``"torch"`` (default; CPU and CUDA, deterministic), ``"faiss"``
            (``faiss.IndexFlatL2``, CPU only, optional dependency) or ``"auto"``
            (FAISS when installed and the tensors are on CPU, else torch).
        check_finite: raise ValueError naming the rows when ``x`` or ``codebook``
            holds NaN/Inf (one min/max pass per tensor and one host sync; skipped while
            ``torch.compile`` traces). Switch off when the caller has checked already.

    Returns:
        ``(indices, sq_dist)``: int64 (N,) with ties resolved to the lowest
        index, and float32 (N,) ``min_k ||x_n - e_k||^2`` clamped at 0.

    Not differentiable: the result is a discrete choice, computed under no_grad.
    """
    check_pair(x, codebook)
    if max_scratch_bytes < 4:
        raise ValueError(f"max_scratch_bytes must be >= 4; got {max_scratch_bytes}")
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss'; got {backend!r}")
    if check_finite and not torch.compiler.is_compiling():
        check_finite_pair(x, codebook)
    n = x.shape[0]
    if n == 0:
        return (
            torch.empty(0, dtype=torch.int64, device=x.device),
            torch.empty(0, dtype=torch.float32, device=x.device),
        )
    x = x.detach().to(torch.float32)
    codebook = codebook.detach().to(torch.float32)

    if backend == "auto":
        backend = "faiss" if x.device.type == "cpu" and faiss_available() else "torch"
    if backend == "faiss":
        if x.device.type != "cpu":
            raise ValueError("the faiss backend runs on CPU tensors only; use backend='torch'")
        return _nearest_faiss(x, codebook)

    if code_sqnorm is None:
        code_sqnorm = codebook.pow(2).sum(dim=1)
    else:
        code_sqnorm = code_sqnorm.detach().to(device=x.device, dtype=torch.float32)
        if code_sqnorm.shape != (codebook.shape[0],):
            raise ValueError(
                f"code_sqnorm must have shape ({codebook.shape[0]},); "
                f"got {tuple(code_sqnorm.shape)}"
            )
    # float32 GEMMs also inside a torch.autocast region (which would run mm in half)
    with torch.autocast(device_type=x.device.type, enabled=False):
        idx, val = _nearest_torch(x, codebook, code_sqnorm, max_scratch_bytes)
    val = val + x.pow(2).sum(dim=1)
    return idx, val.clamp(min=0.0)


def squared_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Dense (N, K) squared distances, in float32. Allocates N x K: for analysis
    and small problems only; the quantizers never call it."""
    check_pair(x, codebook)
    x = x.to(torch.float32)
    codebook = codebook.to(torch.float32)
    d = torch.addmm(codebook.pow(2).sum(1), x, codebook.t(), beta=1.0, alpha=-2.0)
    return d.add_(x.pow(2).sum(1, keepdim=True)).clamp_(min=0.0)


def scratch_bytes(n: int, k: int, max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES) -> int:
    """Bytes of the scratch tile ``nearest_code`` would allocate for N x K."""
    tile_n, tile_k = _tile_sizes(n, k, max_scratch_bytes)
    return 4 * tile_n * tile_k if n and k else 0
