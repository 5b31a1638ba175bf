"""``vqkit export PRIOR_RUN --out DIR``: a prior run as a pretrained directory, with its
tokenizer beside it (``DIR/tokenizer/``) so the directory stands alone.

The prior's weights are ``checkpoints/last.pt`` (the model the run's final ``eval.json``
measured). Its tokenizer is the one ``vqkit sample`` would use: the copy pinned in
``PRIOR_RUN/tokenizer/``, else the run's file, refused when its hash differs from the
one the prior was trained with (:func:`vqkit.prior.loading.load_sample_tokenizer`);
``config.json`` records its identity and location (see :mod:`vqkit.prior.pretrained`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models.codes_io import model_identity
from ..storage.checkpoint import CheckpointError, load_checkpoint
from ..storage.fileio import loads_json
from ..storage.weights import load_state_strict
from ..training.export import describe_data
from .config import PriorConfig
from .loading import load_sample_tokenizer
from .transformer import Prior

__all__ = ["export_prior_run", "is_prior_run", "tokenizer_run_of"]

TOKENIZER_DIR = "tokenizer"


def is_prior_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` is a ``vqkit prior`` run (its config.json names a tokenizer)."""
    try:
        cfg = loads_json((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "tokenizer" in cfg and "prior" in cfg


def tokenizer_run_of(run_dir: str | os.PathLike[str], tokenizer: str | None = None) -> list[str]:
    """The tokenizer run of a prior run (``tokenizer``, else the one its config.json
    records), as a list ([] when none is known): an export must not write into it."""
    if tokenizer:
        return [tokenizer]
    try:
        cfg = loads_json((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
        found = (cfg.get("tokenizer") or {}).get("run_dir")
    except (OSError, ValueError, AttributeError):
        return []
    return [found] if isinstance(found, str) else []


def export_prior_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, tokenizer: str | None = None
) -> Prior:
    """Write the prior of ``run_dir`` to ``out`` and its tokenizer to ``out/tokenizer``;
    ``tokenizer``: the tokenizer run, if it moved (its weights must be the same file)."""
    run, out = Path(run_dir), Path(out)
    path = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "vqkit-prior":
        raise CheckpointError(f"{path} is not a prior checkpoint (vqkit prior writes them)")
    stored = ckpt.get("tokenizer")
    if not stored:
        raise UserError(f"{path} records no tokenizer; a prior is exported with its tokenizer")
    tok = load_sample_tokenizer(run, ckpt, tokenizer, "cpu")
    model = Prior(PriorConfig.from_dict(ckpt["model_config"]))
    load_state_strict(model, ckpt["model"], path)
    tok.model.pretrained_info = {"data": tok.data} if tok.data else {}  # its training data
    tok.model.save_pretrained(
        out / TOKENIZER_DIR,
        model_card_kwargs={
            "data": describe_data(tok.run_config),
            "source": str(tok.checkpoint.resolve()),
        },
    )
    model.pretrained_info = {
        "tokenizer": {
            "location": TOKENIZER_DIR,
            "identity": model_identity(tok.model)["tokenizer"],
            "sha256": stored["sha256"],
            "run_dir": stored["run_dir"],
            "checkpoint": stored["checkpoint"],
        },
        "classes": list(ckpt.get("classes", [])),
    }
    evaluation: dict[str, Any] = {}
    try:
        evaluation = loads_json((run / "eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if evaluation.get("step") != ckpt.get("step"):
        evaluation = {}  # measured for other weights
    model.eval().save_pretrained(
        out, model_card_kwargs={"evaluation": evaluation or None, "source": str(path.resolve())}
    )
    return model
