"""The tokenizer a prior models, and its data as index maps, encoded once and cached.

A tokenizer is a ``vqkit train`` run directory (its weights: ``checkpoints/best.pt``,
else ``checkpoints/last.pt``, else ``model.safetensors``) or a ``vqkit export``
directory (``model.safetensors``). Its data is the one its weights record
(:mod:`vqkit.data.reference`; a checkpoint: its run's ``"train"`` options), refused in
one line when there is none and ``data`` is not given: never the built-in set in its
place. The prior is tied to the exact weights file by its SHA-256: a run's train and
test splits are encoded into ``RUN_DIR/codes/<sha256[:16]>/{train,test}.npz`` (index
maps and labels) the first time and read back afterwards (an export directory is not a
run: nothing is cached there), and a prior refuses a tokenizer whose file hash differs
from the one it was trained on.

The prior keeps the exact weights it was trained on: :func:`load_tokenizer` with ``pin``
copies the weights file into ``PRIOR_DIR/tokenizer/<sha256[:16]><suffix>`` first (a
copy, not a hard link: ``cp`` and ``torch.save`` over ``best.pt`` write that file in
place, and would rewrite a link too) and loads, hashes and records that copy, so a
tokenizer run that goes on training, is resumed, overwritten or deleted leaves the
prior usable; ``vqkit sample`` loads the pinned copy, checked against the recorded
hash. A tokenizer run still locked by its trainer gets a warning
(:func:`tokenizer_in_use`).

A cached split is verified before use (:func:`read_cached_codes`): readable, integer,
the tokenizer's code shape, every index in ``[0, K)``, labels matching, and the SHA-256
recorded in ``RUN_DIR/codes/<hash>/checksums.json`` when it was written; a damaged file
is named in a warning and encoded again.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import epoch_permutation
from ..data.reference import (
    check_reference,
    data_reference,
    load_reference,
    reference_from_train_config,
)
from ..errors import UserError
from ..models import VQVAE, AudioCodec, load_any
from ..storage.fileio import atomic_write, file_hexdigest, loads_json, write_json
from ..storage.rundir import RunDir

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
    "pin_weights",
    "read_cached_codes",
    "tokenizer_in_use",
]

PIN_DIR = "tokenizer"
"""Where a prior keeps its tokenizer's weights: ``PRIOR_DIR/tokenizer/``."""

# searched in this order; "best" = lowest eval NMSE of the tokenizer run
CHECKPOINT_NAMES = ("checkpoints/best.pt", "checkpoints/last.pt", "model.safetensors")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    return file_hexdigest(path, "sha256")


