"""vqkit.storage.fileio: atomic writes under faults (full disk, failing writers), file modes,
orphaned-temp cleanup and strict JSON."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vqkit.storage import fileio
from vqkit.storage.fileio import (
    DiskFullError,
    StrictJSONError,
    atomic_write,
    clean_stale_temps,
    dump_json,
    loads_json,
    write_json,
)


def _temps(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def _strict_loads(text: str):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota")])
def test_disk_full_keeps_old_file_and_removes_temp(tmp_path, code, words):
    target = tmp_path / "eval.json"
    target.write_text("old")

    def half_written(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("new, partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(DiskFullError) as e:
        atomic_write(target, half_written)
    msg = str(e.value)
    assert words in msg and str(target) in msg and "\n" not in msg
    assert e.value.errno == code and isinstance(e.value, OSError)
    assert target.read_text() == "old"
    assert _temps(tmp_path) == []


def test_disk_full_at_fsync_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", no_space)
    with pytest.raises(DiskFullError, match="no space left on device writing"):
        atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


def test_failing_writer_leaves_no_temp_and_old_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def boom(tmp: str) -> None:
        raise ValueError("writer failed")

    with pytest.raises(ValueError, match="writer failed"):
        atomic_write(target, boom)
    assert target.read_text() == "old" and _temps(tmp_path) == []


def test_new_file_mode_follows_umask(tmp_path, umask_027):
    target = tmp_path / "sub" / "plain.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("x"))
    assert target.stat().st_mode & 0o777 == 0o640
    # temp names carry host and pid, in the target's folder
    seen = []
    atomic_write(tmp_path / "n.txt", lambda tmp: seen.append(os.path.basename(tmp)))
    assert seen[0].startswith(".n.txt.") and f".{os.getpid()}." in seen[0]


def test_safetensors_file_gets_umask_mode_not_0600(tmp_path, umask_027):
    from safetensors.torch import save_file

    target = tmp_path / "model.safetensors"
    atomic_write(target, lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
    assert target.stat().st_mode & 0o777 == 0o640


def test_replacing_keeps_the_old_files_mode(tmp_path):
    target = tmp_path / "private.json"
    target.write_text("{}")
    target.chmod(0o600)
    write_json(target, {"a": 1})
    assert target.stat().st_mode & 0o777 == 0o600 and json.loads(target.read_text()) == {"a": 1}


def test_nan_and_inf_become_null():
    obj = {
        "nan": float("nan"),
        "list": [math.inf, -math.inf, 1.5],
        "np": np.float32("nan"),
        "np_ok": np.float64(2.5),
        "tensor": torch.tensor(float("inf")),
        "tensor_ok": torch.tensor(3),
        "tuple": (1, float("nan")),
    }
    back = _strict_loads(dump_json(obj))
    assert back == {
        "nan": None,
        "list": [None, None, 1.5],
        "np": None,
        "np_ok": 2.5,
        "tensor": None,
        "tensor_ok": 3,
        "tuple": [1, None],
    }
    with pytest.raises(TypeError):
        dump_json({"a": object()})


def test_write_json_is_strict(tmp_path):
    write_json(tmp_path / "eval.json", {"ppl": float("nan"), "mse": 0.25})
    text = (tmp_path / "eval.json").read_text()
    assert "NaN" not in text and text.endswith("\n")
    assert _strict_loads(text) == {"ppl": None, "mse": 0.25}


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"lr": NaN}', "NaN is not a JSON value"),
        ("[1, Infinity]", "Infinity is not a JSON value"),
        ('{"a": {"b": -Infinity}}', "-Infinity is not a JSON value"),
        ('{"lr": 1, "lr": 2}', "key 'lr' appears twice"),
        ('{"a": [{"k": 1, "k": 1}]}', "key 'k' appears twice"),
    ],
)
def test_loads_json_refuses_what_json_loads_lets_through(text, words):
    json.loads(text)  # Python's reader takes it (the reason for loads_json)
    with pytest.raises(StrictJSONError, match=words):
        loads_json(text)
    assert issubclass(StrictJSONError, ValueError)  # one `except ValueError` for both


def test_loads_json_reads_json_as_json_loads_does():
    text = '{"a": [1, 2.5, -3e-2, null, true, "NaN"], "b": {"c": {}}, "": 0}'
    assert loads_json(text) == json.loads(text)
    assert loads_json(text.encode()) == json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        loads_json("{")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=30)
    return p.pid


@pytest.mark.timeout(30)
def test_clean_stale_temps_removes_only_orphans(tmp_path):
    host = fileio._host_tag()
    dead = tmp_path / f".last.pt.{host}.{_dead_pid()}.abcdef.tmp"
    live = tmp_path / f".last.pt.{host}.{os.getppid()}.abcdef.tmp"
    mine = tmp_path / f".best.pt.{host}.{os.getpid()}.abcdef.tmp"
    other_host = tmp_path / f".x.pt.otherhost.{_dead_pid()}.abcdef.tmp"
    legacy_old = tmp_path / ".model.safetensors.k3j_x9q.tmp"  # old mkstemp name
    user_files = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "last.pt"]
    for p in [dead, live, mine, other_host, legacy_old, *user_files]:
        p.write_bytes(b"x")
    hour_ago = time.time() - 2 * 3600
    os.utime(legacy_old, (hour_ago, hour_ago))
    os.utime(user_files[0], (hour_ago, hour_ago))

    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, legacy_old])
    assert all(p.exists() for p in [live, mine, other_host, *user_files])
    # a temp of another host or a live pid goes once it is old enough
    assert sorted(clean_stale_temps(tmp_path, max_age_s=-1)) == sorted([live, other_host])
    assert mine.exists()
    assert clean_stale_temps(tmp_path / "missing") == []


def test_disk_full_recognised_without_an_errno(tmp_path):
    """Writers that raise no OSError: the text of safetensors' error, and torch.save's
    RuntimeError judged by the space left (here: none, as statvfs reports it)."""
    from vqkit.storage.fileio import NEARLY_FULL_BYTES, is_disk_full

    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert is_disk_full(rust)
    torch_err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832")
    assert not is_disk_full(torch_err)  # no path: nothing to judge by
    assert not is_disk_full(torch_err, tmp_path)  # a disk with room
    assert not is_disk_full(TypeError("No space left on device"), tmp_path)  # a bug
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255))
    real = os.statvfs
    try:
        os.statvfs = lambda p: full
        assert is_disk_full(torch_err, tmp_path) and NEARLY_FULL_BYTES > 0
    finally:
        os.statvfs = real


def test_stale_staging_folders_are_removed_like_temp_files(tmp_path):
    from vqkit.storage.fileio import temp_path

    dead = tmp_path / f".pack-train.{fileio._host_tag()}.999999999.abcdef.tmp"
    dead.mkdir()
    (dead / "train-000000.tar").write_bytes(b"x")
    mine = temp_path(tmp_path / "pack-test")
    mine.mkdir()
    assert fileio.clean_stale_temps(tmp_path) == [dead]
    assert not dead.exists() and mine.is_dir()
