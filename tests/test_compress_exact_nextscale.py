"""vqkit.compress.exact_nextscale: the next-scale prior's integer twin (format model 2)
against a float64 copy of the float next-scale prior (logits, bits), its inputs against
an independent nearest-neighbour upsampling of the integer embeddings, its invariances
(one teacher-forced pass = scale by scale with the KV cache = chunks of scales, a map
alone = in a batch, two threads: the same integers bit for bit), its digest (not model
1's), and the priors and calls it refuses.

Measured on the configurations below (8 maps sampled from the prior, random classes):
the twin's logits differ from the float64 prior's by at most 0.0061 nats after each
row's maximum is subtracted (bound: 0.02, model 1's); its ideal bits differ from the
float64 NLL by at most 1.1e-5 of it (bound: 1e-3); the NLL is 0.2 to 0.7 of the uniform
code's bits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqkit.compress.exact import ExactPrior
from vqkit.compress.exact_nextscale import ExactNextScale, exact_twin
from vqkit.errors import UserError
from vqkit.prior import Prior, PriorConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

LOGIT_NATS = 0.02
BITS_REL = 1e-3


def small_nextscale(
    *,
    scales: tuple[int, ...] = (1, 2, 3, 5),
    n_layer: int = 1,
    n_embd: int = 32,
    n_head: int = 2,
    classes: int = 3,
    vocab: int = 32,
    tie: bool = True,
    kind: str = "next-scale",
    seed: int = 0,
) -> Prior:
    """A seeded untrained next-scale prior (eval mode), token embeddings scaled by 6 and
    the attention by 2 (projection by 5), so that its distributions are peaked, varied
    and depend on the coarser scales, as a trained prior's do."""
    torch.manual_seed(seed)
    length = sum(s * s for s in scales)
    cfg = PriorConfig(
        kind=kind, n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
        code_shape=[length], scales=list(scales), num_classes=classes, dropout=0.0,
        tie_weights=tie,
    )  # fmt: skip
    model = Prior(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(6.0)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(2.0)
            block.attn.proj.weight.mul_(5.0)
        if not tie:
            model.head.weight.mul_(15.0)
    return model


CONFIGS = {
    "1x32-classes": {},
    "2x64-uncond": {"n_layer": 2, "n_embd": 64, "n_head": 4, "classes": 0},
    "1x48-untied-7scales": {
        "n_embd": 48,
        "tie": False,
        "vocab": 40,
        "scales": (1, 2, 3, 4, 5, 6, 8),
    },
}


def sample(prior: Prior, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = prior.sample(n, generator=g).reshape(n, -1)
    return seq, torch.randint(0, prior.null_class + 1, (n,), generator=g)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, one_thread_module):
    prior = small_nextscale(**CONFIGS[request.param])
    return prior, ExactNextScale(prior)


def test_logits_and_bits_match_a_float64_next_scale_prior(pair):
    prior, ex = pair
    seq, labels = sample(prior, 8, seed=1)
    y = ex.logits(seq, labels)
    assert y.dtype == torch.int64 and y.shape == (8, prior.seq_len, prior.config.vocab_size)
    ref = Prior(prior.config).double().eval()
    ref.load_state_dict(prior.state_dict())
    with torch.no_grad():
        want = ref(seq, labels)  # nextscale.logits: the float teacher-forced pass
    nats = y.double() / 4096 * math.log(2.0)
    diff = (nats - nats.amax(-1, keepdim=True)) - (want - want.amax(-1, keepdim=True))
    assert float(diff.abs().max()) <= LOGIT_NATS
    w = ExactPrior.frequencies(y)
    assert bool((w.sum(-1) == (1 << 24) - prior.config.vocab_size).all())
    bits = float((24 - torch.log2(w.gather(-1, seq[..., None]).double() + 1)).sum())
    nll = -float(torch.log_softmax(want, -1).gather(-1, seq[..., None]).sum()) / math.log(2.0)
    assert bits == pytest.approx(nll, rel=BITS_REL)
    assert nll < 0.8 * seq.numel() * math.log2(prior.config.vocab_size)  # far from uniform
    # the coarser scales matter: other scale-0 codes change the finer scales' logits
    other = seq.clone()
    other[:, 0] = (other[:, 0] + 1) % prior.config.vocab_size
    changed = ex.logits(other, labels)
    assert torch.equal(changed[:, :1], y[:, :1]) and not torch.equal(changed[:, 1:], y[:, 1:])


def test_inputs_are_the_integer_ancestor_sums(pair):
    """Scale 0: cls[y]; scale k: the sum over t < k of scale t's integer embedding map
    upsampled to s_k x s_k by nearest neighbour (F.interpolate, another implementation
    of the same index rule), plus pos[p] and lvl[k]; all integers."""
    prior, ex = pair
    seq, labels = sample(prior, 3, seed=2)
    got = ex.inputs(seq, labels, 0, prior.seq_len)
    scales, starts = ex.scales, ex.starts
    parts = [ex.cls[labels][:, None]]
    tok = ex.tok.double()
    maps = [
        tok[seq[:, starts[t] : starts[t + 1]]].reshape(3, s, s, -1).permute(0, 3, 1, 2)
        for t, s in enumerate(scales)
    ]
    for k in range(1, len(scales)):
        up = sum(F.interpolate(maps[t], size=(scales[k],) * 2, mode="nearest") for t in range(k))
        parts.append(up.permute(0, 2, 3, 1).reshape(3, scales[k] ** 2, -1).long())
    level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(scales)])
    want = torch.cat(parts, dim=1) + ex.pos + ex.lvl[level]
    assert torch.equal(got, want)
    # a window of positions is the same rows
    assert torch.equal(ex.inputs(seq, labels, starts[2], starts[3]), got[:, starts[2] : starts[3]])


