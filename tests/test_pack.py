"""vqkit pack: shards from image folders and in-memory sets, read back identically."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")

from vqkit.data import (  # noqa: E402
    ImageData,
    ShardLoader,
    load_builtin,
    load_dataset,
    load_image_folder,
    open_shards,
)
from vqkit.data.pack import add_pack_arguments, pack, run_pack  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED_ENV = "VQKIT_SHARED_DATA"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "cache"))


def _write_folder(root: Path, ext: str = "png", size=(9, 7)) -> Path:
    """train/ and test/ with two classes of small RGB images (one grayscale file)."""
    g = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                a = g.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                img = Image.fromarray(a)
                if (split, cls, i) == ("train", "dog", 2):
                    img = img.convert("L")  # the loader converts it; so must the reader
                img.save(d / f"{i:03d}.{ext}", quality=90)
    return root


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_image_folder_round_trip_keeps_the_files(tmp_path, ext):
    folder = _write_folder(tmp_path / "imgs", ext)
    out = tmp_path / "shards"
    for split in ("train", "test"):
        entry = pack(folder, out, 5, split=split)
        want = load_image_folder(folder, split, cache=False)
        got = open_shards(out, split).load(sort_keys=True)
        assert torch.equal(got.images, want.images)  # same pixels, PNG or JPEG alike
        assert torch.equal(got.labels, want.labels)
        assert got.classes == want.classes == ("cat", "dog")
        assert entry["encoding"] == ext and entry["channels"] == 3 and entry["size"] == [7, 9]
    # the original file bytes are stored: key i is the i-th file in sorted order
    files = sorted((folder / "train").rglob(f"*.{ext}"))
    stored = {}
    for shard in sorted(out.glob("train-*.tar")):
        stored.update(_members(shard))
    assert len(stored) == 2 * len(files)
    for i, f in enumerate(files):
        assert stored[f"{i:06d}.{ext}"] == f.read_bytes()
        assert stored[f"{i:06d}.cls"] == (b"0" if "/cat/" in str(f) else b"1")
    assert load_dataset(out, "test").images.shape == (6, 3, 7, 9)


def test_resized_pack_is_png_and_matches_the_loader(tmp_path):
    folder = _write_folder(tmp_path / "imgs", "jpg", size=(12, 10))
    out = tmp_path / "shards"
    entry = pack(folder, out, 4, image_size=8, channels=1)
    assert entry["encoding"] == "png" and entry["size"] == [8, 8] and entry["channels"] == 1
    want = load_image_folder(folder, "train", image_size=8, channels=1, cache=False)
    got = open_shards(out).load(sort_keys=True)
    assert torch.equal(got.images, want.images)


def test_in_memory_source_shards_manifest_and_bytes(tmp_path):
    g = np.random.default_rng(1)
    data = ImageData(
        torch.from_numpy(g.integers(0, 256, size=(25, 1, 6, 6), dtype=np.uint8)),
        torch.from_numpy(g.integers(0, 3, size=25)),
        ("a", "b", "c"),
    )
    out = tmp_path / "shards"
    entry = pack(data, out, 10, seed=3)
    names = sorted(p.name for p in out.iterdir())
    shards = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert names == [".lock", "manifest.json", *shards]  # .lock: the folder's lock file
    assert [s["count"] for s in entry["shards"]] == [10, 10, 5]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "vqkit-shards" and manifest["splits"]["train"] == entry
    assert entry["classes"] == ["a", "b", "c"] and entry["channels"] == 1
    # shuffled on write: shard order is not key order, sorting by key restores it
    assert list(_members(out / "train-000000.tar"))[0] != "000000.png"
    back = open_shards(out).load(sort_keys=True)
    assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels)
    # reproducible bytes (fixed mtime, seeded order)
    digest = hashlib.sha256((out / "train-000001.tar").read_bytes()).hexdigest()
    pack(data, tmp_path / "again", 10, seed=3)
    assert hashlib.sha256((tmp_path / "again/train-000001.tar").read_bytes()).hexdigest() == digest
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_overwrite_replaces_and_removes_stale_shards(tmp_path):
    out = tmp_path / "shards"
    builtin = load_builtin("test").subset(slice(0, 30))
    pack(builtin, out, 10, split="test")
    pack(builtin.subset(slice(0, 12)), out, 5)
    with pytest.raises(FileExistsError, match="already holds train shards"):
        pack(builtin, out, 5)
    pack(builtin, out, 20, overwrite=True)
    assert sorted(p.name for p in out.glob("train-*")) == ["train-000000.tar", "train-000001.tar"]
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert set(splits) == {"train", "test"} and splits["train"]["num_images"] == 30
    assert open_shards(out, "test").num_images == 30


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    folder = _write_folder(tmp_path / "imgs")
    (folder / "train" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 of 13 unreadable images.*bad.png"):
        entry = pack(folder, tmp_path / "shards", 100)
    assert entry["num_images"] == 12 and "bad.png" in entry["skipped"][0]


def test_cli_arguments_and_missing_test_split(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(folder / f"{i}.png")
    parser = argparse.ArgumentParser()
    add_pack_arguments(parser)
    out = tmp_path / "shards"
    args = parser.parse_args([str(folder), "--out", str(out), "--shard-size", "2"])
    assert run_pack(args) == 0
    text = capsys.readouterr().out
    assert "train: 5 images in 3 shards" in text and "test: not packed" in text
    loader = ShardLoader(out, 2, num_workers=0)
    assert loader.next_batch()[0].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="'test'"):
        run_pack(parser.parse_args([str(folder), "--out", str(out), "--splits", "test"]))


def _shared(name: str) -> Path:
    base = os.environ.get(SHARED_ENV)
    path = (Path(base) if base else ROOT.parent / "shared" / "data") / name
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (set {SHARED_ENV} to its folder)")
    return path


def test_real_jpeg_tar_round_trip(tmp_path):
    archive = _shared("caltech101_128.tar.gz")
    out = tmp_path / "shards"
    entry = pack(archive, out, 250, split="test")  # 922 JPEGs, kept as they are
    assert entry["num_images"] == 922 and entry["encoding"] == "jpg" and entry["size"] == [128, 128]
    assert len(entry["classes"]) == 102
    want = load_image_folder(archive, "test", image_size=64, cache=False)
    got = open_shards(out, "test").load(image_size=64, sort_keys=True)
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    loader = ShardLoader(out, 32, split="test", num_workers=2, image_size=64)
    x, y = loader.next_batch()
    assert x.shape == (32, 3, 64, 64) and int(y.max()) < 102


# -- a pack killed (SIGKILL) part-way: all-or-nothing for a reader ----------------------

_KILLED_PACK = """
import os, signal, sys
import vqkit.data.pack as P
from vqkit.data import load_builtin
out, where = sys.argv[1], sys.argv[2]
data = load_builtin("test").subset(slice(0, 40))
if where == "staging":  # killed while writing its 3rd shard (into the staging folder)
    real, n = P._write_shard, [0]
    def write(path, members):
        n[0] += 1
        if n[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, members)
    P._write_shard = write