def find_checkpoint(run_dir: str | os.PathLike[str], name: str | None = None) -> Path:
    """The tokenizer's weights in ``run_dir``: ``name`` (relative to it; ``best`` and
    ``last`` mean ``checkpoints/best.pt`` and ``checkpoints/last.pt``) or the first of
    :data:`CHECKPOINT_NAMES` that exists; ValueError when there is none."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"tokenizer run directory not found: {run}")
    if name in ("best", "last"):
        name = f"checkpoints/{name}.pt"
    for rel in [name] if name else CHECKPOINT_NAMES:
        if (run / rel).is_file():
            return run / rel
    want = name or " or ".join(CHECKPOINT_NAMES)
    raise UserError(f"{run} holds no tokenizer checkpoint ({want}); train one with vqkit train")


@dataclass
class Tokenizer:
    """A loaded tokenizer: the model (eval mode), where it came from, and its hash."""

    run_dir: Path
    checkpoint: Path
    sha256: str
    model: VQVAE | AudioCodec
    run_config: dict[str, Any]
    pinned: Path | None = None  # the copy the prior keeps (loaded instead of checkpoint)
    data: dict[str, Any] | None = None  # its record of its training data; None: unknown

    @property
    def num_codes(self) -> int:
        return self.model.num_codes

    @property
    def is_audio(self) -> bool:
        """A speech codec (:mod:`vqkit.prior.audio_codes` makes its codes), not an image
        tokenizer."""
        return isinstance(self.model, AudioCodec)

    @property
    def is_run(self) -> bool:
        """Whether ``run_dir`` is a ``vqkit train`` run (where codes are cached), not an
        export directory."""
        return "train" in self.run_config

    @property
    def scales(self) -> list[int]:
        """The sides of the tokenizer's square code groups, coarse to fine (the quantizer
        contract's ``code_group_shapes``); empty for a tokenizer of one group."""
        if self.is_audio:  # frames of Q codes: one group
            return []
        side = self.model.config.image_size // self.model.config.downsample
        shapes = self.model.quantizer.code_group_shapes((side, side))
        if not shapes:
            return []
        if any(len(g) != 2 or g[0] != g[1] for g in shapes):
            raise UserError(f"code groups {shapes}: a next-scale prior takes square scales")
        return [int(g[0]) for g in shapes]

    def describe(self) -> dict[str, Any]:
        """What a prior checkpoint records to find and check its tokenizer again."""
        return {
            "run_dir": str(self.run_dir.resolve()),
            "checkpoint": str(self.checkpoint.relative_to(self.run_dir)),
            "sha256": self.sha256,
            # relative to the prior run directory: PRIOR_DIR/tokenizer/<name>
            "pinned": f"{PIN_DIR}/{self.pinned.name}" if self.pinned is not None else None,
            "num_codes": self.num_codes,
            "modality": "audio" if self.is_audio else "image",
            "model_config": self.model.config.to_dict(),
        }


def tokenizer_in_use(run_dir: str | os.PathLike[str]) -> str | None:
    """Who holds ``run_dir``'s run lock (a trainer still writing checkpoints there), as
    "pid N on HOST"; None when nobody does."""
    return RunDir(run_dir).holder()


