"""Tests of vqkit's traindata module: the run's data, in memory or streamed from shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.data import data_variance, load_dataset
from vqkit.data.pack import pack
from vqkit.training.data import VARIANCE_SAMPLES, is_streamed, load_run_data
from vqkit.training.tokenizer import TrainConfig

SMALL = dict(hidden=32, res_hidden=8, res_layers=1, num_embeddings=32, embedding_dim=8)


def image_folder(root: Path, per_class: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """A tiny PNG tree root/{split}/{class}/NNN.png of random colour images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def packed(tmp: Path, train: int = 24, test: int = 4, shard_size: int = 8) -> Path:
    """Shards of a written image folder: train (2 x ``train`` images) and test splits."""
    src = image_folder(tmp / "folder", {"train": train, "test": test})
    out = tmp / "shards"
    pack(src, out, shard_size, split="train")
    pack(src, out, shard_size, split="test")
    return out


def test_shards_are_streamed_and_evaluated_on_their_test_split(tmp_path):
    src = packed(tmp_path)
    cfg = TrainConfig(data=str(src), batch_size=8, image_size=8, crop="random", num_workers=0)
    assert is_streamed(cfg)
    run = load_run_data(cfg)
    assert run.train is None and run.shards is not None and run.shards.num_images == 48
    assert run.image_size == 8 and run.channels == 3
    assert len(run.eval_data) == 8 and run.eval_data.images.shape[1:] == (3, 8, 8)
    assert run.describe_train["format"] == "shards"
    assert run.describe_train["variance_samples"] == VARIANCE_SAMPLES
    # all 48 images are within the sample: the exact variance of the centre crops
    exact = data_variance(load_dataset(str(src), "train", image_size=8))
    assert run.data_variance == pytest.approx(exact, rel=1e-12)
    loader = run.loader(cfg, seed=0, device=torch.device("cpu"))
    x, _ = loader.next_batch()
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32


def test_holdout_is_the_last_train_shard(tmp_path):
    src = packed(tmp_path)
    cfg = TrainConfig(data=str(src), eval_split="holdout", batch_size=8, num_workers=0)
    run = load_run_data(cfg)
    assert run.shards is not None and run.shards.num_shards == 5
    assert len(run.eval_data) == 8 and run.image_size == 12
    with pytest.raises(ValueError, match="not a split"):
        load_run_data(cfg.replace(eval_split="val"))


def test_random_crop_needs_shards_and_a_size(tmp_path):
    with pytest.raises(ValueError, match="shard data"):
        load_run_data(TrainConfig(crop="random", image_size=16))
    src = packed(tmp_path, train=4, test=1)
    with pytest.raises(ValueError, match="needs image_size"):
        load_run_data(TrainConfig(data=str(src), crop="random", num_workers=0))
