"""GroupedVQ: per-group codebooks (or one shared), indices (..., G), decode inverse."""

from __future__ import annotations

import pytest
import torch

from vqkit import GroupedVQ, VectorQuantizer, VectorQuantizerEMA
from vqkit.quantizers import build_quantizer

from .reference import sq_distances


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_groups_match_independent_quantizers_on_slices(kind):
    torch.manual_seed(0)
    q = GroupedVQ(3, 20, 12, group_kind=kind).train()
    ref = [type(q.group(g))(20, 4) for g in range(3)]
    for g in range(3):
        ref[g].load_state_dict(q.group(g).state_dict())
    x = torch.randn(2, 12, 5, requires_grad=True)  # a sequence (B, D, T)
    out = q(x)
    assert out.indices.shape == (2, 5, 3) and q.codes_per_position == 3
    flat = x.detach().movedim(1, -1).reshape(-1, 12)
    for g in range(3):
        o = ref[g].train()(flat[:, 4 * g : 4 * g + 4])
        assert torch.equal(out.indices[..., g].reshape(-1), o.indices)
        assert torch.equal(out.counts[g], o.counts)
        torch.testing.assert_close(q.group(g).codebook, ref[g].codebook)  # same EMA update
    d = sum(
        sq_distances(flat[:, 4 * g : 4 * g + 4], q.group(g).codebook).min(1).values
        for g in range(3)
    )
    if kind == "vq":
        torch.testing.assert_close(out.distances.reshape(-1).double(), d, rtol=1e-4, atol=1e-5)
    ev = q.eval()(x)  # (an EMA update changed the codes after the training forward)
    assert torch.equal(q.decode(ev.indices), ev.quantized.detach())
    assert torch.equal(q.encode(x), ev.indices)
    (out.loss + out.quantized.sum()).backward()
    assert x.grad is not None


def test_shared_codebook_pools_groups_and_revives():
    torch.manual_seed(0)
    q = GroupedVQ(4, 16, 8, shared_groups=True, usage_decay=0.5).train()
    assert len(q.layers) == 1 and q.supports_revival and q.tracks_usage
    x = torch.randn(3, 8, 2, 2)
    out = q(x)
    assert out.counts.shape == (16,) and int(out.counts.sum()) == 3 * 4 * 4
    assert torch.equal(q.decode(out.indices), out.quantized)
    q.init_codebook_kmeans(x, iters=2)
    q(x * 0)  # every group vector at 0: one code used
    revived = q.revive_dead_codes(x, threshold=0.5)
    assert revived.shape == (16,) and revived.sum() > 0
    unshared = GroupedVQ(2, 8, 4)
    assert not unshared.supports_revival and unshared.code_usage() is None
    with pytest.raises(NotImplementedError):
        unshared.revive_dead_codes(torch.randn(5, 4))


def test_grouped_options_and_validation():
    q = build_quantizer("gvq", 16, groups=4, num_embeddings=32, group_kind="ema", decay=0.9)
    assert isinstance(q, GroupedVQ) and isinstance(q.group(0), VectorQuantizerEMA)
    assert q.group(0).decay == 0.9
    q = build_quantizer("gvq", 16, groups=2, shared_groups=True)
    assert q.shared and isinstance(q.group(1), VectorQuantizer)
    with pytest.raises(ValueError):
        build_quantizer("gvq", 16, groups=3)  # 3 does not divide 16
    with pytest.raises(ValueError):
        build_quantizer("gvq", 16, decay=0.5)  # decay applies to ema groups
    with pytest.raises(ValueError):
        GroupedVQ(2, 8, 4).decode(torch.zeros(2, 3, 3, dtype=torch.long))
    q = GroupedVQ(2, 8, 4).eval()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(torch.randn(2, 4, 3))
    assert explained.graph_break_count == 0, explained.break_reasons
