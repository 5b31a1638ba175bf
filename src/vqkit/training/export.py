"""``vqkit export RUN --out DIR`` for a tokenizer run: the run's model as a pretrained
directory (``config.json``, ``model.safetensors``, ``README.md``; see
:mod:`vqkit.models.hub`), its card stating the data and the run's measured test figures.

The weights are the run's final export ``model.safetensors`` (the model ``eval.json``
measured), else its ``checkpoints/best.pt`` / ``last.pt`` (then the card says the
figures were not measured for them); ``weights`` names another file of the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models import VQVAE, load_model

__all__ = ["describe_data", "export_tokenizer_run", "run_weights"]

WEIGHTS = ("model.safetensors", "checkpoints/best.pt", "checkpoints/last.pt")


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
    split = ((run_config.get("data") or {}).get("eval") or {}).get("split")
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
