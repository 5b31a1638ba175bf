"""Sequences (B, D, T) with a padding mask (True = padded), for every quantizer: a masked
forward equals a forward on the kept positions alone (losses, gradients, counts, usage
statistics, EMA updates, entropy terms), and padding changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from vqkit import BSQ, FSQ, IBQ, LFQ, GroupedVQ, ResidualVQ, SimVQ, VectorQuantizer
from vqkit import VectorQuantizerEMA as EMA

D = 8


def kinds():
    torch.manual_seed(0)
    return {
        "vq": VectorQuantizer(16, D, usage_decay=0.9),
        "ema": EMA(16, D, decay=0.8),
        "rvq": ResidualVQ(2, 16, D, stage="vq"),
        "rvq-ema": ResidualVQ(2, 16, D, stage="ema"),
        "fsq": FSQ([4, 3, 3], dim=D),
        "lfq": LFQ(5, D),
        "bsq": BSQ(5, D, entropy_group_size=2),
        "simvq": SimVQ(16, D),
        "ibq": IBQ(16, D),
        "gvq": GroupedVQ(2, 16, D),
        "gvq-ema-shared": GroupedVQ(2, 16, D, group_kind="ema", shared_groups=True),
    }


def sequences():
    """(x (B, D, T), mask (B, T)): lengths 7, 3 and 5 of T = 7."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, D, 7, generator=g)
    lengths = torch.tensor([7, 3, 5])
    mask = torch.arange(7)[None, :] >= lengths[:, None]
    return x, mask


def state(q):
    return {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("name", list(kinds()))
def test_masked_forward_equals_forward_on_kept_positions(name):
    q = kinds()[name].train()
    ref = copy.deepcopy(q)
    x, mask = sequences()
    xa = x.clone().requires_grad_(True)
    out = q(xa, mask=mask)
    kept = x.movedim(1, -1)[~mask]  # (n_kept, D), flat rows: the (B, C) layout
    xb = kept.clone().requires_grad_(True)
    want = ref(xb)
    assert out.indices.shape[:2] == (3, 7)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert out.losses.keys() == want.losses.keys()
    for k in want.losses:
        torch.testing.assert_close(out.losses[k], want.losses[k], rtol=1e-5, atol=1e-6, msg=k)
    if want.counts is not None:
        assert torch.equal(out.counts, want.counts)
    torch.testing.assert_close(out.perplexity, want.perplexity)
    assert torch.equal(out.indices[~mask], want.indices)  # kept positions quantized alike
    # the same statistics / EMA updates / usage
    sa, sb = state(q), state(ref)
    for k in sb:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    if want.loss.requires_grad:
        out.loss.backward()
        want.loss.backward()
        g = xa.grad.movedim(1, -1)
        assert torch.all(g[mask] == 0)  # padded positions: no gradient from the loss
        torch.testing.assert_close(g[~mask], xb.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["vq", "ema", "lfq", "ibq"])
def test_all_padded_is_an_empty_batch(name):
    q = kinds()[name].train()
    before = state(q)
    x, _ = sequences()
    out = q(x, mask=torch.ones(3, 7, dtype=torch.bool))
    assert float(out.loss.detach()) == 0.0 and int(out.counts.sum()) == 0
    after = state(q)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_no_mask_is_the_unmasked_path_and_mask_validation():
    x, mask = sequences()
    for name, q in kinds().items():
        q.eval()
        a, b = q(x), q(x, mask=torch.zeros_like(mask))
        assert torch.equal(a.indices, b.indices), name
        torch.testing.assert_close(a.loss, b.loss, msg=name)
        with pytest.raises(ValueError):
            q(x, mask=mask[:, :5])
        with pytest.raises(TypeError):
            q(x, mask=mask.long())


def test_masked_revival_and_init_use_kept_positions_only():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, usage_decay=0.5)
    x = torch.zeros(1, 2, 6)
    x[0, :, :3] = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    x[0, :, 3:] = 100.0  # padding garbage
    mask = torch.tensor([[False, False, False, True, True, True]])
    q.init_codebook_kmeans(x, iters=2, mask=mask)
    assert q.codebook.abs().max() < 10.0
    q.train()(x, mask=mask)
    q.revive_dead_codes(x, threshold=10.0, mask=mask)
    assert q.codebook.abs().max() < 10.0


def test_masked_eval_forward_compiles_to_one_graph():
    x, mask = sequences()
    for name in ("vq", "lfq", "gvq"):
        q = kinds()[name].eval()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(q)(x, mask=mask)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
