"""``vqkit export RUN --out DIR`` for a tokenizer run or a speech codec run: the run's
model as a pretrained directory (``config.json``, ``model.safetensors``, ``README.md``;
see :mod:`vqkit.models.hub`), its card stating the data and the run's measured test
figures (a codec's: the bitrate and figures per stage count).

The weights are the run's final export (a tokenizer run's ``model.safetensors``, a codec
run's pretrained ``codec/``: the model ``eval.json`` measured), else its
``checkpoints/best.pt`` / ``last.pt`` (then the card says the figures were not measured
for them); ``weights`` names another file of the run. :func:`run_weights` is also how
``vqkit encode`` / ``decode`` / ``eval`` read a run directory given as the model.

The directory carries the run's record of its training data (``config.json``'s
``info.data`` and the weights' metadata, :mod:`vqkit.data.reference`), so ``vqkit eval``
and ``vqkit prior`` on it use that data. :func:`check_export_out` refuses an output
inside the run (it would replace the run's own ``config.json``) and, unless
``overwrite``, files that exist, before anything is computed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..data.reference import reference_from_train_config
from ..errors import UserError
from ..models import VQVAE, AudioCodec, load_model
from ..models.io import is_codec_config, load_any
from ..storage.fileio import loads_json, refuse_existing

__all__ = [
    "OUTPUTS",
    "check_export_out",
    "codec_source",
    "describe_data",
    "export_codec_run",
    "export_tokenizer_run",
    "is_codec_run",
    "run_weights",
]

WEIGHTS = ("model.safetensors", "checkpoints/best.pt", "checkpoints/last.pt")
CODEC_WEIGHTS = ("codec", "checkpoints/best.pt", "checkpoints/last.pt")
OUTPUTS = ("config.json", "model.safetensors", "README.md")
"""The files of a pretrained directory (``save_pretrained``)."""


def check_export_out(
    out: str | os.PathLike[str],
    runs: list[str | os.PathLike[str]],
    *,
    overwrite: bool,
    subdirs: tuple[str, ...] = ("",),
) -> None:
    """One-line UserError when ``out`` is one of ``runs`` or inside one (an export there
    would replace the run's own records), or, unless ``overwrite``, when one of the
    :data:`OUTPUTS` of ``out/SUBDIR`` exists."""
    target = Path(out).resolve()
    for run in runs:
        home = Path(run).resolve()
        if target == home or home in target.parents:
            raise UserError(
                f"--out {out} is inside the run {run}: the export would replace the run's "
                "own records; choose a folder outside it"
            )
    names = [Path(out, sub, name) for sub in subdirs for name in OUTPUTS]
    refuse_existing(names, overwrite)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = loads_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from e
    return value if isinstance(value, dict) else {}


def is_codec_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a run directory is a speech codec run (its ``config.json`` records a codec's
    model options, or it holds the pretrained ``codec/``)."""
    run = Path(run_dir)
    model = _read_json(run / "config.json").get("model")
    return (isinstance(model, dict) and is_codec_config(model)) or (run / "codec").is_dir()


def run_weights(run_dir: str | os.PathLike[str], weights: str | None = None) -> Path:
    """The weights of a run: ``weights`` (relative to the run) or the first of
    ``model.safetensors`` (a codec run: the pretrained directory ``codec``),
    ``checkpoints/best.pt``, ``checkpoints/last.pt``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    codec = is_codec_run(run)
    names = [weights] if weights else CODEC_WEIGHTS if codec else WEIGHTS
    for rel in names:
        if (run / rel).is_file() or (codec and (run / rel / "config.json").is_file()):
            return run / rel
    what = "codec" if codec else "tokenizer"
    raise UserError(f"{run} holds no {what} weights ({' or '.join(names)})")


def codec_source(info: dict[str, Any], train_config: dict[str, Any]) -> str | None:
    """The data a codec was trained on: its ``pretrained_info``'s ``data`` (a path, or a
    record with a ``source``), else the training options' ``data``; a relative path that
    exists here made absolute (the record is read from other working directories)."""
    ref = info.get("data")
    ref = ref.get("source") if isinstance(ref, dict) else ref
    ref = ref if isinstance(ref, str) and ref else train_config.get("data")
    if not isinstance(ref, str) or not ref:
        return None
    return str(Path(ref).resolve()) if Path(ref).exists() else ref


def describe_data(run_config: dict[str, Any]) -> str:
    """The model card's data line from a tokenizer run's ``config.json``."""
    train = (run_config.get("data") or {}).get("train") or {}
    source = train.get("source") or (run_config.get("train") or {}).get("data") or "builtin"
    parts = [f"`{source}`"]
    if train.get("num_images"):
        shape = "x".join(map(str, train.get("shape", [])))
        parts.append(f"{train['num_images']} training images" + (f" ({shape})" if shape else ""))
    if train.get("classes"):
        parts.append(f"{len(train['classes'])} classes")
    return ", ".join(parts)


def export_tokenizer_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, weights: str | None = None
) -> VQVAE:
    """Write the run's tokenizer to ``out`` with ``save_pretrained``; returns the model."""
    path = run_weights(run_dir, weights)
    run = Path(run_dir)
    model = load_model(path)
    evaluation = _read_json(run / "eval.json") if path.name == "model.safetensors" else {}
    run_config = _read_json(run / "config.json")
    # the run's record of its data: the final export's own, else made from its options
    ref = model.pretrained_info.get("data") if hasattr(model, "pretrained_info") else None
    if ref is None:
        train = run_config.get("train") or {}
        cfg = model.config
        ref = reference_from_train_config(
            train, image_size=cfg.image_size, channels=cfg.in_channels
        )
    model.pretrained_info = {"data": ref} if ref else {}
    split = ((run_config.get("data") or {}).get("eval") or {}).get("split")
    split = (ref or {}).get("eval_split", split)  # the data's eval split says "train" for holdout
    if evaluation and split:
        evaluation = {"split": split, **evaluation}
    model.save_pretrained(
        out,
        model_card_kwargs={
            "evaluation": evaluation or None,
            "data": describe_data(run_config),
            "source": str(path.resolve()),
        },
    )
    return model


def export_codec_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, weights: str | None = None
) -> AudioCodec:
    """Write a speech codec run's codec to ``out`` with ``save_pretrained``
    (``AudioCodec.from_pretrained(out)`` loads it); its card states the bitrate per stage
    count and, for the run's final codec, the figures of its ``eval.json``. Returns it."""
    path = run_weights(run_dir, weights)
    run = Path(run_dir)
    model = load_any(path)
    if not isinstance(model, AudioCodec):
        raise UserError(f"{path} holds an image tokenizer, not the run's codec")
    final = path.resolve() == (run / "codec").resolve()
    evaluation = _read_json(run / "eval.json") if final else {}
    run_config = _read_json(run / "config.json")
    train = run_config.get("train") or {}
    info = getattr(model, "pretrained_info", None) or {}
    source = codec_source(info, train)
    model.pretrained_info = {
        **({"data": source} if source else {}),
        **({"eval": evaluation} if evaluation else {}),
    }
    model.save_pretrained(
        out,
        model_card_kwargs={"data": source, "source": str(path.resolve())},
    )
    return model
