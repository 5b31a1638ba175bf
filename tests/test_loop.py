"""Tests of the shared run loop (vqkit.training.loop) on a small job with two optimizers
(a generator and a discriminator, as the adversarial trainer has), each with its own
schedule and gradient scaler."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import vqkit.training.loop as loop_mod
from vqkit.storage.rundir import RunDir
from vqkit.training.loop import Cadence, RunLoop, ScheduledOptimizer, StepResult
from vqkit.training.optim import Schedule


class TwoOptimizerJob:
    """y = G(x) trained to match 2x, and a critic D trained on G's outputs: two
    optimizers, two schedules, two (disabled) scalers; the data position is its state."""

    loss_key = "loss"

    def __init__(self, out: Path, steps: int, resume: bool = False, nan_at: int = -1) -> None:
        torch.manual_seed(0)
        self.out, self.step, self.is_main = out, 0, True
        self.device = torch.device("cpu")
        self.last_path = out / "last.pt"
        self.g, self.d = nn.Linear(3, 3), nn.Linear(3, 1)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=0.1)
        self.opt_d = torch.optim.SGD(self.d.parameters(), lr=0.5)
        self.slots = [
            ScheduledOptimizer(
                self.opt_g,
                [0.1],
                Schedule(steps, 2, "cosine", 0.1),
                torch.amp.GradScaler("cpu", enabled=False),
            ),
            ScheduledOptimizer(self.opt_d, [0.5], Schedule(steps, 0, "constant")),
        ]
        self.position, self.rates, self.saves, self.nan_at = 0, [], [], nan_at
        self.window: list[float] = []
        if resume:
            ckpt = torch.load(self.last_path)
            self.g.load_state_dict(ckpt["g"])
            self.d.load_state_dict(ckpt["d"])
            self.opt_g.load_state_dict(ckpt["opt_g"])
            self.opt_d.load_state_dict(ckpt["opt_d"])
            self.step, self.position = ckpt["step"], ckpt["position"]

    def optimizers(self) -> list[ScheduledOptimizer]:
        return self.slots

    def data_state(self) -> int:
        return self.position

    def restore_data_state(self, state: int) -> None:
        self.position = state

    def next_batch(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.position)
        self.position += 1
        return torch.randn(4, 3, generator=g)

    def update(self, x: torch.Tensor, progress: Any) -> StepResult:
        self.rates.append((self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"]))
        loss_g = ((self.g(x) - 2 * x) ** 2).mean() - 0.01 * self.d(self.g(x)).mean()
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
        loss_d = self.d(self.g(x).detach()).pow(2).mean()
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        loss = float("nan") if self.step == self.nan_at else float(loss_g.detach())
        return StepResult({"loss": loss, "loss_d": float(loss_d.detach())})

    def observe(self, batch: Any, values: dict[str, float], counts: Any) -> None:
        self.window.append(values["loss"])

    def train_record(self) -> dict[str, Any]:
        record = {"loss": sum(self.window) / len(self.window)}
        self.window = []
        return record

    def postfix(self, values: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{values['loss']:.3f}"}

    def periodic_eval(self) -> dict[str, Any]:
        return {"weight_norm": float(self.g.weight.detach().norm())}

    def after_eval(self, record: dict[str, Any]) -> None:
        pass

    def save(self) -> None:
        self.saves.append(self.step)
        torch.save(
            {
                "g": self.g.state_dict(),
                "d": self.d.state_dict(),
                "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(),
                "step": self.step,
                "position": self.position,
            },
            self.last_path,
        )


def _run(out: Path, steps: int = 9, *, until: int | None = None, **kw: Any) -> TwoOptimizerJob:
    out.mkdir(parents=True, exist_ok=True)
    job = TwoOptimizerJob(out, steps, **kw)
    run = RunDir(out)
    RunLoop(job, Cadence(steps, log_every=2, eval_every=4, progress=False), run).run_steps(until)
    return job


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_each_optimizer_gets_its_own_schedule(tmp_path):
    job = _run(tmp_path / "a")
    g_sched, d_sched = Schedule(9, 2, "cosine", 0.1), Schedule(9)
    assert job.rates == [(g_sched.lr(0.1, s), d_sched.lr(0.5, s)) for s in range(9)]
    assert job.rates[0][0] == pytest.approx(0.05) and job.rates[-1][1] == 0.5


def test_cadence_of_logs_evaluations_and_checkpoints(tmp_path):
    job = _run(tmp_path / "a")
    records = _records(tmp_path / "a")
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8, 9]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8, 9]
    assert job.saves == [4, 8, 9]


def test_stop_at_until_saves_and_resume_is_exact(tmp_path):
    full = _run(tmp_path / "full")
    part = _run(tmp_path / "part", until=5)
    assert part.step == 5 and part.saves[-1] == 5
    resumed = _run(tmp_path / "part", resume=True)
    for a, b in zip(
        [*full.g.parameters(), *full.d.parameters()],
        [*resumed.g.parameters(), *resumed.d.parameters()],
        strict=True,
    ):
        assert torch.equal(a, b)


def test_ctrl_c_finishes_the_step_saves_and_reraises(tmp_path, monkeypatch):
    out = tmp_path / "int"
    out.mkdir()
    job = TwoOptimizerJob(out, 9)
    real = job.update

    def interrupted(x, progress):
        if job.step == 3:  # a real SIGINT inside step 4: the step completes
            signal.raise_signal(signal.SIGINT)
        return real(x, progress)

    monkeypatch.setattr(job, "update", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        RunLoop(job, Cadence(9, 2, 4, progress=False), RunDir(out)).run_steps()
    assert signal.getsignal(signal.SIGINT) is before
    saved = torch.load(out / "last.pt")
    assert saved["step"] == 4 and saved["position"] == 4


def test_hard_interrupt_inside_a_step_rewinds_the_data(tmp_path, monkeypatch):
    out = tmp_path / "hard"
    out.mkdir()
    job = TwoOptimizerJob(out, 9)
    real = job.update

    def boom(x, progress):
        if job.step == 3:
            raise KeyboardInterrupt  # as from a second Ctrl-C, before the update
        return real(x, progress)

    monkeypatch.setattr(job, "update", boom)
    with pytest.raises(KeyboardInterrupt):
        RunLoop(job, Cadence(9, 2, 4, progress=False), RunDir(out)).run_steps()
    saved = torch.load(out / "last.pt")
    assert saved["step"] == 3 and saved["position"] == 3  # batch 4 is drawn again


def test_a_non_finite_loss_stops_with_one_line(tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 3; lower"):
        _run(tmp_path / "nan", nan_at=2)


def test_checkpoint_after_ckpt_minutes(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(loop_mod, "_clock", lambda: now[0])
    out = tmp_path / "clock"
    out.mkdir()
    job = TwoOptimizerJob(out, 7)
    real = job.update

    def slow(x, progress):
        now[0] += 25.0
        return real(x, progress)

    monkeypatch.setattr(job, "update", slow)
    cadence = Cadence(7, log_every=100, eval_every=100, ckpt_minutes=1.0, progress=False)
    RunLoop(job, cadence, RunDir(out)).run_steps()
    assert job.saves == [3, 6, 7]
