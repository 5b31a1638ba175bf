"""Tests of the shared run loop and the runtime around it (vqkit.runtime.loop, .job) on a
toy job: a generator and a critic (two optimizers, each with its own schedule, as the
adversarial tokenizer has), global-RNG noise (so a resume must restore the RNG)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import vqkit.runtime.loop as loop_mod
from vqkit.errors import UserError
from vqkit.runtime import Job, JobOptions, Schedule, ScheduledOptimizer, StepResult
from vqkit.storage.checkpoint import CheckpointError, save_checkpoint

RATE = "items_per_s"  # the only figure of a record that is wall time, not state


class ToyJob(Job):
    """y = G(x) trained to match 2x + noise, and a critic D on G's outputs."""

    kind = "toy"
    best_key = "weight_norm"

    def __init__(self, options: JobOptions, out: Path, hook: Any = None, **kw: Any) -> None:
        super().__init__(options, out, **kw)
        self.hook, self.rates = hook or (lambda job, where: None), []
        with self.setting_up():
            torch.manual_seed(options.seed)
            self.g, self.d = nn.Linear(3, 3), nn.Linear(3, 1)
            self.opt_g = torch.optim.Adam(self.g.parameters(), lr=options.lr)
            self.opt_d = torch.optim.SGD(self.d.parameters(), lr=0.5)
            self.slots = [
                ScheduledOptimizer(self.opt_g, [options.lr], Schedule.of(options)),
                ScheduledOptimizer(self.opt_d, [0.5], Schedule(options.steps)),
            ]
            self.position = 0

    def optimizers(self) -> list[ScheduledOptimizer]:
        return self.slots

    def next_batch(self) -> torch.Tensor:
        self.position += 1
        return torch.randn(4, 3, generator=torch.Generator().manual_seed(self.position))

    def update(self, x: torch.Tensor, progress: Any) -> StepResult:
        self.rates.append((self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"]))
        target = 2 * x + 0.1 * torch.randn(x.shape)  # the global RNG
        loss_g = ((self.g(x) - target) ** 2).mean() - 0.01 * self.d(self.g(x)).mean()
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
        self.hook(self, "between")  # after the generator's update, before the critic's
        loss_d = self.d(self.g(x).detach()).pow(2).mean()
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        d = float(loss_d.detach())
        extra = {"late": d} if self.step >= 5 else {}  # from step 6 on only
        return StepResult({"loss": float(loss_g.detach()), "loss_d": d, **extra})

    def items(self, batch: Any) -> int:
        return batch.shape[0]

    def evaluate(self) -> dict[str, Any]:
        return {"weight_norm": float(self.g.weight.detach().norm())}

    def state_dict(self) -> dict[str, Any]:
        model = {"g": self.g.state_dict(), "d": self.d.state_dict()}
        opts = {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}
        return {"model_config": {}, "model": model, "position": self.position, **opts}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        for n in ("g", "d"):
            getattr(self, n).load_state_dict(state["model"][n])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.position = state["position"]
        return []


def _options(**kw: Any) -> JobOptions:
    base = dict(steps=9, lr=0.1, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    return JobOptions(**{**base, "log_every": 2, "eval_every": 4, "progress": False, **kw})


def _run(out: Path, until: int | None = None, **kw: Any) -> ToyJob:
    opts = kw.pop("options", _options())
    job = ToyJob(opts, out, **kw)
    job.fit(until)
    return job


def _records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != RATE} for line in lines]


def _same_weights(a: ToyJob, b: ToyJob) -> bool:
    pa, pb = [*a.g.parameters(), *a.d.parameters()], [*b.g.parameters(), *b.d.parameters()]
    pairs = zip(pa, pb, strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_each_optimizer_gets_its_own_schedule(tmp_path):
    job = _run(tmp_path / "a")
    g_sched, d_sched = Schedule(9, 2, "cosine", 0.1), Schedule(9)
    assert job.rates == [(g_sched.lr(0.1, s), d_sched.lr(0.5, s)) for s in range(9)]
    assert job.rates[0][0] == pytest.approx(0.05) and job.rates[-1][1] == 0.5


def test_cadence_of_logs_evaluations_and_checkpoints(tmp_path):
    _run(tmp_path / "a")
    records = _records(tmp_path / "a")
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8, 9]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8, 9]
    train = [r for r in records if r["kind"] == "train"]
    assert "late" not in train[1] and "late" in train[2]  # averaged over its own steps
    best = torch.load(tmp_path / "a" / "checkpoints" / "best.pt", weights_only=False)
    evals = [r for r in records if r["kind"] == "eval"]
    assert best["best"]["value"] == min(r["weight_norm"] for r in evals)
    info = json.loads((tmp_path / "a" / "config.json").read_text())
    assert info["train"]["steps"] == 9 and info["world_size"] == 1


