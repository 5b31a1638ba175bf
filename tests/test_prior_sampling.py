"""Sampling from the prior: guidance formula, top-k / top-p against hand computations,
the draw's distribution, KV-cache decoding = recomputation, seeds, bad options."""

from __future__ import annotations

import math

import pytest
import torch

from vqkit.prior import Prior, PriorConfig, SampleOptions, filter_logits, guide, sample
from vqkit.prior.sampling import draw

pytestmark = pytest.mark.timeout(60)

NEG = float("-inf")
V = 9


def tiny(classes: int = 3, class_dropout: float = 0.1, pos: str = "learned") -> Prior:
    torch.manual_seed(0)
    c = PriorConfig(
        n_layer=2, n_head=2, n_embd=16, dropout=0.0, pos=pos, vocab_size=V,
        code_shape=[3, 3], num_classes=classes, class_dropout=class_dropout,
    )  # fmt: skip
    m = Prior(c).double().eval()
    with torch.no_grad():  # larger weights than the init: distinct, peaked distributions
        for p in m.parameters():
            p.mul_(20.0 if p.dim() >= 2 else 1.0)
    return m


def test_guide_formula():
    cond = torch.tensor([[1.0, 2.0, -1.0]])
    uncond = torch.tensor([[0.5, 0.0, 1.0]])
    assert torch.equal(guide(cond, uncond, 0.0), uncond)
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.equal(guide(cond, uncond, 3.0), torch.tensor([[2.0, 6.0, -5.0]]))


def test_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 2.0, 2.0, 1.0]])
    out = filter_logits(logits, top_k=2)
    assert out[0].tolist() == [NEG, 3.0, 2.0, NEG]
    assert out[1].tolist() == [NEG, 2.0, 2.0, NEG]
    assert filter_logits(logits, top_k=1)[1].tolist() == [NEG, 2.0, 2.0, NEG]  # ties stay
    assert torch.equal(filter_logits(logits, top_k=10), logits)  # k > V: all
    assert torch.equal(filter_logits(logits), logits)


def test_top_p_by_hand():
    # probabilities 0.05, 0.5, 0.15, 0.3 (shuffled so that the sort has to be undone)
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = p.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].tolist()

    assert kept(top_p=0.5) == [False, True, False, False]  # 0.5 reaches 0.5
    assert kept(top_p=0.6) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.6
    assert kept(top_p=0.81) == [False, True, True, True]  # 0.95 >= 0.81
    assert kept(top_p=0.96) == [True, True, True, True]
    assert kept(top_p=1e-6) == [False, True, False, False]  # the most likely always stays
    assert kept(top_p=1.0) == [True, True, True, True]
    # top-k first, then top-p on the renormalised rest: 0.5/0.95, 0.3/0.95 = 0.842 >= 0.8
    assert kept(top_k=3, top_p=0.8) == [False, True, False, True]
    assert kept(top_k=3, top_p=0.85) == [False, True, True, True]


def test_draw_follows_temperature_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    for temp in (0.5, 2.0):
        codes = draw(logits, SampleOptions(temperature=temp), g)
        freq = torch.bincount(codes, minlength=4).double() / len(codes)
        want = torch.softmax(logits[0].double() / temp, 0)
        assert (freq - want).abs().max() < 0.015, (temp, freq, want)
    codes = draw(logits, SampleOptions(top_k=2), g)
    assert set(codes.tolist()) == {1, 2}


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_cached_decoding_equals_recomputation(pos):
    m = tiny(pos=pos)
    kw = dict(labels=torch.tensor([0, 1, 2, 0, 1]), top_k=5, temperature=0.9, cfg_scale=2.5)
    a = sample(m, 5, generator=torch.Generator().manual_seed(3), **kw)
    b = sample(m, 5, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.shape == (5, 3, 3) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < V


def test_cfg_scale_zero_is_unconditional_and_one_is_conditional():
    m = tiny()
    y = torch.tensor([2, 2, 1, 0, 1, 2])

    def draw(**kw):
        return m.sample(6, generator=torch.Generator().manual_seed(5), **kw)

    uncond = draw(labels=None)
    assert torch.equal(draw(labels=y, cfg_scale=0.0), uncond)
    cond = draw(labels=y)
    assert torch.equal(draw(labels=y, cfg_scale=1.0), cond)
    assert not torch.equal(cond, uncond)  # the classes matter (peaked weights)
    assert not torch.equal(draw(labels=y, cfg_scale=3.0), cond)


def test_same_seed_same_samples_and_batching():
    m = tiny()
    a = m.sample(7, labels=1, generator=torch.Generator().manual_seed(9), batch_size=3)
    b = m.sample(7, labels=1, generator=torch.Generator().manual_seed(9), batch_size=3)
    c = m.sample(7, labels=1, generator=torch.Generator().manual_seed(10), batch_size=3)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (7, 3, 3)
    m.train()
    m.sample(2, labels=1)
    assert m.training  # sampling ran in eval mode and restored the mode


def test_greedy_limit_top_k_1_follows_the_argmax():
    m = tiny(classes=0)
    out = m.sample(2, top_k=1).reshape(2, -1)
    logits = m(out)  # teacher-forced on its own output
    assert torch.equal(logits.argmax(-1), out)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"labels": 3}, "class id 3 out of range"),
        ({"labels": -1}, "class id -1 out of range"),
        ({"cfg_scale": 2.0}, "needs class labels"),
    ],
)
def test_bad_options_are_one_line_value_errors(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        tiny().sample(2, **kw)
    assert "\n" not in str(e.value)


def test_guidance_needs_a_trained_null_class_and_classes():
    with pytest.raises(ValueError, match="class_dropout=0"):
        tiny(class_dropout=0.0).sample(2, labels=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        tiny(classes=0).sample(2, labels=0)
    assert math.isfinite(SampleOptions(cfg_scale=-1.0).cfg_scale)  # any finite scale


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperatures_are_the_greedy_limit(temperature):
    """A temperature that passes the > 0 check but overflowed logits / T (1e-40 and
    below): the draw is the argmax, not a NaN inside torch.multinomial."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    got = draw(logits, SampleOptions(temperature=temperature), g)
    assert torch.equal(got, logits.argmax(-1))
    m = tiny(classes=0)
    out = m.sample(2, temperature=temperature).reshape(2, -1)
    assert torch.equal(m(out).argmax(-1), out)
