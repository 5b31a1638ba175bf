"""The prior's transformer: causality, KV cache = full recomputation, log-likelihood,
code flattening, class dropout, weight tying, config round trip, input errors."""

from __future__ import annotations

import json

import pytest
import torch

from vqkit.prior import KVCache, Prior, PriorConfig, flatten_codes, unflatten_codes

pytestmark = pytest.mark.timeout(60)

V = 11


def tiny(pos: str = "learned", code_shape=(3, 4), classes: int = 3, **kw) -> Prior:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=16, dropout=0.0, pos=pos, vocab_size=V)
    cfg.update(kw)
    c = PriorConfig(code_shape=list(code_shape), num_classes=classes, **cfg)
    return Prior(c).double().eval()


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_causal_mask(pos):
    """Logits at position t (the distribution of c_t) depend on c_<t only: changing
    c_t .. c_{T-1} leaves logits 0..t unchanged (and does change later ones)."""
    m = tiny(pos)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (2, 12), generator=g)
    y = torch.tensor([0, 2])
    base = m(x, y)
    for t in (0, 4, 10):
        x2 = x.clone()
        x2[:, t:] = (x2[:, t:] + 1 + torch.randint(0, V - 1, x2[:, t:].shape, generator=g)) % V
        out = m(x2, y)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # the test can fail


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("classes", [0, 3])
def test_kv_cache_equals_full_recomputation(pos, classes):
    """Prefill a chunk, then one code at a time, then a chunk after a past (explicit mask
    path): the cached logits equal one full forward pass, in float64."""
    m = tiny(pos, code_shape=(2, 3, 2), classes=classes)  # residual-like (h, w, Q): T = 12
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (3, 12), generator=g)
    y = torch.tensor([0, 1, 2]) if classes else None
    full = m(x, y)
    cache = m.new_cache(3)
    parts = [m.extend(x[:, :3], cache, y)]  # [y, c0..c2] -> logits of c0..c3
    for t in range(3, 7):
        parts.append(m.extend(x[:, t : t + 1], cache))
    parts.append(m.extend(x[:, 7:11], cache))  # a 4-code chunk after a past of 8
    inc = torch.cat(parts, dim=1)
    assert cache.length == 12 and inc.shape == full.shape == (3, 12, V)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exceed"):
        m.extend(x[:, 11:12], cache)


def test_cache_is_batched_and_preallocated():
    c = KVCache(2, 5, 4, 10, 8)
    assert c.k.shape == (2, 5, 4, 10, 8) and c.length == 0
    k = torch.ones(5, 4, 3, 8)
    ka, va = c.update(0, k, 2 * k)
    assert ka.shape == (5, 4, 3, 8) and torch.equal(va, 2 * k)
    with pytest.raises(ValueError, match="full"):
        c.update(1, torch.ones(5, 4, 11, 8), torch.ones(5, 4, 11, 8))


def test_log_prob_is_the_sum_of_next_code_log_probabilities():
    m = tiny("rope")
    x = torch.randint(0, V, (4, 3, 4))
    y = torch.tensor([0, 1, 2, 0])
    lp = m.log_prob(x, y)
    seq = x.reshape(4, 12)
    logits = m(seq, y)
    ref = torch.zeros(4, dtype=torch.float64)
    for t in range(12):  # written out, position by position
        ref += torch.log_softmax(logits[:, t], -1)[torch.arange(4), seq[:, t]]
    torch.testing.assert_close(lp, ref)
    torch.testing.assert_close(m.log_prob(seq, y), lp)  # sequences (B, T) pass through
    assert torch.isclose(m.loss(x, y), -lp.mean() / 12)
    # the probabilities of all V^T sequences cannot be listed, but each factor sums to 1
    assert torch.allclose(torch.softmax(logits, -1).sum(-1), torch.ones(4, 12).double())


def test_flatten_codes_raster_then_stage_order():
    x = torch.arange(2 * 2 * 3 * 2).reshape(2, 2, 3, 2)  # (B, h, w, Q)
    seq = flatten_codes(x, (2, 3, 2))
    # position (0, 0) stages 0, 1; position (0, 1) stages 0, 1; ...
    assert seq[0].tolist() == [x[0, i, j, q].item() for i in range(2) for j in range(3)
                               for q in range(2)]  # fmt: skip
    assert torch.equal(unflatten_codes(seq, (2, 3, 2)), x)
    with pytest.raises(ValueError, match=r"\(B, 2, 3, 2\)"):
        flatten_codes(torch.zeros(2, 3, 2, dtype=torch.long), (2, 3, 2))


def test_class_dropout_and_null_class():
    m = tiny(classes=3, class_dropout=1.0)
    x = torch.randint(0, V, (4, 12))
    y = torch.tensor([0, 1, 2, 1])
    uncond = m(x, None)  # eval: labels as given; None is the null class
    assert torch.equal(uncond, m(x, torch.full((4,), m.null_class)))
    assert not torch.allclose(m(x, y), uncond)
    m.train()  # class_dropout = 1: every label dropped to the null class
    torch.testing.assert_close(m(x, y), uncond)
    m0 = tiny(classes=3, class_dropout=0.0).train()
    assert not torch.allclose(m0(x, y), m0(x, None))


def test_weight_tying_and_state_dict_round_trip():
    m = tiny()
    assert m.head.weight is m.tok_emb.weight
    untied = tiny(tie_weights=False)
    assert untied.head.weight is not untied.tok_emb.weight
    assert m.num_params() < untied.num_params()
    m2 = Prior(PriorConfig.from_dict(json.loads(json.dumps(m.config.to_dict())))).double()
    m2.load_state_dict(m.state_dict())
    m2.eval()
    x = torch.randint(0, V, (2, 12))
    assert torch.equal(m2(x), m(x))
    assert m2.head.weight is m2.tok_emb.weight
    rope = tiny("rope")
    assert not any("rope" in k for k in rope.state_dict())  # derived from the config


def test_config_checks():
    assert PriorConfig.from_dict(PriorConfig().to_dict()) == PriorConfig()
    with pytest.raises(ValueError, match="multiple of n_head"):
        PriorConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pos must be one of"):
        PriorConfig(pos="alibi")
    with pytest.raises(ValueError, match="class_dropout must be in"):
        PriorConfig(class_dropout=1.5)
    with pytest.raises(ValueError, match="code_shape"):
        PriorConfig(code_shape=[4, 4, 4, 4])
    with pytest.raises(ValueError, match="unknown options"):
        PriorConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="vocab_size and code_shape"):
        Prior(PriorConfig())


def test_input_errors():
    m = tiny(classes=3)
    with pytest.raises(ValueError, match="class ids"):
        m(torch.zeros(1, 12, dtype=torch.long), torch.tensor([4]))
    with pytest.raises(ValueError, match="exceed"):
        m.extend(torch.zeros(1, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 2 labels"):
        m(torch.zeros(2, 12, dtype=torch.long), torch.tensor([1]))
