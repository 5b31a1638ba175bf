"""Independent float64 reference implementations used by the tests.

Written straight from the formulas (dense distances, one-hot matmuls), with no
code shared with the library.
"""

from __future__ import annotations

import torch


def sq_distances(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Dense (N, K) squared distances by broadcasting the difference, float64."""
    x = x.double()
    e = e.double()
    return ((x[:, None, :] - e[None, :, :]) ** 2).sum(-1)


def assert_nearest(x, e, idx, dist, rel_tie=1e-5):
    """Indices are nearest up to near-ties, and distances match in float64."""
    d = sq_distances(x, e)
    best, best_idx = d.min(1)
    chosen = d.gather(1, idx.long()[:, None]).squeeze(1)
    scale = best.abs().clamp(min=1.0)
    # a different index is acceptable only if its distance ties the best one
    flips = idx.long() != best_idx
    gap = (chosen - best) / scale
    assert torch.all(gap[flips] <= rel_tie), f"non-tie flips: max gap {gap.max().item()}"
    torch.testing.assert_close(dist.double(), best, rtol=1e-4, atol=1e-4 * float(scale.max()))


def perplexity(idx: torch.Tensor, k: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(idx.reshape(-1).long(), k).double()
    p = onehot.mean(0)
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return ent.exp()


def flat_channels_first(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    return x.permute(0, *range(2, x.dim()), 1).reshape(-1, d)


def ema_reference(codebook0, batches, decay, eps, debias, k):
    """Replays the EMA codebook recursion in float64 on a list of (N, D) batches,
    assigning each batch with the codebook *before* that batch's update.

    Returns the final (codebook, cluster_size, embed_sum) (raw, not debiased)."""
    e = codebook0.double().clone()
    d = e.shape[1]
    if debias:
        n_ema = torch.zeros(k, dtype=torch.float64)
        m_ema = torch.zeros(k, d, dtype=torch.float64)
    else:
        n_ema = torch.ones(k, dtype=torch.float64)
        m_ema = e.clone()
    for t, x in enumerate(batches, start=1):
        x = x.double()
        idx = sq_distances(x, e).argmin(1)
        onehot = torch.nn.functional.one_hot(idx, k).double()
        n_ema = decay * n_ema + (1 - decay) * onehot.sum(0)
        m_ema = decay * m_ema + (1 - decay) * onehot.t() @ x
        if debias:
            n_hat, m_hat = n_ema / (1 - decay**t), m_ema / (1 - decay**t)
        else:
            n_hat, m_hat = n_ema, m_ema
        total = n_hat.sum()
        smoothed = (n_hat + eps) / (total + k * eps) * total
        e = m_hat / smoothed[:, None]
    return e, n_ema, m_ema
