"""The masked prior (prior/masked.py and the masked kind of prior/transformer.py): the
schedules' mask counts, hidden values cannot leak, one code per pass at S = T, masked
cross-entropy against the exact conditional entropy of a known Markov random field,
bit-exact resume, and the kind's bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vqkit.prior import Prior, PriorConfig, PriorTrainConfig
from vqkit.prior.codes import CodeData
from vqkit.prior.masked import (
    DEFAULT_STEPS,
    EVAL_RATIOS,
    MaskedSampleOptions,
    decode,
    gamma,
    masked_bits,
    ratio_mask,
    reveal_counts,
    training_mask,
)
from vqkit.prior.trainer import PriorTrainer
from vqkit.storage.checkpoint import load_checkpoint

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]


def masked_prior(**kw) -> Prior:
    cfg = dict(kind="masked", n_layer=2, n_head=2, n_embd=16, vocab_size=11,
               code_shape=[3, 4], num_classes=3)  # fmt: skip
    torch.manual_seed(0)
    return Prior(PriorConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("schedule", ["cosine", "arccos", "linear"])
def test_schedule_mask_counts_sum_to_the_map_size(schedule):
    for n in (1, 2, 7, 49, 64, 256):
        for steps in sorted({1, 2, 3, 8, 12, n}):
            if steps > n:
                continue
            counts = reveal_counts(n, steps, schedule)
            assert len(counts) == steps and sum(counts) == n and min(counts) >= 1
    assert reveal_counts(64, 64, schedule) == [1] * 64
    # no clamping needed here: the counts are the differences of floor(n gamma(s / S))
    hidden = [
        math.floor(64 * g) for g in (1.0, *(float(gamma(schedule, s / 8)) for s in range(1, 9)))
    ]
    if all(a > b for a, b in zip(hidden, hidden[1:], strict=False)):
        assert reveal_counts(64, 8, schedule) == [
            a - b for a, b in zip(hidden, hidden[1:], strict=False)
        ]


def test_schedules_against_their_formulas():
    r = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(gamma("cosine", r), torch.cos(math.pi / 2 * r))
    assert torch.allclose(gamma("linear", r), 1 - r)
    assert torch.allclose(gamma("arccos", r), torch.arccos(r) * 2 / math.pi)
    assert reveal_counts(64, 8, "cosine") == [2, 3, 6, 8, 10, 11, 12, 12]  # slow start
    with pytest.raises(ValueError, match="unknown schedule 'cos'"):
        reveal_counts(10, 2, "cos")
    with pytest.raises(ValueError, match="more than the 10 codes"):
        reveal_counts(10, 11, "cosine")
    with pytest.raises(ValueError, match="positive int"):
        reveal_counts(10, 0, "cosine")


def test_training_and_ratio_masks():
    g = torch.Generator().manual_seed(0)
    m = training_mask(4000, 16, "cosine", generator=g)
    n = m.sum(1)
    assert int(n.min()) >= 1 and int(n.max()) <= 16
    # E[ceil(16 cos(pi r / 2))], r ~ U[0, 1): about 16 * 2 / pi + 1/2
    assert abs(float(n.double().mean()) - (16 * 2 / math.pi + 0.5)) < 0.2
    assert m.double().mean(0).std() < 0.03  # every position alike
    for rho, want in ((0.25, 4), (0.5, 8), (0.9, 14), (0.0, 1)):
        assert (ratio_mask(50, 16, rho, g).sum(1) == want).all()


def test_hidden_values_do_not_leak_into_any_logits():
    """A hidden code's value is never read: two maps that differ only under the mask give
    the same logits everywhere; changing a visible code changes them (the test can fail)."""
    prior = masked_prior(pos="rope")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 11, (5, 12), generator=g)
    mask = ratio_mask(5, 12, 0.5, g)
    b = torch.where(mask, torch.randint(0, 11, (5, 12), generator=g), a)
    assert not torch.equal(a, b)
    y = torch.tensor([0, 1, 2, 3, 1])  # 3: the null class
    la, lb = prior.fill(a, mask, y), prior.fill(b, mask, y)
    assert la.shape == (5, 12, 11) and torch.equal(la, lb)
    c = a.clone()
    c[~mask] = (c[~mask] + 1) % 11
    assert not torch.allclose(prior.fill(c, mask, y)[mask], la[mask])
    # bidirectional: the first position's logits depend on the last code
    d = a.clone()
    d[:, -1] = (d[:, -1] + 1) % 11
    none = torch.zeros_like(mask)
    assert not torch.allclose(prior.fill(d, none, y)[:, 0], prior.fill(a, none, y)[:, 0])


def test_one_code_per_pass_when_steps_equal_the_codes():
    prior = masked_prior()
    seen: list[torch.Tensor] = []
    fill = prior.fill

    def spy(codes, mask, labels=None):
        seen.append(mask.sum(1))
        return fill(codes, mask, labels)

    prior.fill = spy
    g = torch.Generator().manual_seed(0)
    out = decode(prior, 3, labels=[0, 1, 2], generator=g, decode_steps=12, choice_temperature=0.0)
    assert out.shape == (3, 3, 4)
    assert [s.tolist() for s in seen] == [[12 - i] * 3 for i in range(12)]
    seen.clear()  # guidance: two rows per map, still one code per pass
    decode(prior, 2, labels=1, generator=g, decode_steps=12, cfg_scale=2.0, schedule="linear")
    assert [s.tolist() for s in seen] == [[12 - i] * 4 for i in range(12)]
    seen.clear()
    decode(prior, 2, generator=g, decode_steps=5, schedule="cosine")
    assert [int(s[0]) for s in seen] == [12, *(12 - sum(reveal_counts(12, 5, "cosine")[:i])
                                               for i in range(1, 5))]  # fmt: skip


def test_decoding_seeds_edits_and_bad_input():
    prior = masked_prior()
    kw = dict(labels=[0, 1, 2, 0], top_k=5, top_p=0.9, temperature=0.8)

    def draw(seed, **more):
        return decode(prior, 4, generator=torch.Generator().manual_seed(seed), **kw, **more)

    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # an edit keeps every code outside the hidden set
    known = torch.randint(0, 11, (4, 3, 4), generator=torch.Generator().manual_seed(5))
    hidden = torch.zeros(3, 4, dtype=torch.bool)
    hidden[1:, 2:] = True
    out = draw(3, codes=known, hidden=hidden.expand(4, 3, 4), decode_steps=4)
    assert torch.equal(out[:, ~hidden], known[:, ~hidden])
    with pytest.raises(ValueError, match="more than the 4 codes"):
        draw(3, codes=known, hidden=hidden.expand(4, 3, 4), decode_steps=5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        draw(3, decode_steps=0)
    with pytest.raises(ValueError, match="schedule must be one of cosine, arccos, linear"):
        draw(3, schedule="zigzag")
    with pytest.raises(ValueError, match="autoregressive prior's"):
        prior.log_prob(known)
    ar = Prior(PriorConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=11, code_shape=[3, 4]))
    with pytest.raises(ValueError, match="masked prior's"):
        ar.fill(known, hidden.expand(4, 3, 4))


@pytest.mark.parametrize("choice", [0.0, 1e-40, 4.5])
@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperatures_decode_the_greedy_limit(temperature, choice):
    """A temperature that passes the > 0 check but overflows logits / T in float32 (1e-40
    and below) decodes the T -> 0 limit: every code a pass reveals is the argmax of that
    pass's logits, not a NaN inside torch.multinomial; also with a tiny choice
    temperature."""
    prior = masked_prior()
    passes: list[tuple[torch.Tensor, torch.Tensor]] = []
    fill = prior.fill

    def spy(codes, mask, labels=None):
        logits = fill(codes, mask, labels)
        passes.append((mask.clone(), logits.argmax(-1)))
        return logits

    prior.fill = spy
    g = torch.Generator().manual_seed(0)
    kw = dict(temperature=temperature, choice_temperature=choice, decode_steps=5)
    out = decode(prior, 3, labels=[0, 1, 2], generator=g, **kw).reshape(3, -1)
    assert len(passes) == 5
    after = [m for m, _ in passes[1:]] + [torch.zeros_like(passes[0][0])]
    for (hidden, argmax), still in zip(passes, after, strict=True):
        revealed = hidden & ~still
        assert revealed.any()
        assert torch.equal(out[revealed], argmax[revealed])
    # the limit does not depend on how tiny T is once the draws are one-hot
    prior.fill = fill
    g = torch.Generator().manual_seed(0)
    kw["temperature"] = 1e-30
    assert torch.equal(out, decode(prior, 3, labels=[0, 1, 2], generator=g, **kw).reshape(3, -1))
    # a tiny choice temperature at T = 1 draws (no NaN either)
    g = torch.Generator().manual_seed(0)
    assert decode(prior, 2, generator=g, choice_temperature=choice, decode_steps=4).shape[0] == 2


@pytest.mark.parametrize("choice", [1e39, 1e300])
def test_huge_choice_temperature_still_decodes_every_hidden_code(choice):
    """tau g overflows float32 to -inf for half the hidden codes: they must still rank
    above the fixed codes, so each pass reveals its own count of hidden codes."""
    prior = masked_prior()
    seen: list[list[int]] = []
    fill = prior.fill

    def spy(codes, mask, labels=None):
        seen.append(mask.sum(1).tolist())
        return fill(codes, mask, labels)

    prior.fill = spy
    counts = reveal_counts(12, 10, "linear")
    expected = [[12 - sum(counts[:i])] * 8 for i in range(10)]
    for seed in range(20):
        seen.clear()
        g = torch.Generator().manual_seed(seed)
        decode(prior, 8, generator=g, choice_temperature=choice, decode_steps=10, schedule="linear")
        assert seen == expected


def test_decode_steps_keeps_reading_its_old_name_steps():
    """``steps`` was decode_steps's name: stored options and keyword arguments that use
    it still load, as decode_steps; a clash of the two names is refused."""
    prior = masked_prior()
    assert MaskedSampleOptions.from_dict({"steps": 4, "schedule": "linear"}).decode_steps == 4
    assert MaskedSampleOptions.from_dict({"steps": 4, "decode_steps": None}).decode_steps == 4
    with pytest.raises(ValueError, match="steps .the old name of decode_steps. is 4 but"):
        MaskedSampleOptions.from_dict({"steps": 4, "decode_steps": 5})

    def draw(**kw):
        return decode(prior, 2, generator=torch.Generator().manual_seed(7), **kw)

    assert torch.equal(draw(steps=3), draw(decode_steps=3))
    assert not torch.equal(draw(steps=3), draw(decode_steps=2))
    base = MaskedSampleOptions(decode_steps=2)
    assert torch.equal(draw(masked=base, steps=3), draw(decode_steps=3))
    # the default made explicit: what decode runs and what samples.json records
    assert MaskedSampleOptions().resolved(prior.seq_len).decode_steps == DEFAULT_STEPS
    assert MaskedSampleOptions().resolved(4).decode_steps == 4
    assert MaskedSampleOptions(decode_steps=3).resolved(12).decode_steps == 3
    assert torch.equal(draw(), draw(decode_steps=DEFAULT_STEPS))


def test_kind_options_are_checked():
    with pytest.raises(ValueError, match="applies to a masked prior"):
        PriorConfig(mask_schedule="linear")
    with pytest.raises(ValueError, match="kind must be one of"):
        PriorConfig(kind="diffusion")
    with pytest.raises(ValueError, match="mask_schedule must be one of cosine, arccos, linear"):
        PriorConfig(kind="masked", mask_schedule="zigzag")
    cfg = PriorConfig(kind="masked", mask_schedule="arccos")
    assert PriorConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["kind"] == "masked"
    # a stored config of before the kinds: the autoregressive prior
    old = {k: v for k, v in PriorConfig().to_dict().items() if k not in ("kind", "mask_schedule")}
    assert PriorConfig.from_dict(old).kind == "autoregressive"


# -- a known Markov random field: a chain x_0 .. x_{T-1}, the exact conditionals ----------

V, SHAPE = 4, (2, 4)
T = 8


def chain(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A sticky transition matrix P (V, V) and its stationary distribution, float64."""
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(V, V, generator=g, dtype=torch.float64) ** 4 + torch.eye(V)
    P = P / P.sum(1, keepdim=True)
    pi = torch.full((V,), 1.0 / V, dtype=torch.float64)
    for _ in range(2000):
        pi = pi @ P
    return P, pi / pi.sum()


