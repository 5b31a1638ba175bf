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
from vqkit.checkpoint import (
    CheckpointError,
    export_safetensors,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from vqkit.search import nearest_code

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
    from vqkit import plots

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
