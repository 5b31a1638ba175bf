"""Audio datasets: a folder of WAV files (recursive), a ``.tar``/``.tar.gz`` of one (read
member by member, nothing unpacked), and the Free Spoken Digit Dataset recognised by its
layout; :func:`load_audio` gives one split as :class:`~vqkit.data.audio.AudioData`.

Split and class rules, on a directory or on a tar's member names:

* **FSDD**: every WAV is named ``{digit}_{speaker}_{index}.wav`` in a ``recordings/``
  folder (``fsdd/recordings/`` in ``fsdd-8k.tar.gz``). The official split: index 0-4 of
  each digit and speaker is "test" (300 clips), 5-49 "train" (2,700). Labels are the
  digits (classes "0".."9"); each clip's speaker is kept (``speakers=`` /
  ``exclude_speakers=`` select them, e.g. for a held-out-speaker run).
* **split folders** (``train/``, ``test/``, ... anywhere in the tree): as for image
  folders (:mod:`vqkit.data.imagefolder`): the shallowest folder of that name is the
  split's root, class subfolders under it give the labels.
* **no split folders**: a deterministic split that is the same on every machine: after
  the chain of single top folders is skipped (so a folder and a tar of it agree), a
  file whose relative path ``p`` has ``int(sha256("vqkit-audio-split:" + p)[:16], 16)
  % 100 < test_percent`` (10 by default) is "test", every other file "train".

Clips are mono float32 at one rate: ``rate=`` resamples every clip to it
(:mod:`vqkit.data.resample`); without it the clips must share one rate. A file that
cannot be decoded, and an empty one (0 frames: nothing to train or score on), is skipped
with a warning naming the first few (``on_error="raise"``: one line naming it). A source
holding both images and audio is refused (:func:`detect_modality`).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Literal

import torch

from ..errors import UserError
from .audio import AUDIO_EXTENSIONS, AudioData, decode_wav
from .imagefolder import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    _labels_for,
    _select_split,
    is_tar_path,
    read_tar,
    tar_names,
)
from .resample import resample

__all__ = ["audio_splits", "detect_modality", "is_fsdd", "load_audio"]

FSDD_NAME = re.compile(r"(?:^|/)recordings/(\d)_([^/_]+)_(\d+)\.wav$")
FSDD_TEST_INDICES = range(5)  # upstream's split: recordings 0-4 of each digit and speaker
_SPLIT_SALT = "vqkit-audio-split:"
_MAX_LISTED = 5


def _visible(rel: str) -> bool:
    # hidden files/folders and macOS resource forks (._x.wav, __MACOSX/) are not data
    return not any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


def _all_names(path: Path) -> list[str]:
    """Every visible file of a directory tree or a tar archive (member headers only)."""
    if path.is_file():
        if not is_tar_path(path):
            raise UserError(f"{path}: not a directory or a tar archive of WAV files")
        names = tar_names(path)
    else:
        names = []
        for dirpath, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, path).replace(os.sep, "/")
            names += [n if rel_dir == "." else f"{rel_dir}/{n}" for n in files]
    return [n for n in names if _visible(n)]


def _is_audio(rel: str) -> bool:
    return rel.lower().endswith(AUDIO_EXTENSIONS)


def detect_modality(source: str | os.PathLike[str]) -> Literal["image", "audio"]:
    """ "audio" for a folder or tar holding WAV files and no images, else "image" (the
    image loaders then say what they find). Both kinds in one source: one line naming
    an example of each."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset source not found: {path}")
    names = _all_names(path)
    audio = [n for n in names if _is_audio(n)]
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    if audio and images:
        raise UserError(
            f"{path}: holds both images ({len(images)}, e.g. {images[0]}) and audio "
            f"({len(audio)}, e.g. {audio[0]}); a dataset is one kind: move one of them out"
        )
    return "audio" if audio else "image"


def is_fsdd(names: list[str]) -> bool:
    """Whether WAV names (relative paths) are the Free Spoken Digit Dataset's layout."""
    return bool(names) and all(FSDD_NAME.search(n) for n in names)


def _split_folders(names: list[str]) -> list[str]:
    return sorted({p for n in names for p in n.split("/")[:-1]} & set(SPLIT_NAMES))


def audio_splits(source: str | os.PathLike[str]) -> list[str]:
    """The split names :func:`load_audio` accepts for ``source``, sorted: FSDD and a tree
    without split folders have "test" and "train"; otherwise its split folders."""
    names = [n for n in _all_names(Path(source)) if _is_audio(n)]
    if not names:
        raise UserError(f"{source}: no WAV files found")
    if is_fsdd(names):
        return ["test", "train"]
    return _split_folders(names) or ["test", "train"]


def hash_split(rel: str, test_percent: int) -> str:
    """The split ("test" / "train") of relative path ``rel`` in a tree without split
    folders (module docstring)."""
    digest = hashlib.sha256((_SPLIT_SALT + rel).encode()).hexdigest()
    return "test" if int(digest[:16], 16) % 100 < test_percent else "train"