def sample_chain(P, pi, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.multinomial(pi.expand(n, V), 1, generator=g)[:, 0]
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g)[:, 0]
    return x


def conditional_bits(P, pi, x: torch.Tensor, mask: torch.Tensor) -> float:
    """``-mean log2 p(x_i | x_visible)`` over the hidden codes, exactly (float64): by the
    Markov property p(x_i | visible) ∝ (P^{i-a})[x_a, x_i] (P^{b-i})[x_i, x_b] with a, b
    the nearest visible codes left and right (pi, resp. 1, when there is none)."""
    powers = [torch.linalg.matrix_power(P, k) for k in range(T + 1)]
    total, count = 0.0, 0
    for row, hid in zip(x.tolist(), mask.tolist(), strict=True):
        visible = [j for j in range(T) if not hid[j]]
        for i in (i for i in range(T) if hid[i]):
            left = [j for j in visible if j < i]
            right = [j for j in visible if j > i]
            p = powers[i - left[-1]][row[left[-1]]] if left else pi
            if right:
                p = p * powers[right[0] - i][:, row[right[0]]]
            total -= math.log2(float(p[row[i]] / p.sum()))
            count += 1
    return total / count


def codes(x: torch.Tensor) -> CodeData:
    return CodeData(x.reshape(-1, *SHAPE), torch.zeros(len(x), dtype=torch.long), (), "train")


