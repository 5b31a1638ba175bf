"""Index-map files: codes that carry the identity of the tokenizer that wrote them.

``vqkit encode`` and ``vqkit sample`` write each index map as two files:

* ``NAME.npy``: the codes, an integer array ``(h, w)`` or ``(h, w, Q)`` (one image), or
  ``(B, h, w)`` / ``(B, h, w, Q)`` (several), readable by any ``numpy.load``;
* ``NAME.npy.json``, the sidecar (strict JSON)::

      {"format": "vqkit-codes", "version": 1,
       "tokenizer": "<sha256 of the model's weights and config>",
       "num_codes": K, "codes_per_position": Q, "grid": [h, w],
       "index_shape": one map's index shape: [h, w], [h, w, Q] or [L] (multi-scale)}

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
  grid size are not checked (the number of dimensions and the range still are).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..storage.fileio import atomic_write, write_json

__all__ = [
    "FORMAT",
    "model_identity",
    "read_codes",
    "save_codes",
    "sidecar_path",
    "write_sidecar",
]

FORMAT = "vqkit-codes"
VERSION = 1


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """``NAME.npy.json`` for ``NAME.npy``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def model_identity(model: Any) -> dict[str, Any]:
    """What a map records of the model that wrote it: ``tokenizer`` (hex SHA-256 of the
    config JSON and of each state-dict tensor's name, dtype, shape and bytes, in name
    order), ``num_codes`` K, ``codes_per_position`` Q and ``grid`` [h, w]."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):  # a module's extra state (FSQ's levels)
            h.update(f"{name}={t!r}".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    side = model.config.image_size // model.config.downsample
    return {
        "tokenizer": h.hexdigest(),
        "num_codes": int(model.num_codes),
        "codes_per_position": int(model.quantizer.codes_per_position),
        "grid": [side, side],
        "index_shape": list(model.code_shape),
    }


def save_codes(path: str | os.PathLike[str], codes: Any, identity: dict[str, Any]) -> None:
    """Write ``codes`` (integer, ``(h, w)[, Q]`` or ``(B, h, w)[, Q]``) as ``path`` (.npy)
    and its sidecar (see the module docstring), both atomically."""
    path = Path(path)
    array = np.ascontiguousarray(np.asarray(codes).astype(np.int64, copy=False))
    sidecar = sidecar_path(path)
    sidecar.unlink(missing_ok=True)  # never the old identity beside a new map

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)
    write_sidecar(path, identity)


def write_sidecar(path: str | os.PathLike[str], identity: dict[str, Any]) -> None:
    """Write the sidecar of the map ``path`` (after the map itself: see
    :func:`save_codes`, which also removes the old sidecar before replacing the map)."""
    write_json(sidecar_path(path), {"format": FORMAT, "version": VERSION, **identity})


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{sidecar}: unreadable index-map sidecar ({e}); delete it to decode {path.name} "
            "unchecked"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{sidecar} is not a {FORMAT} sidecar; delete it or rename the map")
    return meta


def _check_identity(path: Path, meta: dict[str, Any], want: dict[str, Any]) -> None:
    for key, what in (
        ("codes_per_position", "codes per position"),
        ("num_codes", "codes (K)"),
        ("tokenizer", "tokenizer weights"),
    ):
        if meta.get(key) != want[key]:
            got, need = meta.get(key), want[key]
            if key == "tokenizer":
                got, need = f"sha256 {str(got)[:16]}...", f"sha256 {str(need)[:16]}..."
            raise UserError(
                f"{path} was written by another tokenizer ({what}: {got}; this model: "
                f"{need}); decode it with the model that encoded it, or pass --unchecked "
                "to decode it anyway"
            )


def _axis_names(shape: tuple[int, ...], q: int) -> list[str]:
    """The axes of one map for messages: h, w[, Q], or L (multi-scale codes)."""
    if len(shape) == 1:
        return ["L"]
    return ["h", "w", "Q"] if q > 1 else ["h", "w"]


def read_codes(
    path: str | os.PathLike[str], identity: dict[str, Any], *, unchecked: bool = False
) -> np.ndarray:
    """An index map file as int64 ``(B, h, w)`` or ``(B, h, w, Q)`` for the model of
    ``identity`` (:func:`model_identity`), checked as the module docstring says;
    ValueError with a one-line message naming ``path`` otherwise."""
    path = Path(path)
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
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= identity["num_codes"]:
        raise UserError(
            f"{path}: indices {lo}..{hi} outside [0, {identity['num_codes']}) of this model"
        )
    if meta is None and not unchecked:
        warnings.warn(
            f"{path} has no tokenizer identity ({sidecar_path(path).name}); decoded "
            "unchecked: maps of another model with the same shape would give garbage",
            stacklevel=2,
        )
    return idx.astype(np.int64)
