"""Tests of vqkit's codebook module."""

from __future__ import annotations

import pytest
import torch

from vqkit import VectorQuantizer
from vqkit.codebook import reset_optimizer_rows

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