def pin_weights(path: str | os.PathLike[str], pin_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """(pinned copy, its sha256): ``path`` copied into ``pin_dir`` as
    ``<sha256[:16]><suffix>``. A copy, never a hard link: a link shares the bytes, so a
    ``cp`` or ``torch.save`` over ``path`` (both write in place) would rewrite the pin.
    A trainer replaces ``path`` atomically, so the copy holds the old or the new file
    whole; the hash is of the pinned bytes, and later loads check it."""
    src, pin = Path(path), Path(pin_dir)
    pin.mkdir(parents=True, exist_ok=True)
    tmp = pin / f".{src.name}.{os.getpid()}.{os.urandom(3).hex()}.tmp"
    try:
        shutil.copyfile(src, tmp)
        digest = file_sha256(tmp)
        target = pin / f"{digest[:16]}{src.suffix}"
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target, digest


def _mismatch(path: Path, want: str, got: str, origin: Path | None = None) -> ValueError:
    """The one-line error for weights of another hash than the prior's; ``origin``: the
    run's file when ``path`` is the prior's pinned copy (the advice names only weights
    that still exist)."""
    head = (
        f"tokenizer mismatch: the prior was trained on weights with sha256 {want[:16]}..., "
        f"but {path} has sha256 {got[:16]}..."
    )
    if origin is None:
        return UserError(
            f"{head} (the tokenizer run trained on or was resumed). Restore that file, or "
            "pass --tokenizer DIR holding the original weights, or train a new prior on the "
            "current tokenizer (priors keep a pinned copy in PRIOR_DIR/tokenizer/)"
        )
    if origin.is_file() and file_sha256(origin) == want:
        return UserError(
            f"{head}: the prior's pinned copy is damaged; {origin} still holds them: "
            f"copy it over {path}"
        )
    return UserError(
        f"{head}: the prior's pinned copy is damaged, and {origin} holds no copy of those "
        "weights either; pass --tokenizer DIR holding them (a backup), or train a new prior"
    )


def load_tokenizer(
    run_dir: str | os.PathLike[str],
    *,
    checkpoint: str | None = None,
    device: torch.device | str = "cpu",
    expect_sha256: str | None = None,
    pin: str | os.PathLike[str] | None = None,
    pinned: str | os.PathLike[str] | None = None,
) -> Tokenizer:
    """Load the tokenizer of a ``vqkit train`` run (see :func:`find_checkpoint`).

    ``expect_sha256``: the hash a prior was trained with; a different file is a
    ValueError (the prior's codes would mean other things) saying how to recover.
    ``pin``: a directory to pin the weights in first (:func:`pin_weights`); the model
    and hash are then those of the pinned copy. ``pinned``: a copy pinned earlier,
    loaded instead of the run's file when it exists (the run directory may be gone)."""
    run = Path(run_dir)
    from_pin = pinned is not None and Path(pinned).is_file()
    if from_pin:
        path, origin = Path(pinned), run / (checkpoint or CHECKPOINT_NAMES[0])
        digest = file_sha256(path)
    else:
        origin = find_checkpoint(run, checkpoint)
        path, digest = pin_weights(origin, pin) if pin is not None else (origin, "")
        digest = digest or file_sha256(path)
    if expect_sha256 is not None and digest != expect_sha256:
        if path != origin and not from_pin:
            path.unlink(missing_ok=True)  # pinned just now, and not the prior's weights
        if not from_pin:
            raise _mismatch(origin, expect_sha256, digest)
        raise _mismatch(path, expect_sha256, digest, origin)
    model = load_any(path, map_location=device).to(device).eval()
    cfg_path = run / "config.json"
    run_config = loads_json(cfg_path.read_text()) if cfg_path.is_file() else {}
    keep = path if path != origin else None
    data = getattr(model, "pretrained_info", {}).get("data")
    audio = isinstance(model, AudioCodec)  # its clips: vqkit.prior.audio_codes
    if data is None and not audio and isinstance(run_config.get("train"), dict):
        size, channels = model.config.image_size, model.config.in_channels
        data = reference_from_train_config(run_config["train"], image_size=size, channels=channels)
    return Tokenizer(run, origin, digest, model, run_config, keep, data)


@dataclass
class CodeData:
    """One split as index maps: ``codes`` int64 (N, *code_shape), ``labels`` int64 (N,)
    (zeros when the data has no classes), class names, and the split's name."""

    codes: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    split: str = ""
    data: dict[str, Any] | None = None  # the record of the images (not saved)

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


def _data_of(tok: Tokenizer, data: str | None) -> dict[str, Any]:
    """The record of the images to encode: ``data`` (the tokenizer's eval split rule),
    else the tokenizer's own; a one-line UserError when it records none."""
    if data is None:
        return check_reference(tok.data, f"tokenizer {tok.checkpoint}")
    cfg = tok.model.config
    split = (tok.data or {}).get("eval_split", "test")
    size, channels = cfg.image_size, cfg.in_channels
    return data_reference(data, image_size=size, channels=channels, eval_split=split)


def _load_images(tok: Tokenizer, ref: dict[str, Any], given: bool) -> tuple[Any, Any, str]:
    """(train split, eval split, its name) of the record (the eval split: the run's,
    or held out of train, as ``vqkit train`` does; :func:`vqkit.data.reference.load_reference`)."""
    where, cache = f"tokenizer {tok.checkpoint}", tok.run_config.get("train", {}).get("cache_dir")
    train, _ = load_reference(ref, "train", cache_dir=cache, where=where, given=given)
    test, split = load_reference(ref, None, cache_dir=cache, where=where, given=given)
    return train, test, split


def codes_dir(tok: Tokenizer) -> Path:
    """``RUN_DIR/codes/<sha256[:16]>``: the cache of this exact weights file."""
    return tok.run_dir / "codes" / tok.sha256[:16]


CHECKSUMS = "checksums.json"


def _expected_shape(tok: Tokenizer) -> tuple[int, ...]:
    # the tokenizer's own (h, w), (h, w, Q) or multi-scale (L,)
    return tuple(tok.model.code_shape)


def read_cached_codes(path: Path, tok: Tokenizer) -> CodeData:
    """A cached split, verified: its SHA-256 against ``checksums.json`` beside it (when
    recorded), readable without pickles, integer codes of the tokenizer's code shape with
    every index in ``[0, K)``, one integer label per map. ValueError naming ``path`` and
    what is wrong otherwise."""
    sums_path = path.parent / CHECKSUMS
    try:
        sums = loads_json(sums_path.read_text()) if sums_path.is_file() else {}
    except (OSError, ValueError):
        sums = {}
    want = sums.get(path.name) if isinstance(sums, dict) else None
    if want is not None and file_sha256(path) != want:
        raise UserError(f"{path}: checksum differs from {CHECKSUMS} (a damaged file)")
    try:
        with np.load(path, allow_pickle=False) as z:
            codes, labels = z["codes"], z["labels"]
            classes, split = tuple(str(c) for c in z["classes"]), str(z["split"])
    except Exception as e:  # zip, pickle and key errors of a damaged archive
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    shape = _expected_shape(tok)
    if not np.issubdtype(codes.dtype, np.integer) or tuple(codes.shape[1:]) != shape:
        raise UserError(f"{path}: codes {codes.dtype} {codes.shape}, expected (N, *{shape})")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != codes.shape[:1]:
        raise UserError(f"{path}: labels {labels.dtype} {labels.shape} do not fit the codes")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= tok.num_codes):
        raise UserError(
            f"{path}: indices {int(codes.min())}..{int(codes.max())} outside [0, {tok.num_codes})"
        )
    return CodeData(
        torch.from_numpy(codes.astype(np.int64)),
        torch.from_numpy(labels.astype(np.int64)),
        classes,
        split,
    )


