"""A prior run read back: its weights and the tokenizer it was trained on.

Every user of a ``vqkit prior`` run directory loads it through here: ``vqkit sample``
(:mod:`vqkit.prior.cli`), the codec (:func:`vqkit.compress.load_codec`) and ``vqkit
export`` (:mod:`vqkit.prior.export`), so they agree on which checkpoint is the run's
(``best``, else ``last``) and on which tokenizer weights belong to it (the copy pinned in
``PRIOR_DIR/tokenizer/``, else the run's file with the SHA-256 the prior recorded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..storage.checkpoint import CheckpointError, load_checkpoint
from .codes import Tokenizer, load_tokenizer
from .config import PriorConfig
from .transformer import Prior

__all__ = ["load_prior", "load_sample_tokenizer"]


def load_prior(
    prior_dir: str | os.PathLike[str], which: str | None = None, device: torch.device | str = "cpu"
) -> tuple[Prior, dict[str, Any]]:
    """(model in eval mode, checkpoint dict) from ``PRIOR_DIR/checkpoints/{best,last}.pt``;
    ``which``: "best" or "last" (default: best when present, else last)."""
    ckpt_dir = Path(prior_dir) / "checkpoints"
    names = [which] if which else ["best", "last"]
    paths = [ckpt_dir / f"{n}.pt" for n in names if (ckpt_dir / f"{n}.pt").is_file()]
    if not paths:
        raise UserError(f"{prior_dir} holds no prior checkpoint ({' or '.join(names)}.pt)")
    ckpt = load_checkpoint(paths[0], map_location="cpu")
    if ckpt.get("kind") != "vqkit-prior":
        raise CheckpointError(f"{paths[0]} is not a prior checkpoint (vqkit prior writes them)")
    model = Prior(PriorConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def load_sample_tokenizer(
    prior_dir: str | os.PathLike[str],
    ckpt: dict[str, Any],
    run_dir: str | os.PathLike[str] | None,
    device: torch.device | str,
) -> Tokenizer:
    """The tokenizer a prior was trained on: its pinned copy in PRIOR_DIR/tokenizer/ when
    there is one (the tokenizer run may have trained on or be gone), else the run's file
    (``run_dir``, default the recorded one), checked against the recorded hash (the
    error says how to recover). ``ckpt``: the prior's checkpoint dict (:func:`load_prior`)."""
    stored = ckpt.get("tokenizer") or {}
    pinned = stored.get("pinned")
    run_dir = run_dir or stored.get("run_dir")
    if run_dir is None:
        raise UserError(f"{prior_dir}: no tokenizer recorded; pass --tokenizer RUN_DIR")
    return load_tokenizer(
        run_dir,
        checkpoint=stored.get("checkpoint"),
        device=device,
        expect_sha256=stored.get("sha256"),
        pinned=Path(prior_dir) / pinned if pinned else None,
    )
