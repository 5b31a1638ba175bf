"""vqkit.storage.tensorboard: metrics records and image grids read back with TensorBoard's
own reader; a resumed run's event stream holds every step once (purge_step); without the
package, ``--tensorboard`` is a one-line error before anything runs."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from vqkit.storage.rundir import RunDir
from vqkit.storage.tensorboard import TensorBoardSink, scalars_of

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402


def read(logdir):
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def curve(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_scalars_of_keeps_finite_numbers_only():
    rec = {"kind": "eval", "step": 7, "nmse": 0.5, "codes_used": 12, "ok": True,
           "split": "test", "nan": float("nan"), "changes": {"lr": 1}, "hist": [1, 2]}  # fmt: skip
    assert scalars_of(rec) == {"eval/nmse": 0.5, "eval/codes_used": 12.0}
    assert scalars_of({"step": 1, "loss": 2}) == {"metrics/loss": 2.0}


def test_records_become_curves_at_their_step(tmp_path):
    sink = TensorBoardSink(tmp_path)
    for step in (10, 20, 30):
        sink.log({"kind": "train", "step": step, "loss": 1.0 / step, "epoch": 0})
    sink.log({"kind": "eval", "step": 30, "nmse": 0.25})
    sink.log({"kind": "note", "loss": 5.0})  # no step: not a point of any curve
    sink.close()
    acc = read(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["eval/nmse", "train/epoch", "train/loss"]
    got = curve(acc, "train/loss")
    assert [s for s, _ in got] == [10, 20, 30]
    np.testing.assert_allclose([v for _, v in got], [0.1, 0.05, 1 / 30], rtol=1e-6)  # float32
    assert curve(acc, "eval/nmse") == [(30, 0.25)]


def test_image_grid_holds_the_pixels(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 4, 5, generator=g) - 0.5
    x[0, 0, 0, 0] = 3.0  # out of range: clamped
    sink = TensorBoardSink(tmp_path)
    sink.images(5, "eval/recon", x)
    sink.close()
    (event,) = read(tmp_path).Images("eval/recon")
    assert (event.step, event.width, event.height) == (5, 8 * 5, 2 * 4)  # 8 per row
    png = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    want = ((x + 0.5).clamp(0, 1) * 255).to(torch.uint8)  # TensorBoard truncates
    want = want.reshape(2, 8, 3, 4, 5).permute(0, 3, 1, 4, 2).reshape(8, 40, 3)
    np.testing.assert_array_equal(png, want.numpy())
    with pytest.raises(ValueError, match="expected images"):
        TensorBoardSink(tmp_path / "b").images(0, "x", torch.zeros(2, 2, 4, 4))


def test_a_new_event_file_sorts_after_the_existing_ones(tmp_path):
    made = []
    for _ in range(2):
        before = set(tmp_path.glob("events.out.tfevents.*"))
        TensorBoardSink(tmp_path).close()
        (new,) = set(tmp_path.glob("events.out.tfevents.*")) - before
        made.append(new.name)
    # TensorBoard reads in name order; names start with the creation second, and the
    # counter after the pid does not sort numerically: the second must be later
    assert int(made[1].split(".")[3]) > int(made[0].split(".")[3])
    assert sorted(made) == made


def _run(path, steps, *, resume_from=None, scale=1.0, purge=True):
    """A run that logs train records at ``steps`` and an eval record at the last one."""
    run = RunDir(path)
    run.prepare(resume=resume_from is not None)
    if resume_from is not None:
        run.truncate_metrics(resume_from)
    if purge:
        run.open_tensorboard()  # purge_step: the kept step + 1 after truncate_metrics
    else:
        run.attach(TensorBoardSink(run.tensorboard_dir))
    for s in steps:
        run.log({"kind": "train", "step": s, "loss": scale * s})
    run.log({"kind": "eval", "step": steps[-1], "nmse": scale})
    run.images(steps[-1], "samples", torch.zeros(2, 1, 4, 4))
    run.unlock()  # closes the sink


def test_resume_continues_the_stream_without_duplicated_steps(tmp_path):
    # first run reached step 5 (eval at 5), but its checkpoint is at step 3
    _run(tmp_path, [1, 2, 3, 4, 5])
    _run(tmp_path, [4, 5], resume_from=3, scale=10.0)
    acc = read(tmp_path / "tensorboard")
    assert curve(acc, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert curve(acc, "eval/nmse") == [(5, 10.0)]  # the interrupted run's eval is gone
    assert [e.step for e in acc.Images("samples")] == [5]
    # control: without purge_step the reader keeps both evaluations at step 5
    _run(tmp_path / "control", [1, 2, 3, 4, 5])
    _run(tmp_path / "control", [4, 5], resume_from=3, scale=10.0, purge=False)
    assert curve(read(tmp_path / "control" / "tensorboard"), "eval/nmse") == [(5, 1.0), (5, 10.0)]


def test_overwrite_removes_the_event_files(tmp_path):
    _run(tmp_path, [1, 2])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    run = RunDir(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a run"):
        run.prepare()
    removed = run.prepare(overwrite=True)
    run.unlock()
    assert any("tfevents" in p.name for p in removed)
    assert not (tmp_path / "tensorboard").exists()


def test_without_the_package_the_option_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    from vqkit.cli import main
    from vqkit.prior.config import PriorTrainConfig
    from vqkit.training.config import TrainConfig

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails: not installed
    assert TrainConfig.build().tensorboard is False  # off: nothing needed
    for build in (TrainConfig.build, PriorTrainConfig):
        with pytest.raises(ValueError, match=r"tensorboard package is not installed"):
            build(tensorboard=True)
    with pytest.raises(ValueError, match="not installed"):
        TensorBoardSink(tmp_path)
    assert main(["train", "--tensorboard", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "vqkit[tensorboard]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


@pytest.mark.timeout(180)
def test_vqkit_train_mirrors_its_records_and_resumes_without_duplicates(tmp_path):
    from .test_prior_codes import make_tokenizer

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = make_tokenizer(tmp_path / "tok", "--tensorboard")  # 3 steps, eval at 3
        # as if the run had gone on to step 6 and been killed before its checkpoint
        stale = {"kind": "eval", "step": 6, "nmse": 99.0}
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(stale) + "\n")
        sink = TensorBoardSink(run / "tensorboard")
        sink.log(stale)
        sink.close()
        make_tokenizer(run, "--resume", "--steps", "6")
    finally:
        torch.set_num_threads(n)
    acc = read(run / "tensorboard")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for kind, name in (("train", "loss"), ("eval", "nmse"), ("train", "codes_used")):
        want = [(r["step"], r[name]) for r in records if r["kind"] == kind]
        got = curve(acc, f"{kind}/{name}")
        assert [s for s, _ in got] == [3, 6]  # the stale step 6 was purged
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    first, second = acc.Images("eval/recon")  # originals above reconstructions, 8 wide
    assert (first.step, second.step) == (3, 6)
    assert (second.width, second.height) == (8 * 28, 2 * 28)
