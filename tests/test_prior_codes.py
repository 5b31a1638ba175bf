"""The tokenizer a prior models and its data as index maps: checkpoint lookup, the
hash-keyed code cache, the tokenizer-mismatch check, the .npz round trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.prior.codes import (
    CodeData,
    encode_data,
    file_sha256,
    find_checkpoint,
    load_codes,
    load_tokenizer,
)
from vqkit.storage.checkpoint import load_checkpoint, save_checkpoint

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

# a tokenizer that trains in a second: small widths, 3 steps, the built-in data
TOKENIZER_FLAGS = [
    "--steps", "3", "--batch-size", "16", "--log-every", "3", "--eval-every", "3",
    "--eval-images", "32", "--no-progress", "--seed", "1", "--hidden", "32",
    "--res-hidden", "8", "--res-layers", "1", "--num-embeddings", "32", "--embedding-dim", "8",
]  # fmt: skip


def make_tokenizer(out: Path, *extra: str) -> Path:
    """A ``vqkit train`` run in ``out`` (3 steps on the built-in Fashion-MNIST subset)."""
    from vqkit.cli import main

    assert main(["train", "--out", str(out), *TOKENIZER_FLAGS, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, one_thread_module):
    yield make_tokenizer(tmp_path_factory.mktemp("codes") / "tok")


def test_find_checkpoint_order_and_errors(tokenizer_run, tmp_path):
    assert find_checkpoint(tokenizer_run) == tokenizer_run / "checkpoints" / "best.pt"
    assert find_checkpoint(tokenizer_run, "checkpoints/last.pt").name == "last.pt"
    # the short names of the two trainer checkpoints
    assert find_checkpoint(tokenizer_run, "last") == tokenizer_run / "checkpoints" / "last.pt"
    assert find_checkpoint(tokenizer_run, "best") == tokenizer_run / "checkpoints" / "best.pt"
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(tokenizer_run / "model.safetensors", only)
    assert find_checkpoint(only) == only / "model.safetensors"
    tok = load_tokenizer(only)  # no config.json: the model file records its data
    assert tok.num_codes == 32 and tok.run_config == {} and tok.data["source"] == "builtin"
    assert not tok.is_run  # nothing is cached beside a lone model file
    from vqkit.models import export_safetensors

    export_safetensors(tok.model, only / "model.safetensors")  # without the record
    with pytest.raises(ValueError, match="records no training data; name the data with --data"):
        load_codes(load_tokenizer(only))
    with pytest.raises(ValueError, match="holds no tokenizer checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        find_checkpoint(tmp_path / "missing")


def test_codes_are_encoded_once_and_keyed_by_the_checkpoint_hash(tokenizer_run):
    tok = load_tokenizer(tokenizer_run)
    assert tok.sha256 == file_sha256(tokenizer_run / "checkpoints" / "best.pt")
    train, test, cached = load_codes(tok)
    assert not cached
    where = tokenizer_run / "codes" / tok.sha256[:16]
    assert (where / "train.npz").is_file() and (where / "test.npz").is_file()
    assert train.codes.shape == (5000, 7, 7) and test.codes.shape == (1000, 7, 7)
    assert len(train.classes) == 10 and train.labels.shape == (5000,)
    with np.load(where / "train.npz") as z:
        assert z["codes"].dtype == np.uint16  # 32 codes: two bytes per index
    from vqkit.data import load_dataset, normalize

    images = load_dataset(None, "test")
    assert torch.equal(test.labels, images.labels)
    x = normalize(images.images[:5])
    assert torch.equal(test.codes[:5], tok.model.encode(x))

    train2, test2, cached = load_codes(tok)
    assert cached and torch.equal(train2.codes, train.codes)
    assert torch.equal(test2.labels, test.labels) and test2.classes == test.classes

    # other weights (here: the same weights saved again at another step) -> other hash,
    # other cache folder
    ckpt = load_checkpoint(tokenizer_run / "checkpoints" / "best.pt")
    save_checkpoint(tokenizer_run / "checkpoints" / "best.pt", {**ckpt, "step": 99})
    tok2 = load_tokenizer(tokenizer_run)
    assert tok2.sha256 != tok.sha256
    assert not load_codes(tok2)[2]
    assert (tokenizer_run / "codes" / tok2.sha256[:16] / "train.npz").is_file()


def test_tokenizer_mismatch_is_an_error(tokenizer_run):
    digest = file_sha256(find_checkpoint(tokenizer_run))
    assert load_tokenizer(tokenizer_run, expect_sha256=digest).sha256 == digest
    with pytest.raises(ValueError, match="tokenizer mismatch") as e:
        load_tokenizer(tokenizer_run, expect_sha256="0" * 64)
    assert "\n" not in str(e.value)


def test_code_data_round_trip(tmp_path):
    small = CodeData(torch.randint(0, 1000, (6, 2, 3)), torch.arange(6), ("a", "b"), "test")
    big = CodeData(torch.randint(0, 70000, (6, 2, 3, 2)), torch.zeros(6, dtype=torch.long))
    for d, dtype in ((small, np.uint16), (big, np.int32)):
        d.save(tmp_path / "x.npz")
        with np.load(tmp_path / "x.npz") as z:
            assert z["codes"].dtype == dtype
        back = CodeData.load(tmp_path / "x.npz")
        assert torch.equal(back.codes, d.codes) and torch.equal(back.labels, d.labels)
        assert back.classes == d.classes and back.split == d.split
    assert big.sequences().shape == (6, 12)
    assert big.sequences()[0, :2].tolist() == big.codes[0, 0, 0].tolist()  # stage order


def test_encode_data_keeps_order_and_labels(tokenizer_run):
    from vqkit.data import load_dataset

    tok = load_tokenizer(tokenizer_run)
    data = load_dataset(None, "test").subset(slice(0, 70))
    codes = encode_data(tok.model, data, batch_size=32)  # 3 batches, the last partial
    whole = encode_data(tok.model, data, batch_size=100)
    assert torch.equal(codes.codes, whole.codes) and torch.equal(codes.labels, data.labels)


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    with np.load(path) as z:
        arrays = dict(z)
    if how == "out_of_range":
        arrays["codes"] = arrays["codes"].copy()
        arrays["codes"].flat[0] = 32  # K = 32
    elif how == "object":
        arrays["codes"] = np.array([None] * len(arrays["labels"]), dtype=object)
    elif how == "bitflip":  # valid and in range, but not what was written
        arrays["labels"] = (arrays["labels"] + 1) % 10
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("how", ["truncated", "out_of_range", "object", "bitflip"])
def test_damaged_code_cache_is_named_and_rebuilt(tokenizer_run, how, capsys):
    tok = load_tokenizer(tokenizer_run)
    train, _, _ = load_codes(tok)  # fills (or reads) the cache
    where = tokenizer_run / "codes" / tok.sha256[:16]
    _damage(where / "train.npz", how)
    capsys.readouterr()
    again, _, cached = load_codes(tok)
    err = capsys.readouterr().err
    assert not cached and f"{where / 'train.npz'}" in err and "encoding again" in err
    assert err.count("\n") == 1 and f"rm -r {where}" in err
    assert torch.equal(again.codes, train.codes) and torch.equal(again.labels, train.labels)
    assert load_codes(tok)[2]  # rewritten: the next run reads it


def test_the_pin_is_a_copy_a_cp_over_best_cannot_change(tokenizer_run, tmp_path):
    """issue 36: the pin was a hard link to best.pt, so ``torch.save`` or ``cp`` over
    best.pt (both write the file in place) rewrote the prior's weights too."""
    import os

    run = tmp_path / "run"
    shutil.copytree(tokenizer_run, run, ignore=shutil.ignore_patterns("codes"))
    best = run / "checkpoints" / "best.pt"
    tok = load_tokenizer(run, pin=tmp_path / "pin")
    assert tok.pinned is not None and tok.pinned.stat().st_nlink == 1
    assert not os.path.samefile(tok.pinned, best)
    pinned_bytes = tok.pinned.read_bytes()
    # the user's torch.save over best.pt: written in place, same inode
    ckpt = load_checkpoint(best)
    with open(best, "r+b") as f:
        torch.save({**ckpt, "step": 1234}, f)
    assert tok.pinned.read_bytes() == pinned_bytes
    again = load_tokenizer(run, expect_sha256=tok.sha256, pinned=tok.pinned)
    assert again.sha256 == tok.sha256
    # the pin damaged too: the advice names no weights that no longer exist
    tok.pinned.write_bytes(pinned_bytes[:-1] + b"x")
    with pytest.raises(ValueError, match="tokenizer mismatch") as e:
        load_tokenizer(run, expect_sha256=tok.sha256, pinned=tok.pinned)
    msg = str(e.value)
    assert "damaged" in msg and "no copy" in msg and "Restore that file" not in msg
    assert "\n" not in msg
    # the run's file still holds the weights: the advice says so
    shutil.copy(tokenizer_run / "checkpoints" / "best.pt", best)
    with pytest.raises(ValueError, match="tokenizer mismatch") as e:
        load_tokenizer(run, expect_sha256=tok.sha256, pinned=tok.pinned)
    assert f"{best} still holds them" in str(e.value)
