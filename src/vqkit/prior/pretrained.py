"""Pretrained directories of priors (``save_pretrained`` / ``from_pretrained``), generic
over the prior's kind: any prior class that subclasses :class:`PretrainedPrior` and
names its ``config_class`` (built as ``cls(config)``) gets them.

A prior's codes mean something only with the tokenizer it was trained on, so its
``config.json`` names that tokenizer under ``info["tokenizer"]``:

* ``sha256``: the tokenizer's weights file the prior was trained with (as in the prior's
  checkpoints: ``vqkit sample`` and ``load_tokenizer`` refuse another file);
* ``identity``: :func:`vqkit.models.codes_io.model_identity` of the tokenizer (its
  config and state; the hash index-map sidecars carry), the same for that file and for
  its ``save_pretrained`` export;
* ``location``: where the tokenizer is, relative to the prior's directory
  (``vqkit export`` writes it into ``tokenizer/``) or absolute; ``run_dir`` and
  ``checkpoint``: the training run it came from.

``Prior.from_pretrained(dir, tokenizer=model_or_dir)`` and
:func:`load_prior_tokenizer` refuse a tokenizer whose ``identity`` differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import VQVAE
from ..models.codes_io import model_identity
from ..models.hub import CONFIG_NAME, PretrainedMixin, measured_section
from ..storage.checkpoint import CheckpointError
from ..storage.fileio import json_object, loads_json

__all__ = ["PretrainedPrior", "check_tokenizer", "load_prior_tokenizer"]


def _tokenizer_info(info: dict[str, Any], where: Any) -> dict[str, Any]:
    """``info["tokenizer"]`` ({} when absent); one line naming ``where`` when it, its
    ``identity`` or its ``location`` is not of its JSON type."""
    tok = json_object(info.get("tokenizer") or {}, "info.tokenizer", where, CheckpointError)
    for key in ("identity", "location"):
        if tok.get(key) is not None and not isinstance(tok[key], str):
            raise CheckpointError(
                f"{where}: its 'info.tokenizer.{key}' field must be a string, not "
                f"{type(tok[key]).__name__}"
            )
    return tok


def check_tokenizer(info: dict[str, Any], tokenizer: VQVAE, where: Any) -> None:
    """ValueError unless ``tokenizer`` holds the weights the prior was trained on."""
    want = _tokenizer_info(info, where).get("identity")
    if want is None:
        raise UserError(f"{where}: the prior names no tokenizer to check against")
    have = model_identity(tokenizer)["tokenizer"]
    if have != want:
        raise UserError(
            f"tokenizer mismatch: the prior in {where} was trained on the tokenizer "
            f"{want[:16]}..., the given one is {have[:16]}..."
        )


def load_prior_tokenizer(
    prior_dir: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> VQVAE:
    """The tokenizer of a pretrained prior directory: ``tokenizer`` (a pretrained
    directory) or the ``location`` its ``config.json`` names, checked against the
    recorded ``identity``."""
    prior_dir = Path(prior_dir)
    cfg_path = prior_dir / CONFIG_NAME
    try:
        stored = loads_json(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from e
    stored = json_object(stored, "top-level", cfg_path, CheckpointError)
    info = json_object(stored.get("info") or {}, "info", cfg_path, CheckpointError)
    if tokenizer is None:
        location = _tokenizer_info(info, cfg_path).get("location")
        if location is None:
            raise UserError(f"{prior_dir}: no tokenizer location recorded; pass one")
        tokenizer = prior_dir / location  # an absolute location stays absolute
    model = VQVAE.from_pretrained(tokenizer, map_location=map_location)
    check_tokenizer(info, model, prior_dir)
    return model


class PretrainedPrior(PretrainedMixin):
    """``save_pretrained`` / ``from_pretrained`` of a prior (see the module docstring)."""

    pretrained_kind = "prior"

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        tokenizer: VQVAE | str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The prior (eval mode); ``tokenizer`` (a VQVAE or its pretrained directory),
        when given, must be the one it was trained on (ValueError otherwise). Other
        keyword arguments: :meth:`vqkit.models.hub.PretrainedMixin.from_pretrained`."""
        model = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if tokenizer is not None:
            if not isinstance(tokenizer, VQVAE):
                tokenizer = VQVAE.from_pretrained(tokenizer)
            check_tokenizer(model.pretrained_info, tokenizer, pretrained_model_name_or_path)
        return model

    def card_tags(self) -> list[str]:
        return ["image-generation", "code-prior"]

    def model_card_body(
        self, *, evaluation: dict[str, Any] | None = None, source: str | None = None, **_: Any
    ) -> str:
        """The prior's card: architecture options, vocabulary, code grid, classes, its
        tokenizer, and the measured bits per code ``evaluation`` (a run's eval.json)."""
        c = self.config
        info = getattr(self, "pretrained_info", {}) or {}
        tok = info.get("tokenizer") or {}
        classes = info.get("classes") or []
        arch = ", ".join(f"{k}={v}" for k, v in c.to_dict().items() if k not in
                         ("vocab_size", "code_shape", "scales", "num_classes"))  # fmt: skip
        grid = " x ".join(map(str, c.code_shape))
        if c.scales:  # a multi-scale tokenizer's one sequence
            grid += f" (scales {','.join(map(str, c.scales))})"
        lines = [
            f"# vqkit {type(self).__name__}: a prior over a tokenizer's codes",
            "",
            f"- architecture: {arch}",
            f"- vocabulary: {c.vocab_size} codes; code grid {grid} ({c.seq_len} codes per image)",
            f"- classes: {', '.join(map(str, classes)) if classes else 'none (unconditional)'}",
            f"- tokenizer: `{tok.get('location', 'not recorded')}` (identity "
            f"{str(tok.get('identity', '?'))[:16]}..., trained from "
            f"`{tok.get('run_dir', '?')}/{tok.get('checkpoint', '?')}`)",
        ]
        figures = ("step", "test_bits", "train_bits", "eval_sequences")
        lines += measured_section(source, evaluation, figures)
        if evaluation:
            lines += ["", "Bits per code: mean of -log2 p(code | previous codes, class)."]
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "from vqkit.prior import Prior",
            "from vqkit.prior.pretrained import load_prior_tokenizer",
            'prior = Prior.from_pretrained("THIS_DIR")',
            'tokenizer = load_prior_tokenizer("THIS_DIR")  # checked against the prior',
            "images = tokenizer.decode(prior.sample(8))",
            "```",
            "",
        ]
        return "\n".join(lines)
