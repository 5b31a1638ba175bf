"""Codebook math on plain tensors: per-code sums, EMA updates, k-means, revival
sampling and optimizer-row reset (collectives live in :mod:`vqkit.distributed`).

Plain functions, so that the quantizers stay small and the math is testable on its own.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .distributed import all_gather_rows, broadcast_, world_size
from .search import DEFAULT_SCRATCH_BYTES, nearest_code

__all__ = [
    "assignment_stats",
    "ema_",
    "kmeans",
    "kmeans_defaults",
    "kmeans_init",
    "kmeans_plusplus",
    "laplace_smooth",
    "reset_optimizer_rows",
    "sample_replacements",
]


def assignment_stats(
    flat: torch.Tensor,
    indices: torch.Tensor,
    num_embeddings: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts n_k (K,) and sums s_k = sum_{i: idx_i = k} x_i (K, D),
    float32, by ``index_add`` (no one-hot). ``weights`` (N,) (e.g. 0 for padded rows)
    weight each row's contribution."""
    flat = flat.detach().to(torch.float32)
    counts = torch.zeros(num_embeddings, dtype=torch.float32, device=flat.device)
    sums = torch.zeros(num_embeddings, flat.shape[1], dtype=torch.float32, device=flat.device)
    if weights is None:
        counts.index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))
        sums.index_add_(0, indices, flat)
    else:
        w = weights.to(torch.float32)
        counts.index_add_(0, indices, w)
        sums.index_add_(0, indices, flat * w.unsqueeze(1))
    return counts, sums


def ema_(average: torch.Tensor, value: torch.Tensor, decay: float | torch.Tensor) -> None:
    """In place: ``average <- decay * average + (1 - decay) * value`` (``decay`` a float
    or a 0-d tensor)."""
    if isinstance(decay, torch.Tensor):
        average.mul_(decay).add_(value * (1.0 - decay))
    else:
        average.mul_(decay).add_(value, alpha=1.0 - decay)


