"""``vqkit export RUN --out DIR`` for a tokenizer run: the run's model as a pretrained
directory (``config.json``, ``model.safetensors``, ``README.md``; see
:mod:`vqkit.models.hub`), its card stating the data and the run's measured test figures.

The weights are the run's final export ``model.safetensors`` (the model ``eval.json``
measured), else its ``checkpoints/best.pt`` / ``last.pt`` (then the card says the
figures were not measured for them); ``weights`` names another file of the run.

The directory carries the run's record of its training data (``config.json``'s
``info.data`` and the weights' metadata, :mod:`vqkit.data.reference`), so ``vqkit eval``
and ``vqkit prior`` on it use that data. :func:`check_export_out` refuses an output
inside the run (it would replace the run's own ``config.json``) and, unless
``overwrite``, files that exist, before anything is computed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..data.reference import reference_from_train_config
from ..errors import UserError
from ..models import VQVAE, load_model
from ..storage.fileio import refuse_existing

__all__ = [
    "OUTPUTS",
    "check_export_out",
    "describe_data",
    "export_tokenizer_run",
    "run_weights",
]

WEIGHTS = ("model.safetensors", "checkpoints/best.pt", "checkpoints/last.pt")
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
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from e
    return value if isinstance(value, dict) else {}


def run_weights(run_dir: str | os.PathLike[str], weights: str | None = None) -> Path:
    """The weights file of a tokenizer run: ``weights`` (relative to the run) or the first
    of ``model.safetensors``, ``checkpoints/best.pt``, ``checkpoints/last.pt``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    for rel in [weights] if weights else WEIGHTS:
        if (run / rel).is_file():
            return run / rel
    raise UserError(f"{run} holds no tokenizer weights ({weights or ' or '.join(WEIGHTS)})")


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
