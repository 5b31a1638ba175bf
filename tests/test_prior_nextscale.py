"""vqkit.prior.nextscale: the block-causal mask, the ancestor-sum inputs against a float64
reference, the S-pass KV-cached sampling against a full recomputation and the
teacher-forced pass, guidance, the loss against a float64 cross-entropy, the refusal of
a single-scale tokenizer, the config round trip, and the other kinds on (L,) codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqkit.errors import UserError
from vqkit.prior import Prior, PriorConfig, PriorTrainConfig, PriorTrainer
from vqkit.prior import nextscale as ns
from vqkit.prior.codes import CodeData
from vqkit.prior.sampling import guide
from vqkit.quantizers import MultiScaleVQ, VectorQuantizer

pytestmark = pytest.mark.timeout(120)

V = 11
SCALES = [1, 2, 3, 5]
L = sum(s * s for s in SCALES)  # 39
STARTS = [0, 1, 5, 14, 39]


def tiny(kind: str = "next-scale", classes: int = 3, scales=SCALES, **kw) -> Prior:
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=16, dropout=0.0, vocab_size=V, class_dropout=0.1)
    cfg.update(kw)
    length = sum(s * s for s in scales)
    c = PriorConfig(kind=kind, code_shape=[length], scales=list(scales), num_classes=classes, **cfg)
    return Prior(c).double().eval()


def codes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, L), generator=torch.Generator().manual_seed(seed))


def test_scale_starts_and_layout_by_definition():
    assert ns.scale_starts(SCALES) == STARTS
    level, mask, anc = ns.layout(SCALES)
    want_level = torch.tensor([k for k, s in enumerate(SCALES) for _ in range(s * s)])
    assert torch.equal(level, want_level)
    for p in range(L):
        for q in range(L):
            assert bool(mask[p, q]) == (want_level[q] <= want_level[p])
    # one worked case: scale 3 (5 x 5), row 4, column 2 -> scale 2 (3 x 3): (12 // 5,
    # 6 // 5) = (2, 1) -> 5 + 2 * 3 + 1; scale 1 (2 x 2): (8 // 5, 4 // 5) = (1, 0) -> 1 + 2
    p = STARTS[3] + 4 * 5 + 2
    assert anc[:, p].tolist() == [0, 3, 12, L]
    assert bool((anc[:, : STARTS[1]] == L).all())  # scale 0 has no ancestor


def test_block_causal_mask_in_the_logits():
    """Changing scale k's codes leaves the logits of scales <= k unchanged (they depend on
    coarser scales only) and changes some of the finer scales' logits."""
    m = tiny()
    x, y = codes(3), torch.tensor([0, 2, 3])
    base = m(x, y)
    g = torch.Generator().manual_seed(5)
    for k in range(len(SCALES) - 1):
        lo, hi = STARTS[k], STARTS[k + 1]
        x2 = x.clone()
        x2[:, lo:] = (x2[:, lo:] + torch.randint(1, V, x2[:, lo:].shape, generator=g)) % V
        out = m(x2, y)
        torch.testing.assert_close(out[:, :hi], base[:, :hi], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, hi:], base[:, hi:])  # the test can fail
    # the label reaches every scale
    assert not torch.allclose(m(x, torch.tensor([1, 2, 3]))[:, -1], base[:, -1])


def test_inputs_equal_a_float64_reference_of_the_ancestor_sum():
    """Scale 0: cls_emb(y); scale k: the sum over t < k of the nearest-neighbour
    upsampling of scale t's embedded map to s_k x s_k (F.interpolate, float64)."""
    m = tiny()
    x, y = codes(2, seed=7), torch.tensor([1, 3])
    emb, cls = m.tok_emb.weight.double(), m.cls_emb.weight.double()
    maps = [
        emb[x[:, STARTS[k] : STARTS[k + 1]]].reshape(2, s, s, -1).permute(0, 3, 1, 2)
        for k, s in enumerate(SCALES)
    ]  # (B, C, s, s)
    want = [cls[y][:, None].expand(2, SCALES[0] ** 2, -1)]
    for k, s in enumerate(SCALES[1:], start=1):
        acc = sum(F.interpolate(maps[t], size=(s, s), mode="nearest") for t in range(k))
        want.append(acc.flatten(2).transpose(1, 2))
    want = torch.cat(want, dim=1)
    got = ns.inputs(m, x, y, 0, L)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # a slice is the same rows (what a sampling pass feeds)
    torch.testing.assert_close(ns.inputs(m, x, y, 5, 14), want[:, 5:14], rtol=0, atol=1e-12)


