"""vqkit.storage.rundir: the run-directory lock against real second processes, clean starts,
resumes, and metrics that stay exact across a kill."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vqkit.storage import fileio
from vqkit.storage.rundir import RunDir, RunDirBusyError

SRC = str(Path(__file__).resolve().parent.parent / "src")

# Holds a RunDir lock until its stdin closes; prints READY once locked.
HOLDER = """
import sys
from vqkit.storage.rundir import RunDir
run = RunDir(sys.argv[1]).lock()
print("READY", flush=True)
sys.stdin.read()
"""

# Takes the lock the raw way (flock + "pid host"), then waits to be killed.
RAW_HOLDER = """
import fcntl, os, socket, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode())
print("READY", flush=True)
time.sleep(60)
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = p.stdout.readline()  # type: ignore[union-attr]
    assert line.strip() == "READY", f"holder did not start (rc={p.poll()})"
    return p


@pytest.mark.timeout(60)
def test_second_process_gets_clear_error(tmp_path):
    holder = _start(HOLDER, str(tmp_path))
    try:
        with pytest.raises(RunDirBusyError) as e:
            RunDir(tmp_path).lock()
        msg = str(e.value)
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in msg
        assert str(tmp_path) in msg and "\n" not in msg
        assert isinstance(e.value, FileExistsError)  # the CLI prints those as one line
        # prepare() locks first: it must not touch a directory another run holds
        (tmp_path / "metrics.jsonl").write_text("{}\n")
        with pytest.raises(RunDirBusyError):
            RunDir(tmp_path).prepare(overwrite=True)
        assert (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(timeout=30)
    with RunDir(tmp_path) as run:  # released when the holder exits
        assert run.locked


@pytest.mark.timeout(30)
def test_stale_lock_from_killed_process_is_taken_over(tmp_path):
    holder = _start(RAW_HOLDER, str(tmp_path))
    with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
        RunDir(tmp_path).lock()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    holder.stdout.close()  # type: ignore[union-attr]
    holder.stdin.close()  # type: ignore[union-attr]
    lock_file = tmp_path / ".lock"
    assert lock_file.read_text().split()[0] == str(holder.pid)  # left behind
    run = RunDir(tmp_path).lock()
    try:
        assert lock_file.read_text().split() == [str(os.getpid()), socket.gethostname()]
        # the same process through another object is refused too; the holder's own call is
        # a no-op
        with pytest.raises(RunDirBusyError, match=f"pid {os.getpid()}"):
            RunDir(tmp_path).lock()
        assert run.lock() is run
    finally:
        run.unlock()
    assert lock_file.read_text() == ""  # released: no stale holder named any more


def _fill(run_dir: Path) -> None:
    for name in ("metrics.jsonl", "eval.json", "recon.png", "model.safetensors", "config.json"):
        (run_dir / name).write_text("x")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_text("x")


def test_overwrite_removes_known_artifacts_only(tmp_path):
    _fill(tmp_path)
    (tmp_path / "my_notes.txt").write_text("keep me")
    (tmp_path / "checkpoints" / "README").write_text("keep me too")
    orphan = tmp_path / f".last.pt.{fileio._host_tag()}.999999999.abcdef.tmp"  # no such pid
    orphan.write_text("partial")
    with RunDir(tmp_path) as run:
        removed = run.prepare(overwrite=True)
    assert orphan in removed and not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoints", "my_notes.txt"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["README"]


def test_resume_keeps_files_and_fresh_start_refuses_old_run(tmp_path):
    _fill(tmp_path)
    orphan = tmp_path / "checkpoints" / f".last.pt.{fileio._host_tag()}.999999999.abcdef.tmp"
    orphan.write_text("partial")
    with RunDir(tmp_path) as run:
        assert run.prepare(resume=True) == [orphan]
        assert (tmp_path / "checkpoints" / "last.pt").exists()
        assert (tmp_path / "metrics.jsonl").exists()
        with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
            run.prepare()
        with pytest.raises(ValueError, match="exclude each other"):
            run.prepare(resume=True, overwrite=True)
    fresh = tmp_path / "fresh"
    with RunDir(fresh) as run:
        assert run.prepare() == []


def test_truncate_metrics_after_kill(tmp_path):
    run = RunDir(tmp_path)
    for step in (10, 20, 30):
        run.log({"kind": "train", "step": step, "loss": 1.0 / step})
    run.log({"kind": "eval", "step": 20, "nmse": 0.5})
    with open(run.metrics_path, "a") as f:
        f.write('{"kind": "train", "step": 4')  # killed mid-line
    # the checkpoint is at step 20: records after it are written again on resume
    assert run.truncate_metrics(20) == 2
    steps = [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()]
    assert steps == [10, 20, 20]
    assert run.truncate_metrics(20) == 0  # nothing more to drop, file left alone
    assert RunDir(tmp_path / "none").truncate_metrics(5) == 0


def test_log_and_write_json_are_strict(tmp_path):
    run = RunDir(tmp_path)
    run.log({"step": 1, "loss": float("nan"), "ppl": float("inf")})
    path = run.write_json("eval.json", {"batch_perplexity": float("nan")})
    for text in (run.metrics_path.read_text(), path.read_text()):
        assert "NaN" not in text and "Infinity" not in text
    assert json.loads(run.metrics_path.read_text()) == {"step": 1, "loss": None, "ppl": None}
    assert json.loads(path.read_text()) == {"batch_perplexity": None}


def test_lock_wait_is_not_blocking(tmp_path):
    """A busy directory is an immediate error, not a hang."""
    with RunDir(tmp_path):
        t = time.monotonic()
        with pytest.raises(RunDirBusyError):
            RunDir(tmp_path).lock()
        assert time.monotonic() - t < 1.0


def test_holder_names_the_process_holding_the_lock_without_taking_it(tmp_path):
    run = tmp_path / "run"
    assert RunDir(run).holder() is None  # no lock file: nobody, and nothing created
    assert not run.exists()
    with RunDir(run):
        probe = RunDir(run)
        assert probe.holder() == f"pid {os.getpid()} on {socket.gethostname()}"
        assert not probe.locked
    assert RunDir(run).holder() is None  # released


@pytest.mark.parametrize("call", ["pwrite", "ftruncate", "open"])
def test_full_disk_at_the_lock_is_one_line_naming_the_lock_file(tmp_path, monkeypatch, call):
    """ENOSPC while the lock file is created or its holder's pid written: a one-line
    DiskFullError naming DIR/.lock (before: a bare "[Errno 28] No space left on device"),
    and no lock is kept (a later run takes it)."""
    import errno

    run = tmp_path / "run"
    real = getattr(os, call)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, call, full)
    with pytest.raises(fileio.DiskFullError) as e:
        RunDir(run).lock()
    monkeypatch.setattr(os, call, real)
    msg = str(e.value)
    assert str(run / ".lock") in msg and "no space left" in msg and "\n" not in msg, msg
    assert "[Errno" not in msg
    with RunDir(run) as again:  # nothing half-taken stayed behind
        assert again.locked
