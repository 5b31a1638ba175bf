"""Network weights on disk: the one safetensors writer and strict reader of vqkit's own
models, the one reader of the weights files users bring for other networks (the FID
InceptionV3, LPIPS' VGG16 backbone), and the one strict loader behind both.

A model file (:func:`export_safetensors`) holds the model's state dict; its metadata
holds ``format``, the model config as JSON (``model_config``), a module's extra state as
JSON (``extra_state``, e.g. FSQ's levels), what else the model needs as JSON (``info``:
a tokenizer's record of its training data, :mod:`vqkit.data.reference`) and
``aliases``: names of tied tensors (a prior's output head shares the token embedding)
stored once, under the first name, and restored on load. safetensors' own
``save_model`` / ``load_model`` handle tied tensors too, but not extra state (it is not a
tensor: ``save_model`` cannot write it and ``load_model`` reports it missing), and their
errors span several lines; so ties are found here.

Loading is strict (:func:`load_state_strict`): a missing or unexpected key, or a tensor
of another shape, is a one-line :class:`~vqkit.storage.checkpoint.CheckpointError`
naming it; a NaN or Inf in a loaded tensor is refused naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .checkpoint import (
    FORMAT,
    CheckpointError,
    check_finite_state,
    nonfinite_tensors,
    save_file_atomically,
)
from .fileio import json_object, loads_json

__all__ = [
    "export_safetensors",
    "load_state_strict",
    "load_weights_file",
    "read_info",
    "read_safetensors",
    "read_state_file",
]


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(tensors stored once, extra states, aliases {name: stored name})."""
    state, extra, aliases = {}, {}, {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):  # a module's extra state: JSON in the metadata
            extra[k] = v
            continue
        ident = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and ident in seen:  # the same tensor under a second name (tied)
            aliases[k] = seen[ident]
            continue
        seen[ident] = k
        state[k] = v.detach().contiguous().cpu()
    return state, extra, aliases


def export_safetensors(
    model: nn.Module, path: str | os.PathLike[str], *, info: Mapping[str, Any] | None = None
) -> None:
    """Write the model's weights and buffers as safetensors, config (``model.config``,
    with ``to_dict()``), extra state and ``info`` (JSON) in the metadata, tied tensors
    once; atomic, with the usual file mode (umask), a full disk a CheckpointError."""
    from safetensors.torch import save_file

    state, extra, aliases = _split_state(model)
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict())}
    if info:
        meta["info"] = json.dumps(dict(info))
    if extra:
        meta["extra_state"] = json.dumps(extra)
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    save_file_atomically(path, lambda tmp: save_file(state, tmp, metadata=meta), "weights")


def read_safetensors(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    *,
    check_finite: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config, full state dict: tensors, aliases and extra state) of a file
    written by :func:`export_safetensors`; CheckpointError on a missing, damaged or
    foreign file, or (``check_finite``) a NaN/Inf tensor."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            state: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated ({e})") from e
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{path} has no vqkit model config in its metadata")
    if check_finite:
        check_finite_state(state, path)
    try:
        config = loads_json(meta["model_config"])
        extra = loads_json(meta.get("extra_state", "{}"))
        aliases = loads_json(meta.get("aliases", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from e
    for field, value in (("model_config", config), ("extra_state", extra), ("aliases", aliases)):
        json_object(value, f"metadata {field}", path, CheckpointError)
    for name, target in aliases.items():
        if not isinstance(target, str) or target not in state:
            raise CheckpointError(
                f"{path}: metadata aliases: tied tensor {name!r} names missing {target!r}"
            )
        state[name] = state[target]
    return config, {**state, **extra}


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``info`` of a file written by :func:`export_safetensors` (``{}`` when it has
    none); CheckpointError on an unreadable file or metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        info = loads_json(meta.get("info", "{}"))
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated ({e})") from e
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: its metadata's info is not a JSON object")
    return info


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(
    model: nn.Module,
    state: Mapping[str, Any],
    where: Any,
    *,
    what: str = "the model config",
    hint: str = "",
    prefix: str = "",
) -> None:
    """``model.load_state_dict(state)`` that refuses, in one line naming them, missing
    keys (a buffer left freshly initialised would be a silent wrong model), unexpected
    keys and tensors of another shape: ``"{where}: weights do not match {what}: ..."``,
    then ``; {hint}`` when given. ``prefix``: how the keys are named in the file (the
    messages name them so)."""
    own = model.state_dict()
    bad = f"{where}: weights do not match {what}:"
    tail = f"; {hint}" if hint else ""
    missing = sorted(prefix + k for k in set(own) - set(state))
    if missing:
        raise CheckpointError(f"{bad} missing {_names(missing)}{tail}")
    unexpected = sorted(prefix + k for k in set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{bad} unexpected {_names(unexpected)}{tail}")
    shapes = [
        f"{prefix}{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in own.items()
        if isinstance(v, torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        raise CheckpointError(f"{bad} other shapes: {_names(shapes, 3)}{tail}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:  # ValueError: an extra state that disagrees
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{bad} {msg}{tail}") from e


def read_state_file(path: str | os.PathLike[str], what: str, hint: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt`` (read with ``weights_only=True``: no pickled
    code) or a ``.safetensors`` file, as CPU tensors (a ``{"state_dict": ...}`` wrapper is
    opened). One-line UserError naming the file: not a file, unreadable or truncated,
    not a dict of tensors. ``what`` names the weights, ``hint`` says where to get them."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file {p} not found: {hint}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, foreign format: all one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {what} file {p} ({first}): {hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} file {p} is not a state dict of tensors: {hint}")
    return state


def load_weights_file(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    what: str,
    hint: str,
    prefix: str = "",
    ignore: Collection[str] = (),
) -> None:
    """Load another network's weights file (:func:`read_state_file`) into ``module``,
    strictly (:func:`load_state_strict`), refusing NaN/Inf.

    ``prefix``: only the file's keys under it are the module's (``"features."`` of a
    whole VGG16 file); ``ignore``: key suffixes dropped from the file when the module has
    no such entry (``num_batches_tracked``, a training counter of torch's BatchNorm that a
    frozen network does not use and converted files lack)."""
    state = read_state_file(path, f"{what} weights", hint)
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    state = {
        k: v
        for k, v in state.items()
        if k in own or not any(k == s or k.endswith("." + s) for s in ignore)
    }
    bad = nonfinite_tensors({prefix + k: v for k, v in state.items()})
    if bad:
        raise UserError(f"{path}: non-finite values (NaN or Inf) in {_names(bad)}; {hint}")
    load_state_strict(module, state, path, what=what, hint=hint, prefix=prefix)