@pytest.mark.timeout(120)
def test_masked_cross_entropy_approaches_the_conditional_entropy_of_a_markov_field(tmp_path):
    """Trained briefly (300 steps, ~10 s) on a chain, the masked prior's cross-entropy at
    each fixed ratio comes within 0.15 bits of the exact conditional entropy of those very
    hidden codes, from the marginal's ~1.4 bits above it (measured while writing this:
    0.12 / 0.08 / 0.05 bits at 25 / 50 / 90 % hidden; 800 steps: 0.10 / 0.06 / 0.02)."""
    P, pi = chain()
    train, test = sample_chain(P, pi, 4000, 1), sample_chain(P, pi, 400, 2)
    cfg = PriorConfig(kind="masked", n_layer=2, n_head=2, n_embd=32, dropout=0.0, pos="rope",
                      vocab_size=V)  # fmt: skip
    tcfg = PriorTrainConfig(
        steps=300, batch_size=64, lr=1e-2, warmup_steps=20, weight_decay=0.0, eval_every=300,
        log_every=100, eval_sequences=0, progress=False,
    )  # fmt: skip
    trainer = PriorTrainer(cfg, tcfg, tmp_path / "run", codes(train), codes(test))
    result = trainer.fit()
    marginal = float(-(pi * torch.log2(pi)).sum())
    for i, rho in enumerate(EVAL_RATIOS):
        mask = ratio_mask(len(test), T, rho, torch.Generator().manual_seed(i))
        exact = conditional_bits(P, pi, test, mask)
        got = masked_bits(trainer.model.eval(), test, None, rho, seed=i, batch_size=len(test))
        assert got == pytest.approx(result[f"test_masked_bits_{round(rho * 100)}"], abs=1e-9)
        assert exact < marginal - 0.5  # the neighbours tell a lot: the test can fail
        assert -0.03 < got - exact < 0.15, (rho, got, exact, marginal)


