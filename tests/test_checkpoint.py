"""Tests of vqkit's checkpoint module."""

import os

import pytest


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    from vqkit.storage.checkpoint import atomic_write

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    # a successful write has the permissions an ordinary open() gives (not mkstemp's 0600)
    new = tmp_path / "g.bin"
    atomic_write(new, lambda tmp: open(tmp, "wb").write(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