@pytest.mark.parametrize("until", [3, 4, 5])
def test_resume_reproduces_every_record_and_weight(tmp_path, until):
    """Stopped mid-window (3, 5) or at an evaluation (4): the resumed run's records (train
    windows included) and weights equal the uninterrupted run's."""
    full = _run(tmp_path / "full")
    part = _run(tmp_path / "part", until=until)
    assert part.step == until
    resumed = _run(tmp_path / "part", resume=True)
    assert _records(tmp_path / "part") == _records(tmp_path / "full")
    assert _same_weights(full, resumed)


def test_ctrl_c_finishes_the_step_saves_and_reraises(tmp_path):
    def once(job, where):
        if job.step == 3:  # a real SIGINT inside step 4: the step completes
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "int", hook=once)
    assert signal.getsignal(signal.SIGINT) is before
    saved = torch.load(tmp_path / "int" / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == 4 and saved["position"] == 4
    resumed = _run(tmp_path / "int", resume=True)
    assert _same_weights(_run(tmp_path / "full"), resumed)


def test_hard_interrupt_inside_a_step_saves_no_half_step(tmp_path, capsys):
    """A second Ctrl-C between the generator's update and the critic's: the generator is
    a step ahead, so nothing is written; last.pt keeps step 4, which resumes exactly."""

    def twice(job, where):
        if job.step == 5:
            signal.raise_signal(signal.SIGINT)  # asks for a stop at the step's end
            signal.raise_signal(signal.SIGINT)  # and now: KeyboardInterrupt here

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "hard", hook=twice)
    assert "interrupted inside step 6: not saved" in capsys.readouterr().out
    saved = torch.load(tmp_path / "hard" / "checkpoints" / "last.pt", weights_only=False)
    assert saved["step"] == 4 and saved["position"] == 4
    resumed = _run(tmp_path / "hard", resume=True)
    full = _run(tmp_path / "full")
    assert _records(tmp_path / "hard") == _records(tmp_path / "full")
    assert _same_weights(full, resumed)


def test_a_non_finite_loss_stops_with_one_line(tmp_path):
    def nan(job, where):
        if job.step == 2:
            job.g.weight.data.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"loss became nan at step 4; lower"):
        _run(tmp_path / "nan", hook=nan)


def test_checkpoint_after_ckpt_minutes(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loop_mod, "_clock", lambda: now[0])
    saves: list[int] = []

    def slow(job, where):
        now[0] += 25.0

    opts = _options(steps=7, log_every=100, eval_every=100, ckpt_minutes=1.0)
    job = ToyJob(opts, tmp_path / "clock", hook=slow)
    real = job.save
    monkeypatch.setattr(job, "save", lambda **kw: (saves.append(job.step), real(**kw)))
    job.fit()
    assert saves == [3, 6, 7]


def test_resume_applies_reports_and_refuses_by_the_options_rules(tmp_path, capsys):
    _run(tmp_path / "r", until=4)
    with pytest.raises(UserError, match=r"cannot change seed \(0 -> 1\)"):
        _run(tmp_path / "r", resume=True, options=_options(seed=1))
    _run(tmp_path / "r", resume=True, options=_options(lr=0.05))
    assert "resume: lr 0.1 -> 0.05 (applied)" in capsys.readouterr().out
    resume = [r for r in _records(tmp_path / "r") if r["kind"] == "resume"]
    assert resume == [{"kind": "resume", "step": 4, "changes": {"lr": {"from": 0.1, "to": 0.05}}}]


def test_a_run_directory_is_refused_unless_resume_or_overwrite(tmp_path):
    _run(tmp_path / "d", until=2)
    with pytest.raises(FileExistsError, match="already holds a run"):
        _run(tmp_path / "d")
    _run(tmp_path / "d", overwrite=True)
    other = {"kind": "other", "model_config": {}, "model": {}, "step": 0}
    save_checkpoint(tmp_path / "d" / "checkpoints" / "last.pt", other)
    with pytest.raises(CheckpointError, match="is a other checkpoint, not a toy one"):
        _run(tmp_path / "d", resume=True)
