"""The prior's trainer: learning-rate schedule, NLL on a known Markov chain against its
exact entropy rate, bit-exact resume, run-directory files, sharded loader."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from vqkit.prior import PriorConfig, PriorTrainConfig
from vqkit.prior.codes import CodeData, SequenceLoader
from vqkit.prior.trainer import PriorTrainer, lr_at
from vqkit.storage.checkpoint import CheckpointError, load_checkpoint

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("one_thread"),
]  # tests that need longer say so

V, SHAPE = 8, (4, 4)
T = 16


def markov_chain(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random transition matrix P (V, V) (rows ~ Dirichlet(0.5): far from uniform) and
    its stationary distribution pi (pi P = pi), float64."""
    g = torch.Generator().manual_seed(seed)
    gammas = -torch.log(torch.rand(V, V, 4, generator=g, dtype=torch.float64)).sum(-1)
    P = gammas**3 / (gammas**3).sum(1, keepdim=True)  # uneven rows
    pi = torch.full((V,), 1.0 / V, dtype=torch.float64)
    for _ in range(1000):  # power iteration; P is positive, so it converges
        pi = pi @ P
    return P, pi / pi.sum()


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log2(p)).sum(-1)


def chain_sequences(P, pi, n: int, seed: int) -> torch.Tensor:
    """n sequences (n, T) of the stationary chain: c_0 ~ pi, c_t ~ P[c_{t-1}]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.multinomial(pi.expand(n, V), 1, generator=g)[:, 0]
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g)[:, 0]
    return x


def data(x: torch.Tensor, classes: int = 0) -> CodeData:
    labels = torch.arange(len(x)) % classes if classes else torch.zeros(len(x), dtype=torch.long)
    names = tuple(f"c{i}" for i in range(classes))
    return CodeData(x.reshape(-1, *SHAPE), labels, names, "train")


def test_lr_schedule():
    cfg = PriorTrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3], abs=1e-15)
    assert lr_at(9, cfg) == 1.0 and lr_at(10, cfg) == 1.0  # end of warm-up: the peak
    assert math.isclose(lr_at(60, cfg), 0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert math.isclose(lr_at(110, cfg), 0.1) and math.isclose(lr_at(500, cfg), 0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.timeout(120)
def test_nll_approaches_the_markov_chain_entropy_rate(tmp_path):
    """A prior trained briefly on sequences of a known chain reaches, on held-out
    sequences, the chain's own NLL: per code (H(pi) + (T - 1) H_rate) / T bits in
    expectation, H_rate = sum_i pi_i H(P_i,.)."""
    P, pi = markov_chain()
    rate = float((pi * entropy_bits(P)).sum())
    optimum = (float(entropy_bits(pi)) + (T - 1) * rate) / T
    assert optimum < math.log2(V) - 0.5  # far from uniform: the test can fail
    train, test = chain_sequences(P, pi, 4000, 1), chain_sequences(P, pi, 1000, 2)
    # the chain's NLL of these very test sequences (the optimum up to sampling noise)
    logp = torch.log2(pi[test[:, 0]]).sum() + torch.log2(P[test[:, :-1], test[:, 1:]]).sum()
    chain_bits = float(-logp / test.numel())
    assert abs(chain_bits - optimum) < 0.03
    cfg = PriorConfig(n_layer=1, n_head=2, n_embd=32, dropout=0.0, vocab_size=V)
    tcfg = PriorTrainConfig(
        steps=300, batch_size=64, lr=3e-3, warmup_steps=20, weight_decay=0.0, eval_every=300,
        log_every=100, eval_sequences=0, progress=False,
    )  # fmt: skip
    result = PriorTrainer(cfg, tcfg, tmp_path / "run", data(train), data(test)).fit()
    assert result["step"] == 300
    gap = result["test_bits"] - chain_bits
    assert -0.02 < gap < 0.03, (result, chain_bits, optimum)
    assert abs(result["test_bits"] - optimum) < 0.05


def _trainer(out, resume=False, overwrite=False, steps=12):
    P, pi = markov_chain(1)
    x = chain_sequences(P, pi, 100, 3)  # 100 sequences, batch 16: epochs roll over
    cfg = PriorConfig(n_layer=2, n_head=2, n_embd=16, dropout=0.1, pos="rope",
                      vocab_size=V, class_dropout=0.3)  # fmt: skip
    tcfg = PriorTrainConfig(
        steps=steps, batch_size=16, lr=3e-3, warmup_steps=3, eval_every=5, log_every=2,
        eval_sequences=20, progress=False, seed=4,
    )  # fmt: skip
    return PriorTrainer(cfg, tcfg, out, data(x, classes=3), data(x[:40], classes=3),
                        resume=resume, overwrite=overwrite)  # fmt: skip


def test_eval_subset_is_strided_over_a_class_sorted_split(tmp_path):
    """``eval_sequences`` < N scores an evenly strided subset, not the first sequences:
    on a class-sorted split (image folders) the first 2,000 CIFAR-10 test images are
    airplanes and automobiles only."""
    P, pi = markov_chain(2)
    x = chain_sequences(P, pi, 60, 5)
    x[:30] = 0  # class 0 first, all one code; class 1 after it: a class-sorted split
    labels = (torch.arange(60) >= 30).long()
    split = CodeData(x.reshape(-1, *SHAPE), labels, ("a", "b"), "test")
    cfg = PriorConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=V)
    tcfg = PriorTrainConfig(steps=1, batch_size=8, eval_sequences=6, progress=False)
    with PriorTrainer(cfg, tcfg, tmp_path / "run", split, split) as trainer:
        idx = torch.tensor([0, 12, 24, 35, 47, 59])  # linspace(0, 59, 6), rounded
        sub = CodeData(split.codes[idx], labels[idx], split.classes, "test")
        first = CodeData(split.codes[:6], labels[:6], split.classes, "test")
        strided = trainer.bits_per_code(split, limit=6)
        assert strided == pytest.approx(trainer.bits_per_code(sub), abs=1e-12)
        assert abs(strided - trainer.bits_per_code(first)) > 1e-3  # not the first six
        assert trainer.evaluate()["test_bits"] == strided
        assert trainer.bits_per_code(split, limit=100) == trainer.bits_per_code(split)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(60)
def test_resume_is_bit_exact(tmp_path):
    """2N steps in one go = N steps, stop, resume for N more: identical weights,
    optimizer state, data position, and metrics (timing aside). Dropout, class dropout
    and epoch boundaries all happen in both halves."""
    full = _trainer(tmp_path / "full")
    full.fit()
    part = _trainer(tmp_path / "part")
    assert part.fit(until=7) == {"step": 7}  # as if interrupted after step 7
    resumed = _trainer(tmp_path / "part", resume=True)
    assert resumed.step == 7 and resumed.loader.state_dict() == part.loader.state_dict()
    resumed.fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12 and a["loader"] == b["loader"]
    assert a["loader"]["epoch"] >= 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])

    def strip(recs):
        return [{k: v for k, v in r.items() if k != "codes_per_s"} for r in recs]

    ra, rb = _records(tmp_path / "full/metrics.jsonl"), _records(tmp_path / "part/metrics.jsonl")
    assert strip(ra) == strip(rb)  # the stretch after step 6 was not logged twice
    assert [r["step"] for r in ra if r["kind"] == "eval"] == [5, 10, 12]


@pytest.mark.timeout(60)
def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, monkeypatch):
    """A SIGINT in the middle of step 7 lets the step finish, saves last.pt at step 7 and
    re-raises KeyboardInterrupt; the resumed run ends where an uninterrupted one does."""
    _trainer(tmp_path / "full").fit()
    step = PriorTrainer.train_step

    def interrupted(self, seq, labels):
        if self.step == 6:  # inside step 7 (0-based 6): the handler only sets a flag
            signal.raise_signal(signal.SIGINT)
        return step(self, seq, labels)

    monkeypatch.setattr(PriorTrainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "part").fit()
    monkeypatch.setattr(PriorTrainer, "train_step", step)
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["step"] == 7
    _trainer(tmp_path / "part", resume=True).fit()
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(60)
def test_run_directory(tmp_path):
    out = tmp_path / "run"
    result = _trainer(out).fit()
    for name in ("config.json", "metrics.jsonl", "eval.json", "curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):  # fmt: skip
        assert (out / name).is_file(), name

    def strict(s):
        raise ValueError(f"non-strict JSON constant {s}")

    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line, parse_constant=strict)
        assert rec["kind"] in ("train", "eval")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["prior"]["num_classes"] == 3 and cfg["prior"]["code_shape"] == [4, 4]
    assert cfg["train"]["steps"] == 12 and cfg["tokenizer"] is None
    ev = json.loads((out / "eval.json").read_text())
    assert ev == result and 0 < ev["test_bits"] < 4
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    evals = [r for r in _records(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert best["best"]["value"] == min(r["test_bits"] for r in evals)
    assert PriorConfig.from_dict(best["model_config"]).num_classes == 3
    with pytest.raises(FileExistsError, match="--resume"):
        _trainer(out)
    with pytest.raises(CheckpointError, match="does not match"):
        P, pi = markov_chain(1)
        x = chain_sequences(P, pi, 100, 3)
        PriorTrainer(PriorConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=V),
                     PriorTrainConfig(progress=False, batch_size=16, seed=4), out,
                     data(x, 3), data(x, 3),
                     resume=True)  # fmt: skip
    first = _trainer(out, resume=True)  # holds the run directory's lock until closed
    with pytest.raises(FileExistsError, match="in use by pid"):
        _trainer(out, overwrite=True)
    first.close()
    (out / "samples").mkdir()
    (out / "samples" / "step_0000005.png").write_bytes(b"old")
    with _trainer(out, overwrite=True):  # a fresh start removes the old run's files
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
        assert not list((out / "samples").iterdir())


def test_sequence_loader_shards_and_resumes_across_world_sizes():
    codes = torch.arange(50)[:, None].repeat(1, 4)
    labels = torch.arange(50)
    ranks = [SequenceLoader(codes, labels, 5, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([ld.next_batch()[1] for _ in range(5)]) for ld in ranks]  # one epoch
    assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == 50
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    one = SequenceLoader(codes, labels, 10, seed=1)
    one.load_state_dict({**ranks[0].state_dict(), "epoch": 1, "position": 10})
    assert one.position == 20  # 10 per rank on 2 ranks = 20 of the global order
    ref = SequenceLoader(codes, labels, 10, seed=1)
    ref.epoch, ref.position = 1, 20
    assert torch.equal(one.next_batch()[1], ref.next_batch()[1])
    with pytest.raises(ValueError, match="too few sequences"):
        SequenceLoader(codes[:8], labels[:8], 5, world_size=2)
