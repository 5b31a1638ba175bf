"""Tests of vqkit's ema module."""

import pytest
import torch

from vqkit import VectorQuantizerEMA

from .reference import ema_reference, flat_channels_first


def _spread_codebook(vq, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(vq.codebook.shape, generator=g) * scale)
    if isinstance(vq, VectorQuantizerEMA):
        vq.reset_statistics()


def test_ema_state_is_buffers_not_parameters():
    vq = VectorQuantizerEMA(16, 4)
    assert list(vq.parameters()) == []
    names = dict(vq.named_buffers())
    assert set(names) == {
        "codebook",
        "cluster_size",
        "embed_sum",
        "num_updates",
    }
    # the same tensor objects survive training steps (no re-created parameters)
    ids = {n: id(b) for n, b in vq.named_buffers()}
    vq.train()
    vq(torch.randn(2, 4, 3, 3))
    assert ids == {n: id(b) for n, b in vq.named_buffers()}


@pytest.mark.parametrize("debias", [False, True])
def test_ema_matches_reference_over_several_steps(debias):
    torch.manual_seed(0)
    k, d, decay, eps = 12, 3, 0.9, 1e-5
    vq = VectorQuantizerEMA(k, d, decay=decay, epsilon=eps, zero_debias=debias)
    _spread_codebook(vq, seed=3)
    e0 = vq.codebook.clone()
    batches = [torch.randn(2, d, 4, 4) + 0.3 * t for t in range(6)]
    vq.train()
    for x in batches:
        before = vq.codebook.clone()
        out = vq(x)
        # the output uses the pre-update codebook
        torch.testing.assert_close(
            vq.decode(out.indices) * 0 + before[out.indices].movedim(-1, 1), out.quantized
        )
    e, n_ema, m_ema = ema_reference(
        e0, [flat_channels_first(x) for x in batches], decay, eps, debias, k
    )
    torch.testing.assert_close(vq.codebook.double(), e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vq.cluster_size.double(), n_ema, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.embed_sum.double(), m_ema, rtol=1e-5, atol=1e-5)
    assert int(vq.num_updates) == 6


def test_ema_loss_is_commitment_only():
    vq = VectorQuantizerEMA(8, 4, commitment_cost=0.7)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(x)
    flat = flat_channels_first(x.detach())
    q = vq.decode(out.indices)  # after the update: recompute from the pre-update codes instead
    assert set(out.losses) == {"commitment"}
    torch.testing.assert_close(out.loss, 0.7 * out.losses["commitment"])
    qf = flat_channels_first(out.quantized.detach())
    torch.testing.assert_close(out.losses["commitment"], ((qf - flat) ** 2).mean())
    out.loss.backward()
    assert x.grad is not None
    del q


def test_zero_debias_effect_at_step_one():
    """After one update, debiased statistics equal the batch's exactly: each used code
    becomes the mean of its vectors. Without debiasing the code moves only part way."""
    k, d = 4, 2
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [9.0, 11.0], [11.0, 9.0]])
    xin = x.t().reshape(1, d, 5)  # (B=1, D, L=5)
    for debias in (True, False):
        vq = VectorQuantizerEMA(k, d, decay=0.99, zero_debias=debias)
        with torch.no_grad():
            vq.codebook.copy_(codebook)
        vq.reset_statistics()
        vq.train()(xin)
        mean0 = x[:3].mean(0)
        mean1 = x[3:].mean(0)
        if debias:
            # Laplace smoothing shifts sizes by ~eps only
            torch.testing.assert_close(vq.codebook[0], mean0, atol=1e-4, rtol=0)
            torch.testing.assert_close(vq.codebook[1], mean1, atol=1e-4, rtol=0)
            torch.testing.assert_close(vq.codebook[2], torch.zeros(2), atol=1e-4, rtol=0)
        else:
            # N = 0.99 + 0.01 n, m = 0.99 e + 0.01 s  (n, s: batch count and sum)
            exp1 = (0.99 * codebook[1] + 0.01 * x[3:].sum(0)) / (0.99 + 0.01 * 2)
            torch.testing.assert_close(vq.codebook[1], exp1, atol=1e-3, rtol=0)
            # unused codes stay where they were
            torch.testing.assert_close(vq.codebook[2], codebook[2], atol=1e-3, rtol=0)


def test_ema_eval_never_changes_codebook():
    vq = VectorQuantizerEMA(16, 4)
    vq.eval()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(3):
        vq(torch.randn(3, 4, 5, 5))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_ema_decay_one_freezes_codebook():
    vq = VectorQuantizerEMA(16, 4, decay=1.0)
    before = vq.codebook.clone()
    vq.train()(torch.randn(3, 4, 5, 5))
    torch.testing.assert_close(vq.codebook, before)


@pytest.mark.parametrize(
    "options",
    [
        dict(use_cosine=True),
        dict(codebook_dim=3),
        dict(gradient="rotation"),
        dict(use_cosine=True, codebook_dim=3, gradient="rotation"),
    ],
)
def test_ema_options(options):
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(12, 6, **options)
    vq.train()
    x = torch.randn(3, 6, 4, 4, requires_grad=True)
    out = vq(x)
    (out.loss + out.quantized.sum()).backward()
    assert x.grad is not None
    vq.eval()
    out = vq(x)
    torch.testing.assert_close(vq.decode(out.indices), out.quantized.detach())