else:  # killed during the switch, after the first staged shard was moved into place
    real_replace, moved = os.replace, [0]
    def replace(src, dst):
        real_replace(src, dst)
        if ".pack-train." in str(src) and ".pack-train." not in str(dst):
            moved[0] += 1
            if moved[0] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    P.os.replace = replace
P.pack(data, out, 10, seed=1, overwrite=True)
"""


def _keys(out: Path) -> list[str]:
    """Image keys of the train split, as a reader sees them."""
    keys = []
    for path in open_shards(out, "train").shards:
        keys += [n for n in _members(Path(path)) if not n.endswith(".cls")]
    return keys


@pytest.mark.parametrize("where", ["staging", "switch"])
def test_killed_overwrite_never_mixes_two_packs(tmp_path, where):
    import subprocess
    import sys

    out = tmp_path / "shards"
    pack(load_builtin("test").subset(slice(0, 40)), out, 10, seed=0)
    before = {p.name: p.read_bytes() for p in out.glob("train-*.tar")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_PACK, str(out), where], env=env)
    assert proc.returncode == -9  # killed, as a person or the OOM killer would
    if where == "staging":  # the old pack, untouched and readable
        assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == before
        assert len(_keys(out)) == 40 and len(set(_keys(out))) == 40
    else:  # half switched: refused, with what to do
        with pytest.raises(ValueError, match="half replaced.*--overwrite"):
            open_shards(out, "train")
        with pytest.raises(FileExistsError, match="--overwrite"):
            pack(load_builtin("test").subset(slice(0, 40)), out, 10)
    pack(load_builtin("test").subset(slice(0, 40)), out, 10, seed=1, overwrite=True)
    keys = _keys(out)
    assert len(keys) == 40 and len(set(keys)) == 40  # each image once
    # leftovers cleaned; .lock (the folder lock's file) stays, as in a run directory
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_pack_argument_errors_are_one_line(tmp_path, capsys):
    from vqkit.cli import main

    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(folder / f"{i}.png")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, want in (
        (["--out", str(afile)], "is a file"),
        (["--out", str(tmp_path / "o"), "--image-size", "0"], "image_size must be >= 1"),
    ):
        assert main(["pack", str(folder), *argv]) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err
    assert main(["pack", str(folder), "--out", str(tmp_path / "o2")]) == 0
    assert main(["pack", str(folder), "--out", str(tmp_path / "o2")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


# A pack of 40 images that stops after staging its first shard until its stdin closes
# (a long pack, caught in the middle); prints READY there and DONE at the end.
_HELD_PACK = """
import sys
import vqkit.data.pack as P
from vqkit.data import load_builtin
real, held = P._write_shard, []
def write(path, members):
    if not held:
        held.append(1)
        print("READY", flush=True)
        sys.stdin.read()
    real(path, members)
