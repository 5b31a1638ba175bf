"""Fault injection (issue 15, "nothing silently wrong"): one test per bad input or failing
resource, each asserting a clear one-line error (or an honest report) instead of a silently
wrong result. File writes and run directories: test_fileio.py and test_rundir.py."""

from __future__ import annotations

import errno
import os
import struct
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit import data as vd
from vqkit.models import export_safetensors, load_model
from vqkit.search import nearest_code
from vqkit.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

Image = pytest.importorskip("PIL.Image")

# what `vqkit` (cli.main) turns into a one-line "error: ..." instead of a traceback
CLI_CAUGHT = (CheckpointError, FileNotFoundError, FileExistsError, ValueError, TypeError)
SMALL = dict(hidden=16, res_hidden=4, res_layers=1, num_embeddings=8, embedding_dim=4)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "default-cache"))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------- search


def test_nan_code_in_codebook_is_an_error():
    x, e = torch.randn(6, 4), torch.randn(5, 4)
    e[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"codebook has NaN or Inf in 1 of 5 codebook rows \(3\)"):
        nearest_code(x, e)
    e[3, 1] = float("-inf")
    with pytest.raises(ValueError, match="codebook rows"):
        nearest_code(x, e, backend="auto")  # FAISS too, when installed


def test_nan_or_inf_query_is_an_error():
    x, e = torch.randn(6, 4, dtype=torch.float16), torch.randn(5, 4)
    x[2, 0] = float("inf")
    x[4, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x has NaN or Inf in 2 of 6 query rows \(2, 4\)"):
        nearest_code(x, e)
    # the check can be switched off by a caller that has checked already
    idx, dist = nearest_code(x, e, check_finite=False)
    assert idx.shape == (6,) and torch.isfinite(dist[[0, 1, 3, 5]]).all()


# ---------------------------------------------------------------------------- checkpoints


def _model():
    from vqkit.models import VQVAE

    torch.manual_seed(0)
    return VQVAE(**SMALL)


def test_checkpoint_with_nan_weight_names_the_tensor(tmp_path):
    model = _model()
    state = model.state_dict()
    state["quantizer.codebook"][2, 1] = float("nan")
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model": state})
    with pytest.raises(CheckpointError, match="quantizer.codebook") as e:
        load_checkpoint(path)
    assert str(path) in _one_line(e)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(path)
    assert load_checkpoint(path, check_finite=False)["model"]["quantizer.codebook"].isnan().any()


def test_checkpoint_with_inf_optimizer_state_names_it(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    osd = opt.state_dict()
    osd["state"][0]["exp_avg"].view(-1)[0] = float("inf")
    path = tmp_path / "last.pt"
    payload = {"model_config": model.config.to_dict(), "model": model.state_dict()}
    save_checkpoint(path, {**payload, "optimizer": osd})
    with pytest.raises(CheckpointError, match=r"optimizer\.state\.0\.exp_avg"):
        load_checkpoint(path)


def test_safetensors_with_nan_weight_names_the_tensor(tmp_path):
    model = _model()
    with torch.no_grad():
        model.quantizer.codebook[0, 0] = float("inf")
    path = tmp_path / "model.safetensors"
    export_safetensors(model, path)
    with pytest.raises(CheckpointError, match=f"{path}: non-finite .*quantizer.codebook"):
        load_model(path)


def test_disk_full_while_saving_checkpoint_keeps_old_one(tmp_path, monkeypatch):
    model = _model()
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model_config": model.config.to_dict(), "model": model.state_dict()})
    before = path.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # most of it got written...
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk filled

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device") as e:
        save_checkpoint(path, {"model_config": model.config.to_dict(), "model": {}})
    assert str(path) in _one_line(e)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp left
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["model_config"] == model.config.to_dict()


def test_exported_weights_get_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        export_safetensors(_model(), tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- plots


def test_usage_histogram_has_no_bars_for_unused_codes(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from vqkit.evaluation import plots

    figs = []
    monkeypatch.setattr(plots, "_save_fig", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(plots._pyplot(), "close", lambda fig: None)
    counts = [0, 5, 0, 120, 0, 0, 1, 0]  # 3 used, 5 unused
    plots.plot_usage(counts, tmp_path / "usage.png")
    ax = figs[0].axes[0]
    heights = sorted(b.get_height() for b in ax.containers[0])
    assert heights == [1, 5, 120]  # one bar per used code, none drawn for a count of 0
    assert "5 unused" in ax.get_title()


# ---------------------------------------------------------------------------- data


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_mixed_gray_and_rgb_folder_loads_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, 6, 6), dtype=np.uint8)
    rgb = rng.integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
    _save(gray[0], tmp_path / "m" / "a.png")  # the first file is gray
    _save(gray[1], tmp_path / "m" / "b.png")
    _save(rgb[0], tmp_path / "m" / "c.png")
    for attempt in ("decode", "cache hit"):
        with pytest.warns(UserWarning, match="2 of 3 images are grayscale and were converted"):
            d = vd.load_dataset(tmp_path / "m", cache_dir=tmp_path / "c")
        assert d.channels == 3 and d.converted == 2, attempt
        assert d.describe()["converted"] == 2
        for c in range(3):  # gray -> RGB repeats the channel, exactly
            assert np.array_equal(d.images[0, c].numpy(), gray[0])
        assert np.array_equal(d.images[2].numpy(), rgb[0].transpose(2, 0, 1))
    g = vd.load_dataset(tmp_path / "m", channels=1, cache_dir=tmp_path / "c")
    assert g.channels == 1 and g.converted == 1  # the RGB one, converted on request


def test_oversized_image_in_dataset_names_the_file(tmp_path):
    _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "big" / "a.png")
    bomb = _bomb_png(tmp_path / "big" / "b.png")
    with pytest.raises(ValueError, match="image too large to decode") as e:
        vd.load_dataset(tmp_path / "big", cache_dir=tmp_path / "c")
    assert str(bomb) in _one_line(e)


def test_oversized_single_image_read_names_the_file(tmp_path):
    bomb = _bomb_png(tmp_path / "huge.png")
    with pytest.raises(ValueError, match="image too large") as e:
        vd.read_image(bomb, 3, 32)
    assert str(bomb) in _one_line(e)
    _save(np.full((8, 12), 7, np.uint8), tmp_path / "ok.png")
    t = vd.read_image(tmp_path / "ok.png", 3, 4)
    assert t.shape == (3, 4, 4) and t.dtype == torch.uint8 and (t == 7).all()
    assert vd.read_image(tmp_path / "ok.png").shape == (1, 8, 12)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        vd.read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        vd.read_image(tmp_path / "junk.png")


def _bomb_png(path: Path) -> Path:
    """A PNG whose header says 20000 x 20000 (Pillow refuses it before decoding)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def _offline(monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(vd.cifar.urllib.request, "urlopen", refuse)


def test_cifar10_offline_is_a_one_line_error_the_cli_catches(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(vd.DatasetDownloadError) as e:
        vd.load_dataset("cifar10", cache_dir=tmp_path / "c")
    assert isinstance(e.value, CLI_CAUGHT)
    msg = _one_line(e)
    assert "could not download" in msg and str(tmp_path / "c" / "cifar-10-python.tar.gz") in msg
    assert list((tmp_path / "c").iterdir()) == []  # no partial download left


def test_unknown_split_lists_available_splits(tmp_path, monkeypatch):
    _offline(monkeypatch)  # a bad split name must fail before any download
    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "val" / "cat").mkdir(parents=True)
    _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "tree" / "train" / "cat" / "a.png")
    _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "tree" / "val" / "cat" / "b.png")
    _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "flat" / "a.png")
    cases = {
        None: ["test", "train"],
        "cifar10": ["test", "train"],
        tmp_path / "tree": ["train", "val"],
        tmp_path / "flat": ["train"],
    }
    for source, splits in cases.items():
        assert vd.available_splits(source) == splits, source
        with pytest.raises(ValueError) as e:
            vd.load_dataset(source, "bogus", cache_dir=tmp_path / "c")
        msg = _one_line(e)
        assert "'bogus'" in msg and all(f"'{s}'" in msg or s in msg for s in splits), msg


# --------------------------------------------------------------- trainer and CLI (main)

TINY_FLAGS = ["--hidden", "16", "--res-hidden", "4", "--res-layers", "1"]
TINY_FLAGS += ["--num-embeddings", "8", "--embedding-dim", "4", "--batch-size", "8"]
TINY_FLAGS += ["--log-every", "2", "--eval-every", "4", "--eval-images", "16", "--no-progress"]


def _train(out: Path, *extra: str) -> int:
    from vqkit.cli import main

    return main(["train", "--out", str(out), *TINY_FLAGS, *extra])


def _records(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_a_new_lr_applies_it_and_reports_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "2", "--lr", "1e-3") == 0
    # only the flags that change something: the model options come from the run
    assert _train(out, "--steps", "4", "--lr", "5e-2", "--resume") == 0
    assert "resume: lr 0.001 -> 0.05 (applied)" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4 and ckpt["train_config"]["lr"] == 0.05
    assert all(g["lr"] == 0.05 for g in ckpt["optimizer"]["param_groups"])
    resume = [r for r in _records(out) if r["kind"] == "resume"]
    assert resume[0]["changes"] == {
        "lr": {"from": 0.001, "to": 0.05},
        "steps": {"from": 2, "to": 4},
    }


def test_resume_refuses_to_change_what_shaped_the_state(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 0
    assert _train(out, "--steps", "4", "--resume", "--num-embeddings", "16") == 2
    err = capsys.readouterr().err
    assert "cannot change num_embeddings (8 -> 16)" in err and err.count("\n") == 1


def test_unknown_eval_split_lists_the_splits(tmp_path, capsys):
    assert _train(tmp_path / "run", "--steps", "1", "--eval-split", "bogus") == 2
    assert "choose one of ['test', 'train', 'holdout']" in capsys.readouterr().err


def test_a_second_trainer_on_a_run_in_use_is_refused(tmp_path):
    from vqkit.storage.rundir import RunDirBusyError
    from vqkit.training.tokenizer import TrainConfig, Trainer

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=1, progress=False, **SMALL)
    first = Trainer(cfg)
    try:
        with pytest.raises(RunDirBusyError, match="in use by pid"):
            Trainer(cfg, overwrite=True)
    finally:
        first.close()
    Trainer(cfg, overwrite=True).close()  # released: the next one may start


def test_overwrite_starts_clean_and_resume_truncates_the_metrics(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--steps", "4") == 0
    assert _train(out, "--steps", "2", "--overwrite") == 0
    assert max(r["step"] for r in _records(out)) == 2  # nothing of the old run appended
    with open(out / "metrics.jsonl", "a") as f:  # a kill -9 after logging step 3
        f.write('{"kind": "train", "step": 3}\n{"kind": "tra')
    assert _train(out, "--steps", "4", "--resume") == 0
    steps = [r["step"] for r in _records(out) if r["kind"] == "train"]
    assert steps == [2, 4]


def test_encode_keeps_same_named_images_apart(tmp_path, capsys):
    from vqkit.cli import main

    out = tmp_path / "run"
    assert _train(out, "--steps", "1") == 0
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        Image.new("L", (28, 28), 40 if d == "a" else 200).save(tmp_path / d / "img.png")
    model = str(out / "model.safetensors")
    codes = tmp_path / "codes"
    assert main(["encode", model, str(tmp_path / "a/img.png"), str(tmp_path / "b/img.png"),
                 "--out", str(codes)]) == 0  # fmt: skip
    assert (codes / "a" / "img.npy").is_file() and (codes / "b" / "img.npy").is_file()
    Image.new("L", (28, 28)).save(tmp_path / "a" / "img.jpg")
    assert main(["encode", model, str(tmp_path / "a/img.png"), str(tmp_path / "a/img.jpg"),
                 "--out", str(codes)]) == 2  # fmt: skip
    assert "would both be written" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(0,), (0, 0), (1, 0, 7)])
def test_decode_of_an_empty_index_map_is_an_error(tmp_path, capsys, shape):
    from vqkit.cli import main

    out = tmp_path / "run"
    assert _train(out, "--steps", "1") == 0
    np.save(tmp_path / "empty.npy", np.zeros(shape, dtype=np.int64))
    rc = main(["decode", str(out / "model.safetensors"), str(tmp_path / "empty.npy"),
               "--out", str(tmp_path / "dec")])  # fmt: skip
    assert rc == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "dec").exists() or not any((tmp_path / "dec").iterdir())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "bogus"], "device must be"),
        (["--device", "meta"], "device must be"),
        (["--commitment-cost", "inf"], "commitment_cost must be a finite number"),
        (["--lr", "inf"], "lr must be a finite number"),
        (["--quantizer", "fsq", "--decay", "0.9"], "decay, num_embeddings do not apply to"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_data(tmp_path, capsys, flags, message):
    assert _train(tmp_path / "run", "--steps", "1", "--data", "/nonexistent", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_steps_zero_lists_only_files_it_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "0") == 0
    listed = capsys.readouterr().out.splitlines()[-1].split(": ", 1)[1].split()
    assert listed and all((out / name).is_file() for name in listed)


def test_quantizer_level_faults():
    from vqkit import FSQ, ResidualVQ, VectorQuantizer, VectorQuantizerEMA
    from vqkit.quantizers import output

    with pytest.raises(ValueError, match="finite"):
        VectorQuantizer(8, 4, commitment_cost=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        VectorQuantizerEMA(8, 4, commitment_cost=float("inf"))
    with pytest.raises(ValueError, match=r"levels \[5, 4\] but this FSQ has \[4, 5\]"):
        FSQ([4, 5]).load_state_dict(FSQ([5, 4]).state_dict())
    r = ResidualVQ(2, 8, 4).train()
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3)]:
        out = r(torch.randn(*shape))
        assert out.indices.shape == (shape[0], *shape[2:], 2)
    vq = VectorQuantizer(8, 4)
    assert vq.decode(torch.tensor([[1, 2]], dtype=torch.int8)).shape == (1, 4, 2)
    big = VectorQuantizer(2**20, 2).eval()(torch.randn(1, 2, 32, 32))  # N = 1024: 4 GiB
    with pytest.raises(MemoryError, match="use out.indices"):
        big.encodings  # noqa: B018  (2 GiB one-hot: refused before allocating)
    assert output.MAX_ENCODINGS_BYTES == 2**31


def test_a_ctrl_c_during_the_checkpoint_write_is_reported_not_fatal(capsys):
    import signal

    from vqkit.runtime.interrupt import no_interrupt

    with no_interrupt("writing the checkpoint"):
        os.kill(os.getpid(), signal.SIGINT)  # must not raise KeyboardInterrupt here
    assert "writing the checkpoint" in capsys.readouterr().out


def test_dist_timeout_is_an_option_with_a_default():
    from vqkit.training.config import TrainConfig

    assert TrainConfig().dist_timeout == 600.0
    with pytest.raises(ValueError, match="dist_timeout must be > 0"):
        TrainConfig(dist_timeout=0.0)


# ------------------------------------------- a REAL full disk (issue 21 item 7): every writer


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (root can mount one); skipped where mounting is
    refused (not root, no CAP_SYS_ADMIN): test_every_writer_under_a_file_size_limit then
    covers the same mapping with RLIMIT_FSIZE."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _writers():
    """(name, write(path, big)) for every writer vqkit has: big=False writes a small old
    version (fits in 1 MiB), big=True a new one of more than 1 MiB."""
    from vqkit.data.pack import pack
    from vqkit.evaluation.plots import save_images
    from vqkit.models.codes_io import save_codes
    from vqkit.prior.codes import CodeData

    g = torch.Generator().manual_seed(0)

    def checkpoint(path, big):
        save_checkpoint(
            path, {"model_config": {}, "model": {"w": torch.randn(300_000 if big else 10)}}
        )

    def safetensors(path, big):
        model = load_model_like(big)
        export_safetensors(model, path)

    def shards(path, big):
        n = 400 if big else 4
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        pack(vd.ImageData(images, torch.zeros(n, dtype=torch.long)), path, 1000, overwrite=True)

    def code_cache(path, big):
        shape = (1000, 25, 25) if big else (2, 2, 2)
        CodeData(torch.randint(0, 1000, shape, generator=g), torch.zeros(shape[0])).save(path)

    def index_map(path, big):
        save_codes(path, np.zeros(200_000 if big else 4, dtype=np.int64), {"tokenizer": "x"})

    def sample_png(path, big):
        side = 1024 if big else 8
        save_images(torch.rand(1, 3, side, side, generator=g) - 0.5, [path])

    return [
        ("checkpoint", "last.pt", checkpoint),
        ("safetensors", "model.safetensors", safetensors),
        ("shards", "shards", shards),
        ("code cache", "train.npz", code_cache),
        ("index map", "sample_0000.npy", index_map),
        ("sample image", "sample_0000.png", sample_png),
    ]


def load_model_like(big: bool):
    from vqkit.models import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(in_channels=1, image_size=28, **({**SMALL, "hidden": 256} if big else SMALL))
    return VQVAE(cfg)


def _old_bytes(target: Path) -> dict[str, bytes]:
    files = target.rglob("*") if target.is_dir() else [target]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize("case", range(6), ids=[w[0] for w in _writers()])
def test_every_writer_on_a_real_full_disk(tiny_disk, case):
    """torch.save raises "RuntimeError: [enforce fail at inline_container.cc] ... unexpected
    pos" on a full disk, safetensors a SafetensorError: every writer still gives "no space
    left on device writing PATH" in one line, keeps the old file and leaves no temp."""
    from vqkit.storage.fileio import DiskFullError

    name, target, write = _writers()[case]
    path = tiny_disk / target
    write(path, False)
    before = _old_bytes(path)
    with pytest.raises((DiskFullError, CheckpointError)) as e:
        write(path, True)
    msg = _one_line(e)
    assert "no space left on device writing" in msg and str(tiny_disk) in msg, msg
    assert _old_bytes(path) == before
    left = [p.name for p in tiny_disk.rglob("*") if p.name.endswith(".tmp")]
    assert not left, left


_FSIZE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
import torch
from vqkit.storage.checkpoint import CheckpointError, save_checkpoint
from vqkit.storage.fileio import DiskFullError
from vqkit.models.codes_io import save_codes
import numpy as np
big = {"model_config": {}, "model": {"w": torch.randn(100_000)}}
for write in (
    lambda: save_checkpoint(sys.argv[1] + "/a.pt", big),
    lambda: save_codes(sys.argv[1] + "/a.npy", np.zeros(100_000, dtype=np.int64), {}),
):
    try:
        write()
    except (CheckpointError, DiskFullError) as e:
        print(e)
"""


def test_every_writer_under_a_file_size_limit(tmp_path):
    """The same mapping without root: RLIMIT_FSIZE (ulimit -f) in a subprocess; torch's
    RuntimeError carries no errno, the temp file's size at the limit says what happened."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FSIZE, str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr[-2000:]
    assert "file too large for the file-size limit writing" in lines[0] and "a.pt" in lines[0]
    assert "file too large for the file-size limit writing" in lines[1] and "a.npy" in lines[1]
    assert not list(tmp_path.iterdir())  # no temp left, no partial file


def test_pack_on_a_full_disk_is_one_line_from_the_cli(tiny_disk, capsys):
    from vqkit.cli import main

    assert main(["pack", "builtin", "--out", str(tiny_disk / "shards"), "--splits", "train"]) == 2
    err = capsys.readouterr().err
    assert "no space left on device writing" in err and err.count("\n") == 1, err
    assert not [p for p in (tiny_disk / "shards").iterdir() if p.name.endswith(".tmp")]
