"""The prior's options, declared once (:func:`vqkit.options.option`).

:class:`PriorConfig` rebuilds a :class:`~vqkit.prior.Prior`: its ``kind``
(``autoregressive``: causal attention, next-code prediction; ``masked``: bidirectional
attention and a mask token, MaskGIT, see :mod:`vqkit.prior.masked`), the architecture options
(command-line flags of ``vqkit prior``) and three shape fields that come from the
tokenizer and its data, not from the user (``vocab_size``, ``code_shape``,
``num_classes``). :class:`PriorTrainConfig` holds the training options. A prior
checkpoint stores both ``to_dict()`` and rebuilds them with ``from_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..options import (
    Options,
    nonneg,
    nonneg_int,
    option,
    positive,
    positive_int,
    unit_interval,
)
from ..training.loop import RunOptions

__all__ = ["PriorConfig", "PriorTrainConfig", "resume_report"]


def _dropout(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "in [0, 1)"


KINDS = ("autoregressive", "masked")
# the mask-ratio schedules gamma(r) of the masked prior (vqkit.prior.masked.SCHEDULES)
SCHEDULE_NAMES = ("cosine", "arccos", "linear")


def schedule_name(v: str) -> str | None:
    """Check of a schedule option: one clear line naming the schedules."""
    return None if v in SCHEDULE_NAMES else f"one of {', '.join(SCHEDULE_NAMES)}"


@dataclass
class PriorConfig(Options):
    """Architecture of the prior (see :class:`~vqkit.prior.Prior`)."""

    kind: str = option(
        "autoregressive",
        "autoregressive (causal, one code per pass, KV cache) or masked (MaskGIT: "
        "bidirectional, fills masked codes, decodes in a few parallel passes, edits)",
        choices=KINDS,
    )
    mask_schedule: str = option(
        "cosine",
        "masked prior: the schedule gamma(r) that draws each training map's mask ratio "
        "(cosine, arccos, linear)",
        check=schedule_name,
    )
    n_layer: int = option(4, "transformer blocks", check=positive_int)
    n_head: int = option(4, "attention heads per block", check=positive_int)
    n_embd: int = option(
        256, "width of the residual stream (a multiple of --n-head)", check=positive_int
    )
    dropout: float = option(
        0.1, "dropout on attention weights and residual branches", check=_dropout
    )
    pos: str = option(
        "learned",
        "position encoding: learned embeddings or rotary (rope)",
        choices=("learned", "rope"),
    )
    class_cond: bool = option(True, "condition on the data's class labels when it has any")
    class_dropout: float = option(
        0.1,
        "probability of training on the null class instead of the label (enables "
        "classifier-free guidance)",
        check=unit_interval,
    )
    tie_weights: bool = option(True, "share the token embedding with the output head")
    # set from the tokenizer and its data, not command-line options
    vocab_size: int = 0  # the tokenizer's codes per position (K, or per stage for rvq)
    code_shape: list[int] = field(default_factory=list)  # (h, w) or (h, w, Q)
    num_classes: int = 0  # 0: unconditional (only the null class)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "masked" and self.mask_schedule != "cosine":
            raise UserError(
                f"mask_schedule={self.mask_schedule!r} applies to a masked prior "
                "(--kind masked); this one is autoregressive"
            )
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            head = self.n_embd // self.n_head
            raise UserError(f"pos='rope' needs an even head size; got {head}")
        self.code_shape = [int(s) for s in self.code_shape]  # a JSON trip gives a list
        if self.code_shape and (len(self.code_shape) not in (2, 3) or min(self.code_shape) < 1):
            raise UserError(f"code_shape must be (h, w) or (h, w, Q); got {self.code_shape}")
        for name in ("vocab_size", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{name} must be an int >= 0; got {v!r}")

    @property
    def masked(self) -> bool:
        """True for the masked (MaskGIT) kind."""
        return self.kind == "masked"

    @property
    def seq_len(self) -> int:
        """T = h * w (* Q): codes per image, the length of a sequence."""
        return math.prod(self.code_shape) if self.code_shape else 0


@dataclass
class PriorTrainConfig(RunOptions):
    """Options of one ``vqkit prior`` training run."""

    steps: int = option(3000, "optimizer steps", check=nonneg_int)
    batch_size: int = option(64, "sequences per step and per process", check=positive_int)
    lr: float = option(6e-4, "peak learning rate (AdamW)", check=positive)
    weight_decay: float = option(0.1, "AdamW weight decay of the weight matrices", check=nonneg)
    warmup: int = option(100, "linear learning-rate warm-up steps", check=nonneg_int)
    min_lr_ratio: float = option(
        0.1, "final learning rate / peak after the cosine decay", check=unit_interval
    )
    grad_clip: float = option(1.0, "clip the gradient norm to this; 0: no clipping", check=nonneg)
    eval_sequences: int = option(
        2000, "sequences per split of each evaluation (evenly strided); 0: all", check=nonneg_int
    )
    num_samples: int = option(16, "images in the sample grid of each evaluation", check=nonneg_int)
    seed: int = option(0, "seed of initialisation, data order and class dropout")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")


def resume_report(stored: dict[str, Any], config: PriorTrainConfig, step: int) -> list[str]:
    """The lines a resumed prior prints, ``"resume: lr 0.0006 -> 0.001 (applied)"``, one per
    training option that differs from the checkpoint's ``stored`` ones (as ``vqkit train
    --resume`` reports them). ``steps`` below the checkpoint's ``step`` is a ValueError:
    nothing would be trained, yet the smaller number would be recorded."""
    if config.steps < step:
        raise UserError(
            f"--steps {config.steps} is below the checkpoint's step {step}: nothing to "
            f"train; give --steps above {step} to train on"
        )
    changed = {
        k: (stored[k], v) for k, v in config.to_dict().items() if k in stored and stored[k] != v
    }
    fixed = [f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in RESUME_FIXED if k in changed]
    if fixed:
        raise UserError(
            "a resumed prior cannot change " + ", ".join(fixed) + ": the checkpoint's data "
            "order and optimizer groups keep the stored values; start a new run (--overwrite "
            "or another --out) to change them"
        )
    return [f"resume: {k} {a!r} -> {b!r} (applied)" for k, (a, b) in changed.items()]


RESUME_FIXED = ("seed", "weight_decay")
"""Training options a resumed prior cannot change: the loader's order is restored with
the stored seed, and AdamW's restored groups keep the stored weight decay."""
