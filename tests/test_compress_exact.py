"""vqkit.compress.exact: the prior's integer twin against a float64 copy of the float
prior (logits, bits), its invariances (a KV cache or a full pass or chunks, a map alone
or in a batch, the thread count, the device: the same integers), its digest, and the
priors it refuses.

Measured on the configurations below (8 maps each, sampled from the prior, 3 seeds): the
twin's logits differ from the float64 prior's by at most 0.0061 nats after each row's
maximum is subtracted (bound: 0.02); the largest errors are at the class token's position,
whose untrained embedding (std 0.02) LayerNorm reads at the residual's fixed 2**-16
resolution, 0.0033 at most elsewhere. The twin's ideal bits ``sum -log2((w_s + 1) /
2**24)`` differ from the float64 NLL by at most 5.7e-5 of it (bound: 1e-3)."""

from __future__ import annotations

import math

import pytest
import torch

from vqkit.compress.exact import ExactPrior
from vqkit.errors import UserError
from vqkit.prior import Prior, PriorConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

LOGIT_NATS = 0.02  # measured at most 0.0061
BITS_REL = 1e-3  # measured at most 5.7e-5


def small_prior(
    *,
    pos: str = "learned",
    n_layer: int = 1,
    n_embd: int = 32,
    n_head: int = 2,
    classes: int = 10,
    vocab: int = 32,
    shape: tuple[int, ...] = (6, 6),
    tie: bool = True,
    attn: float = 1.0,
    seed: int = 0,
) -> Prior:
    """A seeded untrained autoregressive prior (eval mode) whose token embeddings are
    scaled by 6, so that its distributions are peaked and varied as a trained prior's
    are (about 0.3 to 3 bits per code of 5). ``attn`` scales the attention's weights
    (qkv by ``attn``, the output projection by ``2.5 attn``): at init the scores are
    near 0 and the attention a plain average, blind to the positions and their order."""
    torch.manual_seed(seed)
    cfg = PriorConfig(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, code_shape=list(shape),
        num_classes=classes, dropout=0.0, pos=pos, tie_weights=tie,
    )  # fmt: skip
    model = Prior(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(6.0)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(attn)
            block.attn.proj.weight.mul_(2.5 * attn)
        if not tie:  # the head alone: logits of std about 2 nats
            model.head.weight.mul_(15.0)
    return model


def float64_copy(prior: Prior) -> Prior:
    ref = Prior(prior.config).double().eval()
    ref.load_state_dict(prior.state_dict())
    return ref


def sample_maps(prior: Prior, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences (n, T), labels (n,)): maps drawn from the prior, random classes (the
    null class included)."""
    g = torch.Generator().manual_seed(seed)
    seq = prior.sample(n, generator=g).reshape(n, -1)
    labels = torch.randint(0, prior.null_class + 1, (n,), generator=g)
    return seq, labels


CONFIGS = {
    "learned-1x32-classes": {"attn": 2.0},
    "rope-2x64-uncond": {
        "pos": "rope",
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "classes": 0,
        "attn": 2.0,
    },  # fmt: skip
    "rope-1x48-untied": {"pos": "rope", "n_embd": 48, "classes": 3, "tie": False, "vocab": 40},
    "learned-2x64-uncond": {"n_layer": 2, "n_embd": 64, "n_head": 4, "classes": 0},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, one_thread_module):
    """(float prior, its twin) of each configuration."""
    prior = small_prior(**CONFIGS[request.param])
    return prior, ExactPrior.from_prior(prior)


def _full(ex: ExactPrior, seq: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forced: one extend of ``[y, c_0 .. c_{T-2}]`` -> (B, T, V)."""
    return ex.extend(seq[:, :-1], ex.new_cache(seq.shape[0]), labels)


def test_logits_and_bits_match_a_float64_prior(pair):
    prior, ex = pair
    seq, labels = sample_maps(prior, 8, seed=1)
    y = _full(ex, seq, labels)
    assert y.dtype == torch.int64 and y.shape == (8, prior.seq_len, prior.config.vocab_size)
    with torch.no_grad():
        ref = float64_copy(prior)(seq, labels)
    nats = y.double() / 4096 * math.log(2.0)  # log2 units, 12 fractional bits
    diff = (nats - nats.amax(-1, keepdim=True)) - (ref - ref.amax(-1, keepdim=True))
    assert float(diff.abs().max()) <= LOGIT_NATS
    # the coder's integer frequencies: the ideal bits of the coded symbols
    w = ExactPrior.frequencies(y)
    assert bool((w.sum(-1) == (1 << 24) - prior.config.vocab_size).all())
    bits = float((24 - torch.log2(w.gather(-1, seq[..., None]).double() + 1)).sum())
    nll = -float(torch.log_softmax(ref, -1).gather(-1, seq[..., None]).sum()) / math.log(2.0)
    assert bits == pytest.approx(nll, rel=BITS_REL)
    # the test can tell a wrong model apart: the codes are far from uniform
    assert nll < 0.8 * seq.numel() * math.log2(prior.config.vocab_size)


def test_incremental_full_and_chunked_passes_are_equal(pair):
    prior, ex = pair
    seq, labels = sample_maps(prior, 5, seed=2)
    t_len = prior.seq_len
    full = _full(ex, seq, labels)
    cache = ex.new_cache(5)
    steps = [ex.extend(seq[:, :0], cache, labels)]
    for t in range(t_len - 1):
        steps.append(ex.extend(seq[:, t : t + 1], cache))
    assert cache.length == t_len
    assert torch.equal(torch.cat(steps, dim=1), full)
    for cuts in ([4, 9, 10, 22], [1, 2, 30], [t_len - 2]):
        cache = ex.new_cache(5)
        parts = [ex.extend(seq[:, : cuts[0]], cache, labels)]  # [y, c_0 .. c_{a-1}]
        for a, b in zip(cuts, [*cuts[1:], t_len - 1], strict=True):
            parts.append(ex.extend(seq[:, a:b], cache))
        assert torch.equal(torch.cat(parts, dim=1), full), cuts


def test_a_map_alone_equals_the_same_map_in_a_batch(pair):
    prior, ex = pair
    seq, labels = sample_maps(prior, 6, seed=3)
    batch = _full(ex, seq, labels)
    for i in (0, 3, 5):
        assert torch.equal(_full(ex, seq[i : i + 1], labels[i : i + 1]), batch[i : i + 1])
    # incremental in a batch of 6 == full pass of one
    cache = ex.new_cache(6)
    steps = [ex.extend(seq[:, :0], cache, labels)]
    for t in range(5):
        steps.append(ex.extend(seq[:, t : t + 1], cache))
    assert torch.equal(torch.cat(steps, dim=1)[2], batch[2, :6])


def test_two_threads_give_the_same_integers(pair):
    prior, ex = pair
    seq, labels = sample_maps(prior, 6, seed=4)
    one = _full(ex, seq, labels)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = _full(ex, seq, labels)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_digest_is_a_function_of_the_integers_and_scales():
    prior = small_prior(pos="rope", n_layer=2, classes=3)
    ex = ExactPrior(prior)
    d = ex.digest()
    assert len(d) == 64 and int(d, 16) >= 0
    assert ExactPrior(prior).digest() == d  # stable
    assert ExactPrior(small_prior(pos="rope", n_layer=2, classes=3)).digest() == d  # rebuilt

    def digest_after(edit) -> tuple[str, dict[str, torch.Tensor]]:
        m = small_prior(pos="rope", n_layer=2, classes=3)
        with torch.no_grad():
            edit(m)
        twin = ExactPrior(m)
        return twin.digest(), twin.tensors()

    base = ex.tensors()
    # a change below the quantization step: the integers stay, and so does the digest
    # (the digest names what the twin computes, not the float weights)
    w = prior.blocks[0].mlp[0].weight
    q = base["blocks.0.fc1.w"]
    f = round(math.log2(float(q.abs().max()) / float(w.detach().abs().max())))  # its 2**f scale
    assert float(q.abs().max()) < 2**15  # 16-bit integers
    tiny = torch.nextafter(w[1, 2], torch.tensor(1.0))

    def tiny_edit(m):
        m.blocks[0].mlp[0].weight[1, 2] = tiny

    d_tiny, t_tiny = digest_after(tiny_edit)
    assert all(torch.equal(t_tiny[k], base[k]) for k in base)
    assert d_tiny == d
    # one ulp across a rounding boundary (a weight of 4.5 steps, rounded to even: 4,
    # and one ulp above it: 5) changes one integer, and the digest
    half = 4.5 * 2.0**-f

    def at_half(m):
        m.blocks[0].mlp[0].weight[1, 2] = half

    def above_half(m):
        m.blocks[0].mlp[0].weight[1, 2] = torch.nextafter(torch.tensor(half), torch.tensor(1.0))

    (d_a, t_a), (d_b, t_b) = digest_after(at_half), digest_after(above_half)
    # fc1's integers are stored (in, out) or (out, in): find the entry either way
    changed = (t_a["blocks.0.fc1.w"] != t_b["blocks.0.fc1.w"]).nonzero().tolist()
    assert len(changed) == 1, changed
    assert {
        int(t_a["blocks.0.fc1.w"][tuple(changed[0])]),
        int(t_b["blocks.0.fc1.w"][tuple(changed[0])]),
    } == {4, 5}
    assert d_a != d_b
    # every kind of weight reaches the digest (a change of 1e-3: many quantization steps)
    edits = {
        "token embedding / tied head": lambda m: m.tok_emb.weight[3, 1].add_(1e-3),
        "class embedding": lambda m: m.cls_emb.weight[1, 0].add_(1e-3),
        "qkv bias": lambda m: m.blocks[1].attn.qkv.bias[5].add_(1e-3),
        "projection": lambda m: m.blocks[0].attn.proj.weight[0, 0].add_(1e-3),
        "ln gain": lambda m: m.blocks[0].ln2.weight[2].add_(1e-3),
        "ln bias": lambda m: m.ln_f.bias[2].add_(1e-3),
        "fc2": lambda m: m.blocks[1].mlp[2].weight[0, 7].add_(1e-3),
    }
    seen = {d}
    for name, edit in edits.items():
        d_e, _ = digest_after(edit)
        assert d_e not in seen, name
        seen.add(d_e)
    # same integers, other scale: fc1's weights scaled (exactly) by k and by 2k, so that
    # their largest magnitude is in [1, 2) and [2, 4): the same integers at scales one bit
    # apart (another function), and other digests
    k = 2.0 ** (1 - math.frexp(float(w.detach().abs().max()))[1])
    d_k, t_k = digest_after(lambda m: m.blocks[0].mlp[0].weight.mul_(k))
    d_2k, t_2k = digest_after(lambda m: m.blocks[0].mlp[0].weight.mul_(2 * k))
    assert torch.equal(t_k["blocks.0.fc1.w"], t_2k["blocks.0.fc1.w"])
    assert d_k != d_2k


def test_refused_priors_get_one_line():
    masked = Prior(
        PriorConfig(
            kind="masked",
            n_layer=1,
            n_head=2,
            n_embd=16,
            vocab_size=8,
            code_shape=[3, 3],
            dropout=0.0,
        )  # fmt: skip
    )
    with pytest.raises(UserError, match="autoregressive") as e:
        ExactPrior(masked)
    assert "\n" not in str(e.value)
    one = small_prior(vocab=1, n_embd=16, shape=(2, 2))
    with pytest.raises(UserError, match=r"2 to 2\*\*24 - 2 symbols; this prior has 1$") as e:
        ExactPrior(one)
    # 2**24 - 1 symbols: refused before anything is quantized (a 2-wide prior: 128 MB)
    torch.manual_seed(0)
    huge = Prior(PriorConfig(n_layer=1, n_head=1, n_embd=2, vocab_size=(1 << 24) - 1,
                             code_shape=[1, 2], dropout=0.0))  # fmt: skip
    with pytest.raises(UserError, match=f"this prior has {(1 << 24) - 1}$") as e:
        ExactPrior(huge)
    assert "\n" not in str(e.value)
    del huge
    # the smallest alphabet works: two symbols
    two = small_prior(vocab=2, n_embd=16, shape=(3, 3))
    ex = ExactPrior(two)
    seq, labels = sample_maps(two, 3, seed=5)
    w = ExactPrior.frequencies(_full(ex, seq, labels))
    assert bool((w.sum(-1) == (1 << 24) - 2).all())


def test_extend_checks_its_inputs():
    prior = small_prior(classes=0, shape=(3, 3))
    ex = ExactPrior(prior)
    seq = torch.zeros(2, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="first extend needs the labels"):
        ex.extend(seq[:, :3], ex.new_cache(2))
    with pytest.raises(ValueError, match="10 positions exceed the prior's sequence length 9"):
        ex.extend(seq, ex.new_cache(2), torch.zeros(2, dtype=torch.long))
    cache = ex.new_cache(2)
    ex.extend(seq[:, :5], cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        ex.extend(seq[:, :4], cache)


def test_to_cpu_keeps_the_results():
    prior = small_prior(pos="rope", n_layer=2)
    seq, labels = sample_maps(prior, 4, seed=6)
    before = _full(ExactPrior(prior), seq, labels)
    ex = ExactPrior(prior).to("cpu")
    assert ex.device == torch.device("cpu")
    assert torch.equal(_full(ex, seq, labels), before)
    assert torch.equal(_full(ExactPrior(prior).to(torch.device("cpu")), seq, labels), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["learned-1x32-classes", "rope-2x64-uncond"])
def test_cuda_gives_the_cpus_integers(name):
    prior = small_prior(**CONFIGS[name])
    seq, labels = sample_maps(prior, 70, seed=7)
    cpu = ExactPrior(prior)
    gpu = ExactPrior(prior).to("cuda")
    assert gpu.digest() == cpu.digest()
    want = _full(cpu, seq, labels)
    assert torch.equal(_full(gpu, seq.cuda(), labels.cuda()).cpu(), want)
    cache = gpu.new_cache(70)
    steps = [gpu.extend(seq[:, :0].cuda(), cache, labels.cuda())]
    for t in range(prior.seq_len - 1):
        steps.append(gpu.extend(seq[:, t : t + 1].cuda(), cache))
    got = torch.cat(steps, dim=1).cpu()
    assert torch.equal(got, want)
    assert torch.equal(ExactPrior.frequencies(got.cuda()).cpu(), ExactPrior.frequencies(want))