def test_loss_equals_a_float64_cross_entropy_and_log_prob_its_sum():
    m = tiny()
    x, y = codes(4), torch.tensor([0, 1, 2, 3])
    lg = m(x, y).double()
    ref = -(lg.gather(-1, x[..., None]).squeeze(-1) - torch.logsumexp(lg, -1))  # (B, L)
    torch.testing.assert_close(m.loss(x, y), ref.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.log_prob(x, y), -ref.sum(1), rtol=1e-12, atol=1e-12)
    assert m(x, y).shape == (4, L, V)


@pytest.mark.parametrize("classes, labels, cfg", [(0, None, 1.0), (3, [0, 2, 1], 1.0),
                                                  (3, [0, 2, 1], 2.5)])  # fmt: skip
def test_cached_sampling_equals_full_recomputation(classes, labels, cfg):
    m = tiny(classes=classes)
    out = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(11)
        out.append(m.sample(3, labels=labels, generator=g, cfg_scale=cfg, use_cache=use_cache,
                            top_k=6, temperature=0.9))  # fmt: skip
    assert out[0].shape == (3, L) and out[0].dtype == torch.long
    assert torch.equal(out[0], out[1])
    g = torch.Generator().manual_seed(12)  # another seed, other codes: the test can fail
    assert not torch.equal(m.sample(3, labels=labels, generator=g, cfg_scale=cfg), out[0])


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_pass_gives_the_teacher_forced_logits(use_cache):
    m = tiny()
    x, y = codes(2, seed=3), torch.tensor([2, 3])
    seen = {}

    def choose(k, logits):
        seen[k] = logits
        return x[:, STARTS[k] : STARTS[k + 1]]

    got = ns.passes(m, torch.zeros_like(x), y, choose, use_cache=use_cache)
    assert torch.equal(got, x) and sorted(seen) == [0, 1, 2, 3]
    full = m(x, y)
    for k, logits in seen.items():
        torch.testing.assert_close(logits, full[:, STARTS[k] : STARTS[k + 1]], rtol=0, atol=1e-10)
    # kept scales: the passes start at scale 2, with the cache filled by scales 0, 1 at once
    seen.clear()
    got = ns.passes(m, x, y, choose, keep_scales=2, use_cache=use_cache)
    assert torch.equal(got, x) and sorted(seen) == [2, 3]
    torch.testing.assert_close(seen[2], full[:, 5:14], rtol=0, atol=1e-10)


def test_guidance_combines_the_cond_and_uncond_logits(monkeypatch):
    m = tiny()
    g = torch.Generator().manual_seed(2)
    plain = m.sample(2, labels=[1, 2], generator=g)
    g = torch.Generator().manual_seed(2)
    assert torch.equal(m.sample(2, labels=[1, 2], generator=g, cfg_scale=1.0), plain)
    drawn = []
    real = ns.draw
    monkeypatch.setattr(ns, "draw", lambda lg, *a: drawn.append(lg) or real(lg, *a))
    y = torch.tensor([1, 2])
    out = m.sample(2, labels=y, generator=torch.Generator().manual_seed(2), cfg_scale=3.0)
    want = guide(m(out, y), m(out, torch.full_like(y, m.null_class)), 3.0)
    for k, lg in enumerate(drawn):
        n = SCALES[k] ** 2
        torch.testing.assert_close(lg, want[:, STARTS[k] : STARTS[k + 1]].reshape(2 * n, V))
    assert len(drawn) == len(SCALES)


