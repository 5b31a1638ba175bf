"""Tests of the runtime's job base (vqkit.runtime.job) with the real jobs: for every job a
stopped and resumed run writes the records (train windows included) and weights of the
uninterrupted one, and a hard interrupt never leaves a checkpoint that is half a step
ahead of its step number. (The toy job's tests are in test_loop.py.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_prior_masked import _trainer as masked_trainer
from tests.test_prior_trainer import _trainer as prior_trainer
from vqkit.storage.checkpoint import load_checkpoint
from vqkit.training.tokenizer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)
DISC = dict(disc_weight=0.8, disc_start=3, disc_layers=2, disc_channels=8)
RUN = dict(batch_size=8, log_every=3, eval_every=4, eval_images=16, progress=False, seed=3)
RATES = ("images_per_s", "codes_per_s")  # wall time, not state
# VAR's multi-scale tokenizer with k-means init and revival: its per-scale usage EMA and
# window counts (code_groups) must come back too
MULTISCALE = dict(quantizer="multiscale", scales="1,2,4,7", phi_convs=2, init="kmeans")
MULTISCALE.update(init_batches=1, revive_every=2, dead_threshold=30.0)


def _tokenizer(out: Path, adversarial: bool, resume: bool = False, **extra: Any) -> Trainer:
    more = {**(DISC if adversarial else {}), **extra}
    cfg = TrainConfig(out_dir=str(out), steps=10, **RUN, **SMALL, **more)
    trainer = Trainer(cfg, resume=resume)
    trainer.finish = lambda: {"step": trainer.step}  # no final evaluation, pictures
    return trainer


def _records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in RATES} for line in lines]


def _same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Every tensor of two checkpoints equal (nested dicts and lists)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_tensors(x, y, f"{where}[{i}]")


def _same_run(a: Path, b: Path) -> None:
    assert _records(a) == _records(b)
    ca = load_checkpoint(a / "checkpoints" / "last.pt")
    cb = load_checkpoint(b / "checkpoints" / "last.pt")
    for key in ("train_config", "tokenizer"):  # paths differ
        ca.pop(key, None), cb.pop(key, None)
    _same_tensors(ca, cb)


JOBS = {
    "tokenizer": lambda out, resume=False: _tokenizer(out, False, resume),
    "adversarial": lambda out, resume=False: _tokenizer(out, True, resume),
    "multiscale": lambda out, resume=False: _tokenizer(out, False, resume, **MULTISCALE),
    "prior": lambda out, resume=False: prior_trainer(out, resume=resume),
    "masked": lambda out, resume=False: masked_trainer(out, resume=resume),
}


@pytest.mark.parametrize("kind", list(JOBS))
def test_every_job_resumes_to_the_same_records_and_weights(tmp_path, kind):
    """Stopped at step 5, in the middle of a log window (records at 3, 6, 9)."""
    make = JOBS[kind]
    make(tmp_path / "full").fit()
    assert make(tmp_path / "part").fit(until=5) == {"step": 5}
    make(tmp_path / "part", resume=True).fit()
    _same_run(tmp_path / "full", tmp_path / "part")


def _twice() -> None:
    signal.raise_signal(signal.SIGINT)  # a stop at the step's end is asked for...
    signal.raise_signal(signal.SIGINT)  # ...and a second Ctrl-C: KeyboardInterrupt now


@pytest.mark.parametrize("where", ["after optimizer.step", "between G and D"])
def test_a_hard_interrupt_inside_a_step_leaves_the_last_boundary(tmp_path, where, capsys):
    """A second Ctrl-C after the tokenizer's optimizer.step() of step 7, or between the
    generator's and the discriminator's updates of step 7: nothing is saved, last.pt
    keeps step 4 (its evaluation), whose resume equals the uninterrupted run."""
    adversarial = where == "between G and D"
    _tokenizer(tmp_path / "full", adversarial).fit()
    trainer = _tokenizer(tmp_path / "hit", adversarial)
    if adversarial:
        real = trainer.adv.discriminator_step

        def hit(*a: Any, **k: Any) -> Any:
            if trainer.step == 6:
                _twice()
            return real(*a, **k)

        trainer.adv.discriminator_step = hit
    else:
        real = trainer.optimizer.step

        def hit(*a: Any, **k: Any) -> Any:
            out = real(*a, **k)
            if trainer.step == 6:
                _twice()
            return out

        trainer.optimizer.step = hit
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert "interrupted inside step 7: not saved" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "hit" / "checkpoints" / "last.pt")["step"] == 4
    _tokenizer(tmp_path / "hit", adversarial, resume=True).fit()
    _same_run(tmp_path / "full", tmp_path / "hit")
