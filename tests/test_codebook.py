"""Tests of vqkit's codebook module."""

from __future__ import annotations

import pytest
import torch

from vqkit import VectorQuantizer
from vqkit.codebook import kmeans_plusplus, reset_optimizer_rows

K, D = 16, 4


def clusters(k: int, n_per: int, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` well-separated clusters: (centres (k, d), shuffled points (k * n_per, d))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    centres = 8.0 * centres / centres.norm(dim=1, keepdim=True) + 3.0 * torch.arange(k)[:, None]
    pts = centres.repeat_interleave(n_per, 0) + 0.05 * torch.randn(k * n_per, d, generator=g)
    return centres, pts[torch.randperm(k * n_per, generator=g)]


def collapsed_vq(optimizer_cls=torch.optim.Adam, **opt):
    """A gradient codebook trained on clustered data from a collapsed start (every code
    at one point), so one code takes everything and the optimizer has momentum."""
    torch.manual_seed(0)
    _, pts = clusters(K, 20)
    q = VectorQuantizer(K, D, usage_decay=0.5).train()
    with torch.no_grad():
        q.codebook.fill_(50.0)  # far away: every point picks code 0 (ties: lowest)
    optim = optimizer_cls(q.parameters(), lr=0.05, **opt)
    for _ in range(5):
        out = q(pts)
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    return q, optim, pts


@pytest.mark.parametrize(
    "optimizer_cls, opt",
    [
        (torch.optim.Adam, {}),
        (torch.optim.SGD, {"momentum": 0.9}),
        (torch.optim.RMSprop, {"momentum": 0.9}),
    ],
)
def test_reset_optimizer_rows_stops_momentum_pulling_revived_codes_back(optimizer_cls, opt):
    q, optim, pts = collapsed_vq(optimizer_cls, **opt)
    # the dead codes received no gradient, but SGD momentum / Adam moments from the
    # shared start would still move them; give every row some history to make sure
    for state in optim.state[q.codebook].values():
        if isinstance(state, torch.Tensor) and state.shape == q.codebook.shape:
            state.add_(0.5)
    mask = q.revive_dead_codes(pts, threshold=1.0, generator=torch.Generator().manual_seed(0))
    assert int(mask.sum()) == K - 1
    revived = q.codebook.detach()[mask].clone()
    # revived codes are points of the batch
    assert (revived[:, None, :] == pts[None]).all(-1).any(1).all()
    touched = reset_optimizer_rows(optim, q.codebook, mask)
    assert touched >= 1
    # a step in which the revived rows get no gradient leaves them exactly in place
    optim.zero_grad()
    q.codebook.grad = torch.zeros_like(q.codebook)
    optim.step()
    assert torch.equal(q.codebook.detach()[mask], revived)
    # control: without the reset, the same step moves them (old momentum)
    q2, optim2, _ = collapsed_vq(optimizer_cls, **opt)
    for state in optim2.state[q2.codebook].values():
        if isinstance(state, torch.Tensor) and state.shape == q2.codebook.shape:
            state.add_(0.5)
    q2.revive_dead_codes(pts, threshold=1.0, generator=torch.Generator().manual_seed(0))
    optim2.zero_grad()
    q2.codebook.grad = torch.zeros_like(q2.codebook)
    optim2.step()
    assert not torch.equal(q2.codebook.detach()[mask], revived)


def test_reset_optimizer_rows_rejects_a_mask_of_the_wrong_length():
    q, optim, _ = collapsed_vq()
    with pytest.raises(ValueError, match="row mask"):
        reset_optimizer_rows(optim, q.codebook, torch.ones(K + 1, dtype=torch.bool))


def test_kmeans_plusplus_draws_in_proportion_to_float64_squared_distances():
    """Given the first centre, the second is drawn with probability d2 / sum(d2), with
    d2 the exact (float64) squared distances: compared over many seeds."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0])
    counts = torch.zeros(6, 6, dtype=torch.float64)
    for seed in range(6000):
        c = kmeans_plusplus(x, 2, torch.Generator().manual_seed(seed))
        first = int((x == c[0]).all(1).nonzero())
        second = int((x == c[1]).all(1).nonzero())
        counts[first, second] += 1
    x64 = x.double()
    d2 = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    expected = d2 / d2.sum(1, keepdim=True)
    seen = counts / counts.sum(1, keepdim=True)
    assert torch.all(counts.diagonal() == 0)  # a chosen point is never drawn again
    assert (seen - expected).abs().max() < 0.05, (seen - expected).abs().max()


def test_kmeans_plusplus_takes_every_distinct_point_before_repeating_one():
    _, pts = clusters(K, 1)
    centres = kmeans_plusplus(pts, K, torch.Generator().manual_seed(0))
    assert torch.equal(torch.sort(centres, 0).values, torch.sort(pts, 0).values)
    few = kmeans_plusplus(pts[:3], 8, torch.Generator().manual_seed(0))  # then uniform
    assert len({tuple(r.tolist()) for r in few}) == 3


def test_kmeans_plusplus_matches_the_direct_distance_update_on_clusters():
    """The matrix-vector distance update finds one seed per well-separated cluster,
    like the exact-difference form it replaced."""
    centres, pts = clusters(K, 30)
    seeds = kmeans_plusplus(pts, K, torch.Generator().manual_seed(0))
    owner = ((seeds[:, None].double() - centres[None].double()) ** 2).sum(-1).argmin(1)
    assert sorted(owner.tolist()) == list(range(K))


def test_kmeans_plusplus_in_rounds_draws_distinct_rows_weighted_by_distance(monkeypatch):
    """Above SEQUENTIAL_SEEDS centres the draws come in rounds: still distinct rows while
    distinct rows remain, then duplicates; the first round after the first centre
    favours far rows as the sequential draw does."""
    import vqkit.codebook as cb

    monkeypatch.setattr(cb, "SEQUENTIAL_SEEDS", 4)  # k = 16: rounds of 4
    _, pts = clusters(K, 3)
    centres = kmeans_plusplus(pts, K, torch.Generator().manual_seed(0))
    rows = {tuple(r.tolist()) for r in centres}
    assert len(rows) == K and rows <= {tuple(r.tolist()) for r in pts}
    few = kmeans_plusplus(pts[:5], K, torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in few}) == 5
    # two far points and many at the origin: after a first centre at the origin the
    # round of 4 must include both far points (they hold all the weight but ~0)
    x = torch.cat([torch.zeros(30, 2), torch.tensor([[100.0, 0.0], [0.0, 100.0]])])
    x[:30] += 1e-3 * torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    hits = 0
    for seed in range(20):
        c = kmeans_plusplus(x, 8, torch.Generator().manual_seed(seed))
        hits += int((c.abs().max(1).values > 50).sum() == 2)
    assert hits == 20


def test_kmeans_defaults_keep_small_codebooks_and_bound_the_work_of_large_ones():
    """16 vectors per code and 10 Lloyd iterations up to 4096 codes (the init of those
    runs is unchanged); above, the work N K (iterations + 1) grows about linearly in K
    to 32768 codes and stays within 10x the K = 4096 work at K = 65536."""
    from vqkit.codebook import kmeans_defaults

    for k in (1, 512, 1024, 4096):
        assert kmeans_defaults(k) == (16, 10)
    assert kmeans_defaults(16384) == (4, 3)
    assert kmeans_defaults(65536) == (2, 2)

    def work(k: int) -> int:
        per_code, iters = kmeans_defaults(k)
        return per_code * k * k * (iters + 1)

    for k in (8192, 16384, 32768):
        assert work(k) <= 1.5 * work(4096) * k / 4096
    assert work(65536) <= 10 * work(4096)
    assert all(min(kmeans_defaults(k)) >= 2 for k in (2**16, 2**18, 2**20))