def test_keep_scales_keeps_the_coarse_codes_and_redraws_the_rest():
    m = tiny()
    x = codes(4, seed=9)
    out = m.sample(4, codes=x, keep_scales=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :5], x[:, :5]) and not torch.equal(out[:, 5:], x[:, 5:])
    for bad in (-1, 4, True):
        with pytest.raises(UserError, match="keep_scales must be an int in"):
            m.sample(4, codes=x, keep_scales=bad)
    with pytest.raises(UserError, match="needs the codes"):
        m.sample(4, keep_scales=1)


def test_one_code_at_a_time_is_refused():
    m = tiny()
    with pytest.raises(ValueError, match="this prior is next-scale"):
        m.extend(codes(1)[:, :3], None)


def test_the_scales_come_from_the_quantizer_contract():
    assert MultiScaleVQ(16, 4, scales=[1, 2, 4]).code_group_shapes((4, 4)) == [(1, 1), (2, 2),
                                                                               (4, 4)]  # fmt: skip
    assert VectorQuantizer(16, 4).code_group_shapes((4, 4)) is None


def test_single_scale_codes_are_refused_in_one_line(tmp_path):
    """The trainer fills code_shape from the codes: a next-scale prior on (h, w) maps
    stops there with the one line that says why."""
    x = torch.randint(0, V, (20, 3, 3))
    split = CodeData(x, torch.zeros(20, dtype=torch.long))
    cfg = PriorConfig(kind="next-scale", n_layer=1, n_head=2, n_embd=16, vocab_size=V)
    tcfg = PriorTrainConfig(steps=1, batch_size=4, progress=False)
    with pytest.raises(UserError) as e:
        PriorTrainer(cfg, tcfg, tmp_path / "run", split, split)
    assert "multi-scale" in str(e.value) and "\n" not in str(e.value)


def test_config_round_trip_keeps_the_scales(tmp_path):
    m = tiny()
    assert PriorConfig.from_dict(m.config.to_dict()).scales == SCALES
    m.save_pretrained(tmp_path)
    loaded = Prior.from_pretrained(tmp_path).double().eval()
    assert loaded.config.to_dict() == m.config.to_dict() and loaded.config.scales == SCALES
    x, y = codes(2), torch.tensor([0, 1])
    torch.testing.assert_close(loaded.log_prob(x, y), m.log_prob(x, y), rtol=0, atol=0)


def test_the_trainer_trains_and_evaluates_a_next_scale_prior(tmp_path):
    x = codes(60, seed=4)
    x[:, 5:] = x[:, 1:2]  # the finer scales copy a coarse code: learnable
    split = CodeData(x, torch.zeros(60, dtype=torch.long))
    cfg = PriorConfig(kind="next-scale", n_layer=1, n_head=2, n_embd=16, vocab_size=V,
                      scales=SCALES)  # fmt: skip
    tcfg = PriorTrainConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=30,
                            eval_sequences=0, progress=False)  # fmt: skip
    result = PriorTrainer(cfg, tcfg, tmp_path / "run", split, split).fit()
    first = torch.log2(torch.tensor(float(V)))  # an untrained prior: about log2 V bits
    assert result["test_bits"] < float(first) - 0.5


@pytest.mark.parametrize("kind", ["autoregressive", "masked"])
def test_the_other_kinds_take_multiscale_sequences(kind):
    m = tiny(kind=kind)
    x = codes(2)
    out = m.sample(2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, L) and int(out.max()) < V
    if kind == "autoregressive":
        assert m.log_prob(x).shape == (2,) and torch.isfinite(m.loss(x))
    else:
        hidden = torch.zeros(2, L, dtype=torch.bool)
        hidden[:, 5:] = True
        assert m.fill(x, hidden).shape == (2, L, V)
        edit = m.sample(2, codes=x, hidden=hidden, generator=torch.Generator().manual_seed(0))
        assert torch.equal(edit[:, :5], x[:, :5])