def load_codes(
    tok: Tokenizer,
    *,
    data: str | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[CodeData, CodeData, bool]:
    """(train, test, cached): the tokenizer's splits as index maps, from the cache when
    it holds them (``cached`` True), else encoded now and written there (a run only).
    ``data`` overrides the data the tokenizer records (and is then not cached); without
    it, a tokenizer that records none is a one-line UserError.
    A damaged cache file (:func:`read_cached_codes`) is named in a warning on stderr and
    the splits are encoded again and rewritten."""
    if tok.is_audio:
        raise UserError("a speech codec's codes: vqkit.prior.audio_codes.load_audio_codes")
    ref = _data_of(tok, data)
    cache = data is None and tok.is_run  # an export directory is not written into
    where = codes_dir(tok)
    paths = where / "train.npz", where / "test.npz"
    if cache and all(p.is_file() for p in paths):
        try:
            train, test = (read_cached_codes(p, tok) for p in paths)
            train.data = test.data = ref
            return train, test, True
        except ValueError as e:
            print(
                f"warning: damaged code cache, encoding again: {e} (rm -r {where} clears it)",
                file=sys.stderr,
            )
    train_images, test_images, split = _load_images(tok, ref, data is not None)
    out = []
    for images in (train_images, test_images):
        out.append(encode_data(tok.model, images, batch_size=batch_size, progress=progress))
    out[1].split = split  # "holdout": a part of train
    out[0].data = out[1].data = ref
    if cache:
        (where / CHECKSUMS).unlink(missing_ok=True)  # stale while the files are replaced
        for split, path in zip(out, paths, strict=True):
            split.save(path)
        write_json(where / CHECKSUMS, {p.name: file_sha256(p) for p in paths})
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
            raise UserError(
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
            raise UserError(f"loader state is for {n} sequences; the data has {len(self.codes)}")
        saved_world = int(state.get("world_size", self.world))
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self.position = int(state["position"]) * saved_world // self.world
