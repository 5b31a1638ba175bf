"""The tokenizer a prior models, and its data as index maps, encoded once and cached.

A tokenizer is a ``vqkit train`` run directory: its weights
(``checkpoints/best.pt``, else ``checkpoints/last.pt``, else ``model.safetensors``) and
``config.json``, whose ``"train"`` options name the data it was trained on. The prior
is tied to the exact weights file by its SHA-256: the train and test splits are encoded
into ``RUN_DIR/codes/<sha256[:16]>/{train,test}.npz`` (index maps and labels) the first
time and read back afterwards, and a prior refuses a tokenizer whose file hash differs
from the one it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import epoch_permutation
from ..models import VQVAE, load_model
from ..storage.fileio import atomic_write

__all__ = [
    "CHECKPOINT_NAMES",
    "CodeData",
    "SequenceLoader",
    "Tokenizer",
    "encode_data",
    "file_sha256",
    "find_checkpoint",
    "load_codes",
    "load_tokenizer",
]

# searched in this order; "best" = lowest eval NMSE of the tokenizer run
CHECKPOINT_NAMES = ("checkpoints/best.pt", "checkpoints/last.pt", "model.safetensors")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_checkpoint(run_dir: str | os.PathLike[str], name: str | None = None) -> Path:
    """The tokenizer's weights in ``run_dir``: ``name`` (relative to it) or the first of
    :data:`CHECKPOINT_NAMES` that exists; ValueError when there is none."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"tokenizer run directory not found: {run}")
    for rel in [name] if name else CHECKPOINT_NAMES:
        if (run / rel).is_file():
            return run / rel
    want = name or " or ".join(CHECKPOINT_NAMES)
    raise ValueError(f"{run} holds no tokenizer checkpoint ({want}); train one with vqkit train")


@dataclass
class Tokenizer:
    """A loaded tokenizer: the model (eval mode), where it came from, and its hash."""

    run_dir: Path
    checkpoint: Path
    sha256: str
    model: VQVAE
    run_config: dict[str, Any]

    @property
    def num_codes(self) -> int:
        return self.model.num_codes

    def describe(self) -> dict[str, Any]:
        """What a prior checkpoint records to find and check its tokenizer again."""
        return {
            "run_dir": str(self.run_dir.resolve()),
            "checkpoint": str(self.checkpoint.relative_to(self.run_dir)),
            "sha256": self.sha256,
            "num_codes": self.num_codes,
            "model_config": self.model.config.to_dict(),
        }


def load_tokenizer(
    run_dir: str | os.PathLike[str],
    *,
    checkpoint: str | None = None,
    device: torch.device | str = "cpu",
    expect_sha256: str | None = None,
) -> Tokenizer:
    """Load the tokenizer of a ``vqkit train`` run (see :func:`find_checkpoint`).

    ``expect_sha256``: the hash a prior was trained with; a different file is a
    ValueError (the prior's codes would mean other things)."""
    run = Path(run_dir)
    path = find_checkpoint(run, checkpoint)
    digest = file_sha256(path)
    if expect_sha256 is not None and digest != expect_sha256:
        raise ValueError(
            f"tokenizer mismatch: the prior was trained on a tokenizer with sha256 "
            f"{expect_sha256[:16]}..., but {path} has sha256 {digest[:16]}..."
        )
    model = load_model(path, map_location=device).to(device).eval()
    cfg_path = run / "config.json"
    run_config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return Tokenizer(run, path, digest, model, run_config)