def test_one_pass_equals_scale_by_scale_with_the_cache_and_chunks(pair):
    """The encoder's one teacher-forced pass, the decoder's S cached passes (each scale
    seeing the cache and itself) and other chunkings of whole scales give the same
    integers; so does a map alone or in a batch, and two threads."""
    prior, ex = pair
    seq, labels = sample(prior, 5, seed=3)
    full = ex.logits(seq, labels)
    starts = ex.starts
    cache = ex.new_cache(5)
    # the decoder's view: scale k computed from codes whose finer scales are unknown (0)
    known = torch.zeros_like(seq)
    steps = []
    for k in range(len(starts) - 1):
        steps.append(ex.logits_range(known, cache, labels, starts[k], starts[k + 1]))
        known[:, starts[k] : starts[k + 1]] = seq[:, starts[k] : starts[k + 1]]
    assert cache.length == prior.seq_len
    assert torch.equal(torch.cat(steps, dim=1), full)
    for cut in starts[1:-1]:
        cache = ex.new_cache(5)
        a = ex.logits_range(seq, cache, labels, 0, cut)
        b = ex.logits_range(seq, cache, labels, cut, prior.seq_len)
        assert torch.equal(torch.cat((a, b), dim=1), full), cut
    for i in (0, 4):
        assert torch.equal(ex.logits(seq[i : i + 1], labels[i : i + 1]), full[i : i + 1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(ex.logits(seq, labels), full)
    finally:
        torch.set_num_threads(before)


def test_digest_names_the_next_scale_twin():
    prior = small_nextscale()
    ex = ExactNextScale(prior)
    d = ex.digest()
    assert ExactNextScale(small_nextscale()).digest() == d and len(d) == 64
    assert ex.MODEL == 2 and "lvl" in ex.tensors()
    with torch.no_grad():
        prior.lvl_emb.weight[1, 3].add_(1e-3)
    assert ExactNextScale(prior).digest() != d  # the scale embedding reaches it
    # an autoregressive prior of the same weights (no scale embedding): model 1, another
    # digest
    ar = small_nextscale(kind="autoregressive")
    twin = exact_twin(ar)
    assert type(twin) is ExactPrior and twin.MODEL == 1 and twin.digest() != d
    assert type(exact_twin(small_nextscale())) is ExactNextScale


def test_refusals_are_one_line():
    ns, ar = small_nextscale(), small_nextscale(kind="autoregressive")
    with pytest.raises(
        UserError, match="model 1 takes autoregressive priors; this prior is next-sc"
    ):
        ExactPrior(ns)
    with pytest.raises(UserError, match="model 2 takes next-scale priors; this prior is autoregr"):
        ExactNextScale(ar)
    with pytest.raises(UserError, match="takes autoregressive priors; this prior is masked$") as e:
        exact_twin(small_nextscale(kind="masked"))
    assert "\n" not in str(e.value)
    ex = ExactNextScale(ns)
    seq, labels = sample(ns, 2, seed=4)
    with pytest.raises(ValueError, match="whole scales"):
        ex.logits_range(seq, ex.new_cache(2), labels, 0, 3)  # inside scale 1
    cache = ex.new_cache(2)
    ex.logits_range(seq, cache, labels, 0, 1)
    with pytest.raises(ValueError, match="after a cache of 1"):
        ex.logits_range(seq, cache, labels, 0, 5)
    with pytest.raises(ValueError, match="expected 39 codes"):
        ex.logits(seq[:, :30], labels)
    with pytest.raises(ValueError, match="logits_range"):
        ex.extend(seq, ex.new_cache(2), labels)