P._write_shard = write
P.pack(load_builtin("test").subset(slice(0, 40)), sys.argv[1], 10, seed=1, overwrite=True)
print("DONE", flush=True)
"""


@pytest.mark.timeout(120)
def test_concurrent_pack_into_one_folder_is_refused_naming_the_holder(tmp_path):
    """Two ``vqkit pack --overwrite`` into one folder at once: the second is refused in
    one line naming the first's pid, and the folder holds the first pack only (before:
    both wrote, one could crash with FileNotFoundError, the folder mixed both)."""
    import subprocess
    import sys

    out = tmp_path / "shards"
    pack(load_builtin("test").subset(slice(0, 40)), out, 10, seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen(
        [sys.executable, "-c", _HELD_PACK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert first.stdout.readline().strip() == "READY", f"rc={first.poll()}"
        cmd = ["-m", "vqkit", "pack", "builtin", "--out", str(out), "--overwrite"]
        second = subprocess.run(
            [sys.executable, *cmd, "--splits", "test", "--shard-size", "7"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1, second.stderr
        assert f"in use by pid {first.pid} on" in second.stderr, second.stderr
        first.stdin.close()
        assert first.wait(timeout=60) == 0 and "DONE" in first.stdout.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train"] and manifest["splits"]["train"]["seed"] == 1
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(4)]
    keys = _keys(out)
    assert len(keys) == 40 and len(set(keys)) == 40


@pytest.mark.timeout(180)
def test_two_real_concurrent_packs_leave_one_whole_pack(tmp_path):
    """Two real packs started together: each ends refused (busy, one line) or done,
    at least one is done, and the folder holds whole packs only."""
    import subprocess
    import sys

    folder = _write_folder(tmp_path / "imgs")
    out = tmp_path / "shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "vqkit", "pack", str(folder), "--out", str(out)]
    procs = [
        subprocess.Popen(
            [*cmd, "--overwrite", "--shard-size", str(k), "--seed", str(k)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for k in (2, 3)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for rc, err in results:  # (stderr may also hold the loader's grayscale warning)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        busy = last.startswith("vqkit pack: error: ") and "is in use by pid" in last
        assert rc == 0 or (rc == 2 and busy and "Traceback" not in err), err
    assert any(rc == 0 for rc, _ in results)
    for split, n in (("train", 12), ("test", 6)):
        entry = json.loads((out / "manifest.json").read_text())["splits"][split]
        names = sorted(p.name for p in out.glob(f"{split}-*.tar"))
        assert names == [s["name"] for s in entry["shards"]]
        keys = [k for p in names for k in _members(out / p) if not k.endswith(".cls")]
        assert len(keys) == n == entry["num_images"] and len(set(keys)) == n