@dataclass
class CodeData:
    """One split as index maps: ``codes`` int64 (N, *code_shape), ``labels`` int64 (N,)
    (zeros when the data has no classes), class names, and the split's name."""

    codes: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    split: str = ""

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def code_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[1:])

    def sequences(self) -> torch.Tensor:
        """(N, T) raster-ordered sequences (see :func:`vqkit.prior.flatten_codes`)."""
        return self.codes.reshape(len(self), -1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` atomically: the narrowest unsigned/signed int dtype holding
        the codes (uint16 up to 65536 codes), labels, classes, split."""
        hi = int(self.codes.max()) if len(self) else 0
        dtype = np.uint16 if hi < 1 << 16 else np.int32
        arrays = {
            "codes": self.codes.cpu().numpy().astype(dtype),
            "labels": self.labels.cpu().numpy().astype(np.int64),
            "classes": np.array(self.classes, dtype=str),
            "split": np.array(self.split),
        }

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
                np.savez(f, **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CodeData:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                torch.from_numpy(z["codes"].astype(np.int64)),
                torch.from_numpy(z["labels"].astype(np.int64)),
                tuple(str(c) for c in z["classes"]),
                str(z["split"]),
            )


@torch.no_grad()
def encode_data(
    model: VQVAE, images: Any, *, batch_size: int = 256, progress: bool = False
) -> CodeData:
    """Index maps of every image of an :class:`~vqkit.data.ImageData` split, in order."""
    from ..data import iterate_batches

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    batches = iterate_batches(images, batch_size, device=device)
    if progress:
        from tqdm.auto import tqdm

        total = -(-len(images) // batch_size)
        batches = tqdm(batches, total=total, desc=f"encode {images.split}", unit="batch")
    for x, _ in batches:
        parts.append(model.encode(x).cpu())
    model.train(was_training)
    codes = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return CodeData(codes, images.labels.clone(), tuple(images.classes), images.split)


def _load_images(tok: Tokenizer, data: str | None) -> tuple[Any, Any]:
    """The tokenizer's train split and its eval split (or the last 5% of train, as
    ``vqkit train`` does for a source without that split)."""
    from ..data import load_dataset

    train_cfg = tok.run_config.get("train", {})
    if data is None and not tok.run_config:
        raise ValueError(
            f"{tok.run_dir / 'config.json'} not found: the tokenizer's data is unknown "
            "(pass the dataset explicitly)"
        )
    source = data if data is not None else train_cfg.get("data")
    opts = {
        "image_size": tok.model.config.image_size,
        "channels": tok.model.config.in_channels,
        "cache_dir": train_cfg.get("cache_dir"),
        "format": train_cfg.get("data_format", "auto") if data is None else "auto",
    }
    train = load_dataset(source, "train", **opts)
    try:
        test = load_dataset(source, train_cfg.get("eval_split", "test"), **opts)
    except (FileNotFoundError, ValueError):
        n_eval = max(1, len(train) // 20)
        test = train.subset(slice(len(train) - n_eval, None))
        train = train.subset(slice(0, len(train) - n_eval))
    return train, test


def codes_dir(tok: Tokenizer) -> Path:
    """``RUN_DIR/codes/<sha256[:16]>``: the cache of this exact weights file."""
    return tok.run_dir / "codes" / tok.sha256[:16]


def load_codes(
    tok: Tokenizer,
    *,
    data: str | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[CodeData, CodeData, bool]:
    """(train, test, cached): the tokenizer's splits as index maps, from the cache when
    it holds them (``cached`` True), else encoded now and written there. ``data``
    overrides the dataset of the tokenizer's ``config.json`` (and is then not cached)."""
    where = codes_dir(tok)
    paths = where / "train.npz", where / "test.npz"
    if data is None and all(p.is_file() for p in paths):
        return CodeData.load(paths[0]), CodeData.load(paths[1]), True
    train_images, test_images = _load_images(tok, data)
    out = []
    for images in (train_images, test_images):
        out.append(encode_data(tok.model, images, batch_size=batch_size, progress=progress))
    if data is None:
        for split, path in zip(out, paths, strict=True):
            split.save(path)
    return out[0], out[1], False


class SequenceLoader:
    """Endless shuffled batches ``(codes (B, T), labels (B,))`` of one rank's shard.

    Epoch e visits ``epoch_permutation(N, seed, e)`` (regenerated from (seed, e), so the
    state is two ints: epoch and position); cut to a multiple of the world size W, rank r
    takes its elements r, r + W, ..., and a final partial batch is dropped. After
    ``position`` samples per rank, the first ``position * W`` elements of the epoch's
    order are consumed: a state resumes under another world size at that point."""

    def __init__(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.codes, self.labels = codes, labels
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = rank, world_size
        self.shard = len(codes) // world_size
        if self.shard < batch_size:
            raise ValueError(
                f"too few sequences ({len(codes)}) for batch_size {batch_size} per process "
                f"on {world_size} process(es)"
            )
        self.epoch, self.position = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, this rank's order)

    def _mine(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            perm = epoch_permutation(len(self.codes), self.seed, self.epoch)
            mine = perm[: self.shard * self.world][self.rank :: self.world]
            self._order = (self.epoch, mine.to(self.codes.device))
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > self.shard:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._mine()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.codes[idx], self.labels[idx]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world,
            "num_sequences": len(self.codes),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = int(state.get("num_sequences", len(self.codes)))
        if n != len(self.codes):
            raise ValueError(f"loader state is for {n} sequences; the data has {len(self.codes)}")
        saved_world = int(state.get("world_size", self.world))
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self.position = int(state["position"]) * saved_world // self.world