def _trainer(out, resume=False, steps=12):
    P, pi = chain(1)
    x = sample_chain(P, pi, 100, 3)
    labels = torch.arange(100) % 3
    split = CodeData(x.reshape(-1, *SHAPE), labels, ("a", "b", "c"), "train")
    cfg = PriorConfig(kind="masked", n_layer=2, n_head=2, n_embd=16, dropout=0.1,
                      vocab_size=V, class_dropout=0.3, mask_schedule="arccos")  # fmt: skip
    tcfg = PriorTrainConfig(
        steps=steps, batch_size=16, lr=3e-3, warmup_steps=3, eval_every=5, log_every=2,
        eval_sequences=20, progress=False, seed=4,
    )  # fmt: skip
    return PriorTrainer(cfg, tcfg, out, split, split, resume=resume)


def test_masked_resume_is_bit_exact(tmp_path):
    _trainer(tmp_path / "full").fit()
    assert _trainer(tmp_path / "part").fit(until=7) == {"step": 7}
    _trainer(tmp_path / "part", resume=True).fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12 and "mask_emb" in a["model"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)

    def records(path):
        return [{k: v for k, v in json.loads(line).items() if k != "codes_per_s"}
                for line in path.read_text().splitlines()]  # fmt: skip

    ra, rb = records(tmp_path / "full/metrics.jsonl"), records(tmp_path / "part/metrics.jsonl")
    assert ra == rb
    evals = [r for r in ra if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10, 12]
    assert {"test_masked_bits_25", "test_masked_bits_50", "test_masked_bits_90",
            "test_masked_bits", "train_masked_bits_50"} <= set(evals[0])  # fmt: skip
    assert a["best"]["value"] == min(r["test_masked_bits"] for r in evals)


def test_residual_codes_are_tokens_in_raster_order():
    """(h, w, Q) maps: Q tokens per position, stage 0 first; an edit of a position hides
    all Q stages and keeps every other token."""
    prior = masked_prior(code_shape=[2, 3, 2])
    assert prior.seq_len == 12
    g = torch.Generator().manual_seed(0)
    known = torch.randint(0, 11, (3, 2, 3, 2), generator=g)
    hidden = torch.zeros(2, 3, 2, dtype=torch.bool)
    hidden[1, 1] = True  # both stages of position (1, 1): tokens 8 and 9
    assert torch.nonzero(hidden.reshape(-1)).flatten().tolist() == [8, 9]
    out = decode(
        prior, 3, generator=g, codes=known, hidden=hidden.expand(3, 2, 3, 2), decode_steps=2
    )
    assert out.shape == (3, 2, 3, 2) and torch.equal(out[:, ~hidden], known[:, ~hidden])
    assert decode(prior, 2, generator=g).shape == (2, 2, 3, 2)