def laplace_smooth(cluster_size: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Additive smoothing that keeps the total: ``(N_k + eps) / (n + K eps) * n``
    with ``n = sum_k N_k``; keeps every code's size positive so that
    ``m_k / N_k`` never divides by zero."""
    n = cluster_size.sum()
    k = cluster_size.shape[0]
    return (cluster_size + epsilon) / (n + k * epsilon) * n


# -- data-dependent initialisation ------------------------------------------------


FULL_INIT_CODES = 4096
"""Up to this many codes the default k-means init takes 16 vectors per code and 10 Lloyd
iterations (as it always did); above, :func:`kmeans_defaults` bounds the work."""


def kmeans_defaults(num_codes: int) -> tuple[int, int]:
    """``(vectors per code, Lloyd iterations)`` of the default k-means init for K codes.

    The work of the init is about ``N K (iterations + 1)`` distance evaluations (the
    seeding costs about one iteration), with ``N = vectors per code * K``: quadratic in
    K at a fixed number per code, so 16 per code and 10 iterations, about 10 s at
    K = 4096 on one CPU core, took hours at K = 65536. Up to ``FULL_INIT_CODES`` those
    defaults stay; above, the sample shrinks to ``16 * 4096 / K`` vectors per code (at
    least 2: 4 at K = 16384) and the iterations to ``ceil(10 * 4096 / K)`` (at least 2:
    3 at K = 16384), so that the work grows about linearly in K up to K = 32768 and as
    ``6 K^2`` beyond (minutes at K = 65536). Lloyd's first iterations do most of the
    work: the 16-bit CIFAR-10 run's init with 2 per code and 2 iterations
    (docs/results.md) gave the best 16-bit result."""
    if num_codes <= FULL_INIT_CODES:
        return 16, 10
    per_code = max(2, math.ceil(16 * FULL_INIT_CODES / num_codes))
    iters = max(2, math.ceil(10 * FULL_INIT_CODES / num_codes))
    return per_code, iters


SEQUENTIAL_SEEDS = 2048
"""Up to this many centres k-means++ draws one centre per round (the exact algorithm);
above it, ``ceil(k / SEQUENTIAL_SEEDS)`` centres per round."""


@torch.no_grad()
def kmeans_plusplus(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): k rows of ``x`` (N, D), each
    drawn with probability proportional to its squared distance to the nearest
    centre chosen so far (the first uniformly). Keeps one (N,) distance vector, updated
    against the newest centres only, never an N x K matrix. A chosen row's own distance
    is set to 0 exactly, so it is never drawn again. With fewer distinct points than k,
    the remaining centres are drawn uniformly (duplicates). Returns float32 (k, D).

    The centres are drawn in rounds of ``b = ceil(k / SEQUENTIAL_SEEDS)``: up to 2048
    centres b = 1, the exact algorithm; above, each of about 2048 rounds draws up to b
    distinct rows at once from the same distances (as k-means|| does, Bahmani et al.
    2012). Each round updates the distances with one matrix product against its new
    centres: one centre at a time is O(N D) of memory-bound work per centre (at
    k = 65536 on 131k points: minutes), the rounds turn it into GEMMs. The Lloyd
    iterations that follow refine either seeding."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans_plusplus needs a non-empty (N, D) tensor; got {tuple(x.shape)}")
    x = x.detach().to(torch.float32)
    x_sq = x.pow(2).sum(1)
    centers = torch.empty(k, x.shape[1], dtype=torch.float32, device=x.device)
    d2 = torch.full_like(x_sq, math.inf)  # no centre yet: the first draw is uniform
    per_round = -(-k // SEQUENTIAL_SEEDS)
    i = 0
    while i < k:
        rows = _sample_rows(d2, min(per_round, k - i), generator)
        new = x[rows]
        centers[i : i + rows.numel()] = new
        torch.minimum(d2, _min_sq_dist(x, x_sq, new, max_scratch_bytes), out=d2)
        d2[rows] = 0.0
        i += rows.numel()
    return centers


def _sample_rows(weights: torch.Tensor, b: int, generator: torch.Generator | None) -> torch.Tensor:
    """Up to ``b`` distinct row indices drawn with probability proportional to
    ``weights`` (b draws with replacement, repeats dropped: a rare repeat only leaves
    its place to the next round); ``b`` uniform rows when every weight is 0 or any is
    infinite (before the first centre). Drawn on the CPU (a CPU ``generator`` serves
    any device)."""
    w = weights.detach().to("cpu", torch.float64)
    total = float(w.sum())
    if not (total > 0 and math.isfinite(total)):
        rows = torch.randperm(w.numel(), generator=generator)[:b]
    else:
        rows = torch.multinomial(w, b, replacement=True, generator=generator).unique()
    return rows.to(weights.device)


def _min_sq_dist(
    x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, max_scratch_bytes: int
) -> torch.Tensor:
    """``min_j ||x_i - c_j||^2`` (N,) for a few centres ``c`` (b, D), in row chunks of at
    most ``max_scratch_bytes`` of the (rows x b) matrix."""
    c_sq = c.pow(2).sum(1)
    rows = max(1, max_scratch_bytes // (4 * max(c.shape[0], 1)))
    out = torch.empty_like(x_sq)
    for r0 in range(0, x.shape[0], rows):
        d = torch.addmm(c_sq, x[r0 : r0 + rows], c.t(), alpha=-2.0)
        out[r0 : r0 + rows] = d.add_(x_sq[r0 : r0 + rows].unsqueeze(1)).amin(1)
    return out.clamp_(min=0.0)


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    generator: torch.Generator | None = None,
    max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
) -> torch.Tensor:
    """k-means++ seeding then ``iters`` Lloyd iterations on ``x`` (N, D); assignments
    by :func:`vqkit.search.nearest_code` (no N x K matrix). A centre that loses all its
    points keeps its position. Returns float32 (k, D) centres."""
    if iters < 0:
        raise ValueError(f"iters must be >= 0; got {iters}")
    x = x.detach().to(torch.float32)
    centers = kmeans_plusplus(x, k, generator, max_scratch_bytes)
    for _ in range(iters):
        idx, _ = nearest_code(x, centers, max_scratch_bytes=max_scratch_bytes)
        counts, sums = assignment_stats(x, idx, k)
        centers = torch.where(
            (counts > 0).unsqueeze(1), sums / counts.clamp(min=1.0).unsqueeze(1), centers
        )
    return centers


@torch.no_grad()
def kmeans_init(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    *,
    group: dist.ProcessGroup | None = None,
    generator: torch.Generator | None = None,
    max_scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
) -> torch.Tensor:
    """:func:`kmeans` over the rows of ``x`` (N_r, D) of EVERY rank, identical on all.

    Under ``torch.distributed`` the rows are all-gathered (local sizes may differ),
    rank 0 of ``group`` runs k-means and broadcasts the (k, D) result, so every rank
    holds the same bits. Every rank must call this (collectives are unconditional);
    raises ValueError on every rank when the global batch is empty.
    """
    rows = all_gather_rows(x.detach().to(torch.float32), group)
    if rows.shape[0] == 0:
        raise ValueError("k-means initialisation needs at least one vector (the batch is empty)")
    if world_size(group) == 1:
        return kmeans(rows, k, iters, generator, max_scratch_bytes)
    if dist.get_rank(group) == 0:
        centers = kmeans(rows, k, iters, generator, max_scratch_bytes)
    else:
        centers = torch.empty(k, rows.shape[1], dtype=torch.float32, device=rows.device)
    return broadcast_(centers, group)


# -- dead-code revival ------------------------------------------------------------


@torch.no_grad()
def sample_replacements(
    flat: torch.Tensor,
    dead: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    sync: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New vectors for the ``dead`` codes (bool (K,)), drawn from the global batch.

    Each rank offers up to K random rows of its local ``flat`` (N_r, D); the offers
    (fixed size, (K, D + 1) with a validity column) are all-gathered, each dead code
    gets a distinct offered row (with repetition only if fewer than the dead count were
    offered), and rank 0's decision (mask and rows) is broadcast, so every rank
    returns the same bits. The draw is uniform over the offered rows, which is
    uniform over the global batch when the ranks' batches are equally large.

    Returns ``(mask, vectors)``: bool (K,), the codes to replace (rank 0's ``dead``;
    nothing when the global batch is empty), and float32 (K, D) replacement rows
    (meaningful where ``mask``). ``sync=False`` keeps everything local. Every rank
    must call this the same number of times, whatever its data.
    """
    k = dead.shape[0]
    d = flat.shape[1]
    flat = flat.detach().to(torch.float32)
    ws = world_size(group) if sync else 1
    n = flat.shape[0]
    m = min(k, n)
    offer = torch.zeros(k, d + 1, dtype=torch.float32, device=flat.device)
    if m > 0:
        pick = torch.randperm(n, generator=generator)[:m].to(flat.device)
        offer[:m, :d] = flat[pick]
        offer[:m, d] = 1.0
    if ws > 1:  # every rank's offer (k rows each), in rank order
        offer = all_gather_rows(offer, group)
    pool = offer[offer[:, d] > 0, :d]
    # Every rank computes the choice (same data, same RNG use), rank 0's is broadcast.
    decision = torch.zeros(k, d + 1, dtype=torch.float32, device=flat.device)
    want = dead.to(flat.device).bool()
    n_dead = int(want.sum())
    if n_dead and pool.shape[0]:
        if pool.shape[0] >= n_dead:
            choice = torch.randperm(pool.shape[0], generator=generator)[:n_dead]
        else:
            choice = torch.randint(pool.shape[0], (n_dead,), generator=generator)
        decision[want, :d] = pool[choice.to(flat.device)]
        decision[want, d] = 1.0
    if ws > 1:
        broadcast_(decision, group)
    return decision[:, d] > 0, decision[:, :d]


@torch.no_grad()
def reset_optimizer_rows(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor
) -> int:
    """Restart ``optimizer``'s state for some rows of ``param`` (e.g. revived codes).

    Every state tensor the optimizer keeps for ``param`` with ``param``'s shape (Adam's
    ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, SGD's ``momentum_buffer``,
    RMSprop's ``square_avg``, Adagrad's ``sum``, ...) is zeroed at ``rows`` (bool (K,)
    or int indices along dim 0): those rows continue as if their history were empty,
    so old momentum cannot drag a replaced row back to where it was. Scalar state
    (Adam's shared ``step``) is left alone, so Adam's bias correction treats the
    restarted rows as long-trained; their first steps are then somewhat larger than
    ``lr`` (up to ~6x for the default betas) and settle within ~1/(1 - beta2) steps.
    Works with any ``torch.optim`` optimizer whose per-element state has the
    parameter's shape; returns the number of state tensors touched.
    """
    if rows.dtype == torch.bool and rows.shape != param.shape[:1]:
        raise ValueError(
            f"a bool row mask must have shape ({param.shape[0]},) for a parameter of shape "
            f"{tuple(param.shape)}; got {tuple(rows.shape)}"
        )
    state = optimizer.state.get(param)
    if not state:
        return 0
    if rows.dtype == torch.bool:
        rows = rows.nonzero().squeeze(1)
    touched = 0
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.index_fill_(0, rows.to(value.device), 0.0)
            touched += 1
    return touched
