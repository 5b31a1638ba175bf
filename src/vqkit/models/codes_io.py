"""Index-map files: codes that carry the identity of the tokenizer that wrote them.

``vqkit encode`` and ``vqkit sample`` write each index map as two files:

* ``NAME.npy``: the codes, an integer array ``(h, w)`` or ``(h, w, Q)`` (one image), or
  ``(B, h, w)`` / ``(B, h, w, Q)`` (several), readable by any ``numpy.load``;
* ``NAME.npy.json``, the sidecar (strict JSON)::

      {"format": "vqkit-codes", "version": 1,
       "tokenizer": "<sha256 of the model's weights and config>",
       "num_codes": K, "codes_per_position": Q, "grid": [h, w],
       "index_shape": one map's index shape: [h, w], [h, w, Q] or [L] (multi-scale)}

An audio codec's codes (``vqkit encode`` on WAV files, :func:`save_audio_codes`) are one
clip's ``(stages, frames)`` integer array (row i: residual stage i's code of each frame;
a single-codebook codec has one row), with the sidecar::

      {"format": "vqkit-codes", "version": 1, "modality": "audio",
       "tokenizer": "<sha256 of the codec's weights and config>",
       "num_codes": K, "codes_per_position": Q (the codec's stages), "sample_rate": the
       codec's rate, "hop": samples per frame, "stages": n (rows, n <= Q), "frames": T,
       "original_rate": the WAV's rate, "length": the WAV's samples, "channels": its
       channels (averaged to mono)}

``T = ceil(ceil(length * sample_rate / original_rate) / hop)``: the clip is resampled to
the codec's rate, encoded, and decoded back to ``length`` samples at ``original_rate``
(:func:`read_audio_codes` gives both back). An empty clip has ``T = 0``.

The identity (:func:`model_identity`) hashes what decoding depends on: the model's config
and every tensor of its state dict, so the same weights give the same hash whether they
were loaded from a ``.pt`` checkpoint or a ``.safetensors`` export, and different weights
(another run, a later checkpoint) a different one.

:func:`read_codes` (``vqkit decode``) checks a map against the model before decoding:

* with a sidecar: the tokenizer hash, K and Q must match (else a one-line error saying
  which model wrote the map), then the shape;
* without one (maps written before this format, or by other tools): the shape must be an
  index map of this model, ``(h, w)`` or ``(B, h, w)`` (``(.., Q)`` for Q codes per
  position) with the model's latent grid, and every index in ``[0, K)``; the map is then
  decoded with a warning that its tokenizer cannot be checked;
* ``unchecked=True`` (``vqkit decode --unchecked``): raw arrays; the identity and the
  grid size are not checked (the number of dimensions and the range still are);
* codes of the other modality (an image tokenizer's map for a codec, a codec's codes for
  an image tokenizer) are refused in one line naming what wrote them.

Writes are atomic (:func:`vqkit.storage.fileio.atomic_write`; a full disk is one line
naming the file); the old sidecar is removed before the map is replaced, so a kill in
between leaves a map without identity (decoded with the warning), never a map with the
identity of another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..storage.fileio import atomic_write, loads_json, write_json

__all__ = [
    "FORMAT",
    "AudioCodes",
    "codec_identity",
    "model_identity",
    "read_audio_codes",
    "read_codes",
    "save_audio_codes",
    "save_codes",
    "sidecar_path",
    "weights_hash",
    "write_sidecar",
]

FORMAT = "vqkit-codes"
VERSION = 1


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``NAME.npy.json`` for ``NAME.npy``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def weights_hash(model: Any) -> str:
    """Hex SHA-256 of the model's config JSON and of each state-dict tensor's name, dtype,
    shape and bytes, in name order (a module's extra state by its repr)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):  # a module's extra state (FSQ's levels)
            h.update(f"{name}={t!r}".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(model: Any) -> dict[str, Any]:
    """What a map records of the image tokenizer that wrote it: ``tokenizer``
    (:func:`weights_hash`), ``num_codes`` K, ``codes_per_position`` Q, ``grid`` [h, w]
    and ``index_shape``."""
    side = model.config.image_size // model.config.downsample
    return {
        "tokenizer": weights_hash(model),
        "num_codes": int(model.num_codes),
        "codes_per_position": int(model.quantizer.codes_per_position),
        "grid": [side, side],
        "index_shape": list(model.code_shape),
    }


def save_codes(path: str | os.PathLike[str], codes: Any, identity: dict[str, Any]) -> None:
    """Write ``codes`` (integer, ``(h, w)[, Q]`` or ``(B, h, w)[, Q]``) as ``path`` (.npy)
    and its sidecar (see the module docstring), both atomically."""
    _save_array(path, codes)
    write_sidecar(path, identity)


def _save_array(path: str | os.PathLike[str], codes: Any) -> None:
    """The map as int64 ``.npy``, atomically, its old sidecar removed first (never the
    old identity beside a new map)."""
    array = np.ascontiguousarray(np.asarray(codes).astype(np.int64, copy=False))
    sidecar_path(path).unlink(missing_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def write_sidecar(path: str | os.PathLike[str], identity: dict[str, Any]) -> None:
    """Write the sidecar of the map ``path`` (after the map itself: see
    :func:`save_codes`, which also removes the old sidecar before replacing the map)."""
    write_json(sidecar_path(path), {"format": FORMAT, "version": VERSION, **identity})


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        meta = loads_json(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{sidecar}: unreadable index-map sidecar ({e}); delete it to decode {path.name} "
            "unchecked"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{sidecar} is not a {FORMAT} sidecar; delete it or rename the map")
    return meta


_WHAT = {"image": "an image tokenizer's index map", "audio": "an audio codec's codes"}


def _check_identity(path: Path, meta: dict[str, Any], want: dict[str, Any]) -> None:
    have, need = meta.get("modality", "image"), want.get("modality", "image")
    if have != need:
        raise UserError(
            f"{path} holds {_WHAT.get(have, repr(have))}, not {_WHAT[need]}; decode it with "
            "the model that encoded it"
        )
    model = "codec" if need == "audio" else "tokenizer"
    for key, what in (
        ("codes_per_position", "codes per position"),
        ("num_codes", "codes (K)"),
        ("tokenizer", f"{model} weights"),
    ):
        if meta.get(key) != want[key]:
            got, need = meta.get(key), want[key]
            if key == "tokenizer":
                got, need = f"sha256 {str(got)[:16]}...", f"sha256 {str(need)[:16]}..."
            raise UserError(
                f"{path} was written by another {model} ({what}: {got}; this model: "
                f"{need}); decode it with the model that encoded it, or pass --unchecked "
                "to decode it anyway"
            )


def _axis_names(shape: tuple[int, ...], q: int) -> list[str]:
    """The axes of one map for messages: h, w[, Q], or L (multi-scale codes)."""
    if len(shape) == 1:
        return ["L"]
    return ["h", "w", "Q"] if q > 1 else ["h", "w"]


def _load_checked(
    path: Path, identity: dict[str, Any], unchecked: bool
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The array of ``path`` and its sidecar (None: none, or ``unchecked``), the sidecar's
    identity checked against ``identity``."""
    try:
        idx = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read index map {path}: {e}") from e
    if not isinstance(idx, np.ndarray):  # an .npz archive
        idx.close()
        raise UserError(f"{path}: expected one array (.npy), got an .npz archive")
    meta = None if unchecked else _read_sidecar(path)
    if meta is not None:
        _check_identity(path, meta, identity)
    return idx, meta


def _warn_unchecked(path: Path) -> None:
    warnings.warn(
        f"{path} has no tokenizer identity ({sidecar_path(path).name}); decoded "
        "unchecked: maps of another model with the same shape would give garbage",
        stacklevel=3,
    )


def _check_range(path: Path, idx: np.ndarray, num_codes: int) -> None:
    if idx.size == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_codes:
        raise UserError(f"{path}: indices {lo}..{hi} outside [0, {num_codes}) of this model")


def read_codes(
    path: str | os.PathLike[str], identity: dict[str, Any], *, unchecked: bool = False
) -> np.ndarray:
    """An index map file as int64 ``(B, h, w)`` or ``(B, h, w, Q)`` for the model of
    ``identity`` (:func:`model_identity`), checked as the module docstring says;
    ValueError with a one-line message naming ``path`` otherwise."""
    path = Path(path)
    idx, meta = _load_checked(path, identity, unchecked)
    q = identity["codes_per_position"]
    grid = tuple(identity["grid"])
    shape = tuple(identity.get("index_shape") or ((*grid, q) if q > 1 else grid))
    nd = len(shape) + 1
    if idx.ndim == nd - 1:
        idx = idx[None]
    one = ", ".join(_axis_names(shape, q))
    want = f"({one}) or (B, {one})"
    if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != nd:
        raise UserError(
            f"{path}: expected an integer index map {want} for this model "
            f"({q} code(s) per position); got {idx.dtype} {tuple(idx.shape)}"
        )
    if q > 1 and idx.shape[-1] != q:
        raise UserError(f"{path}: {idx.shape[-1]} codes per position; this model has {q}")
    if idx.size == 0:
        raise UserError(f"{path}: the index map is empty (shape {idx.shape}); nothing to decode")
    if not unchecked and tuple(idx.shape[1:]) != shape:
        raise UserError(
            f"{path}: shape {tuple(idx.shape)} is not an index map of this model, whose maps "
            f"are {'x'.join(map(str, shape))} ({want}); pass --unchecked to decode a raw "
            "array of another size"
        )
    _check_range(path, idx, identity["num_codes"])
    if meta is None and not unchecked:
        _warn_unchecked(path)
    return idx.astype(np.int64)


# -- an audio codec's codes ----------------------------------------------------------------
def codec_identity(model: Any) -> dict[str, Any]:
    """What a codes file records of the audio codec that wrote it (module docstring):
    ``modality`` "audio", ``tokenizer`` (:func:`weights_hash`), ``num_codes`` K,
    ``codes_per_position`` Q (its stages), ``sample_rate`` and ``hop``."""
    return {
        "modality": "audio",
        "tokenizer": weights_hash(model),
        "num_codes": int(model.num_codes),
        "codes_per_position": int(model.num_stages),
        "sample_rate": int(model.config.sample_rate),
        "hop": int(model.hop),
    }


def codec_frames(length: int, original_rate: int, identity: dict[str, Any]) -> int:
    """Frames of a clip of ``length`` samples at ``original_rate`` Hz: the clip resampled
    to the codec's rate has ``ceil(length * sample_rate / original_rate)`` samples (the
    resampler's length, :func:`vqkit.data.resample.resampled_length`), then
    ``ceil(samples / hop)`` frames."""
    samples = -(-int(length) * identity["sample_rate"] // int(original_rate))
    return -(-samples // identity["hop"])


@dataclass(frozen=True)
class AudioCodes:
    """One clip's codes as :func:`read_audio_codes` gives them: ``codes`` int64
    ``(stages, frames)``, the clip's ``original_rate`` (Hz) and ``length`` (samples at
    that rate) to decode back to, and ``channels`` (the WAV's, before it was averaged)."""

    codes: np.ndarray
    original_rate: int
    length: int
    channels: int = 1


def save_audio_codes(
    path: str | os.PathLike[str],
    codes: Any,
    identity: dict[str, Any],
    *,
    original_rate: int,
    length: int,
    channels: int = 1,
) -> None:
    """Write one clip's ``codes`` (integer ``(stages, frames)``, stages in 1..Q) as
    ``path`` (.npy) and its sidecar (``identity``: :func:`codec_identity`; the clip's
    ``original_rate``, ``length`` and ``channels``), both atomically."""
    array = np.asarray(codes)
    q = identity["codes_per_position"]
    if array.ndim != 2 or not 1 <= array.shape[0] <= q:
        raise UserError(f"audio codes must be (stages <= {q}, frames); got {array.shape}")
    if array.shape[1] != codec_frames(length, original_rate, identity):
        raise UserError(
            f"{array.shape[1]} frames for {length} samples at {original_rate} Hz; the codec "
            f"makes {codec_frames(length, original_rate, identity)}"
        )
    _save_array(path, array)
    write_sidecar(
        path,
        {
            **identity,
            "stages": int(array.shape[0]),
            "frames": int(array.shape[1]),
            "original_rate": int(original_rate),
            "length": int(length),
            "channels": int(channels),
        },
    )


def _meta_int(path: Path, meta: dict[str, Any], key: str, low: int) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{sidecar_path(path)}: {key} must be an integer >= {low}; got {value!r}")
    return value


def read_audio_codes(
    path: str | os.PathLike[str], identity: dict[str, Any], *, unchecked: bool = False
) -> AudioCodes:
    """A codes file of the codec of ``identity`` (:func:`codec_identity`), checked: the
    sidecar's identity (another codec, or an image tokenizer's map, is one line), a
    ``(stages, frames)`` integer array with 1..Q stages, the sidecar's stages and frames,
    every code in ``[0, K)``. Without a sidecar (or ``unchecked``) the clip is taken at
    the codec's rate, ``frames * hop`` samples long (a warning without a sidecar)."""
    path = Path(path)
    idx, meta = _load_checked(path, identity, unchecked)
    q = identity["codes_per_position"]
    if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 2 or not 1 <= idx.shape[0] <= q:
        raise UserError(
            f"{path}: expected integer audio codes (stages <= {q}, frames) for this codec; "
            f"got {idx.dtype} {tuple(idx.shape)}"
        )
    _check_range(path, idx, identity["num_codes"])
    if meta is None:
        if idx.shape[1] == 0:
            raise UserError(f"{path}: no frames and no sidecar giving a length; nothing to decode")
        if not unchecked:
            _warn_unchecked(path)
        rate, length = identity["sample_rate"], idx.shape[1] * identity["hop"]
        return AudioCodes(idx.astype(np.int64), rate, length)
    rate = _meta_int(path, meta, "original_rate", 1)
    length = _meta_int(path, meta, "length", 0)
    want = (meta.get("stages"), codec_frames(length, rate, identity))
    if tuple(idx.shape) != want:
        raise UserError(
            f"{path}: shape {tuple(idx.shape)}, but its sidecar says {want[0]} stage(s) and "
            f"{length} samples at {rate} Hz ({want[1]} frames): the files do not belong "
            "together"
        )
    channels = _meta_int(path, meta, "channels", 1) if "channels" in meta else 1
    return AudioCodes(idx.astype(np.int64), rate, length, channels)