def _select(
    names: list[str], split: str, where: Path, test_percent: int
) -> tuple[list[str], list[int], tuple[str, ...], list[str] | None]:
    """(selected names, labels, classes, speaker per clip or None) of one split."""
    if is_fsdd(names):
        if split not in ("train", "test"):
            raise UserError(f"{where}: FSDD has splits 'train' and 'test', not {split!r}")
        parsed = [(n, FSDD_NAME.search(n)) for n in sorted(names)]
        chosen = [
            (n, m) for n, m in parsed if (int(m[3]) in FSDD_TEST_INDICES) == (split == "test")
        ]
        return (
            [n for n, _ in chosen],
            [int(m[1]) for _, m in chosen],
            tuple(str(d) for d in range(10)),
            [m[2] for _, m in chosen],
        )
    if _split_folders(names):
        root, selected = _select_split(names, split, where)
        selected.sort(key=lambda p: p.split("/"))
        labels, classes, _ = _labels_for([p[len(root) :] for p in selected])
        return selected, labels, classes, None
    if split not in ("train", "test"):
        raise UserError(
            f"{where}: has no split folders, so its files are split by a hash of their path "
            f"into 'train' and 'test'; there is no {split!r} split"
        )
    ordered = sorted(names, key=lambda p: p.split("/"))
    _, _, prefix = _labels_for(ordered)
    selected = [n for n in ordered if hash_split(n[len(prefix) :], test_percent) == split]
    labels, classes, _ = _labels_for([n[len(prefix) :] for n in selected])
    return selected, labels, classes, None


def load_audio(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    rate: int | None = None,
    speakers: list[str] | None = None,
    exclude_speakers: list[str] | None = None,
    test_percent: int = 10,
    on_error: Literal["skip", "raise"] = "skip",
) -> AudioData:
    """One split of an audio folder, a tar of one, or FSDD, as :class:`AudioData` (mono
    float32 clips, labels, speakers; the module docstring gives the rules).

    ``rate``: resample every clip to it (Hz); None keeps the files' rate, which must then
    be one. ``speakers`` / ``exclude_speakers``: keep only / drop these speakers' clips
    (FSDD names them). ``test_percent``: the test share of the hash split of a tree
    without split folders. ``on_error``: "skip" (warn) or "raise" for undecodable or
    empty files."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"audio folder or archive not found: {path}")
    if on_error not in ("skip", "raise"):
        raise UserError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    if not 0 <= test_percent <= 100:
        raise UserError(f"test_percent must be in 0..100, got {test_percent}")
    detect_modality(path)  # mixed sources refused
    tar = path.is_file()
    blobs = read_tar(path, lambda n: _visible(n) and _is_audio(n)) if tar else {}
    names = list(blobs) if tar else [n for n in _all_names(path) if _is_audio(n)]
    if not names:
        raise UserError(f"{path}: no WAV files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    selected, labels, classes, speaker_of = _select(names, split, path, test_percent)
    speaker_names = tuple(sorted(set(speaker_of))) if speaker_of else ()
    clips, keep, bad, converted, rates = [], [], [], 0, {}
    for i, rel in enumerate(selected):
        shown = f"{path}:{rel}" if tar else str(path / rel)
        try:
            wav = decode_wav(blobs.pop(rel) if tar else path / rel, name=shown)
            if wav.samples.numel() == 0:
                raise UserError(f"{shown}: empty WAV (0 frames)")
        except UserError as e:
            if on_error == "raise":
                raise
            bad.append(str(e))
            continue
        samples = wav.samples
        if rate is not None:
            samples = resample(samples, wav.rate, rate)
        rates.setdefault(wav.rate, shown)
        if rate is None and len(rates) > 1:
            (r0, f0), (r1, f1) = list(rates.items())[:2]
            raise UserError(
                f"{path}: clips at different rates ({f0}: {r0} Hz, {f1}: {r1} Hz); "
                "pass rate= to resample them to one"
            )
        converted += wav.channels > 1
        clips.append(samples)
        keep.append(i)
    if bad:
        listed = "; ".join(bad[:_MAX_LISTED]) + ("; ..." if len(bad) > _MAX_LISTED else "")
        warnings.warn(
            f"{path}: skipped {len(bad)} of {len(selected)} WAV files: {listed}", stacklevel=2
        )
    if not clips:
        raise UserError(f"{path}: no usable WAV file in split {split!r}")
    if converted:
        warnings.warn(
            f"{path}: {converted} of {len(clips)} files have several channels and were "
            "averaged to mono",
            stacklevel=2,
        )
    offsets = torch.zeros(len(clips) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([c.numel() for c in clips]).cumsum(0)
    index = {s: j for j, s in enumerate(speaker_names)}
    data = AudioData(
        torch.cat(clips),
        offsets,
        rate if rate is not None else next(iter(rates)),
        torch.tensor([labels[i] for i in keep], dtype=torch.int64),
        classes,
        torch.tensor([index[speaker_of[i]] if speaker_of else 0 for i in keep], dtype=torch.int64),
        speaker_names,
        tuple(f"{path}:{selected[i]}" if tar else str(path / selected[i]) for i in keep),
        str(path),
        split,
        converted,
    )
    if speakers is not None or exclude_speakers:
        data = data.select_speakers(speakers, exclude=exclude_speakers)
    return data
