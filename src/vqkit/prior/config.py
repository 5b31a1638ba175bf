"""The prior's options, declared once (:func:`vqkit.options.option`).

:class:`PriorConfig` rebuilds a :class:`~vqkit.prior.Prior`: its ``kind``
(``autoregressive``: causal attention, next-code prediction; ``masked``: bidirectional
attention and a mask token, MaskGIT, see :mod:`vqkit.prior.masked`; ``next-scale``:
block-causal attention over a multi-scale tokenizer's scales, VAR, see
:mod:`vqkit.prior.nextscale`), the architecture options (command-line flags of
``vqkit prior``) and four shape fields that come from the tokenizer and its data, not
from the user (``vocab_size``, ``code_shape``, ``scales``, ``num_classes``).
:class:`PriorTrainConfig` holds the training options. A prior checkpoint stores both
``to_dict()`` and rebuilds them with ``from_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import UserError
from ..options import (
    Options,
    nonneg,
    nonneg_int,
    option,
    positive_int,
    unit_interval,
    unit_interval_excl_one,
    with_defaults,
)
from ..runtime.options import JobOptions

__all__ = ["PriorConfig", "PriorTrainConfig"]


KINDS = ("autoregressive", "masked", "next-scale")
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
        "autoregressive (causal, one code per pass, KV cache), masked (MaskGIT: "
        "bidirectional, fills masked codes, decodes in a few parallel passes, edits) or "
        "next-scale (VAR: a multi-scale tokenizer's scales, one pass per scale)",
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
        0.1, "dropout on attention weights and residual branches", check=unit_interval_excl_one
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
    code_shape: list[int] = field(default_factory=list)  # (h, w), (h, w, Q) or (L,)
    # the sides of a multi-scale tokenizer's scales, coarse to fine (its quantizer's
    # code_group_shapes); empty for a tokenizer of one group
    scales: list[int] = field(default_factory=list)
    num_classes: int = 0  # 0: unconditional (only the null class)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "masked" and self.mask_schedule != "cosine":
            raise UserError(
                f"mask_schedule={self.mask_schedule!r} applies to a masked prior "
                f"(--kind masked); this one is {self.kind}"
            )
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            head = self.n_embd // self.n_head
            raise UserError(f"pos='rope' needs an even head size; got {head}")
        self.code_shape = [int(s) for s in self.code_shape]  # a JSON trip gives a list
        self.scales = [int(s) for s in self.scales]
        if self.code_shape and (len(self.code_shape) not in (1, 2, 3) or min(self.code_shape) < 1):
            raise UserError(f"code_shape must be (h, w), (h, w, Q) or (L,); got {self.code_shape}")
        pairs = zip(self.scales, self.scales[1:], strict=False)
        if self.scales and (min(self.scales) < 1 or any(a >= b for a, b in pairs)):
            raise UserError(f"scales must be strictly increasing positive ints; got {self.scales}")
        length = sum(s * s for s in self.scales)
        if self.scales and self.code_shape and self.code_shape != [length]:
            raise UserError(
                f"scales {self.scales} make sequences of {length} codes; code_shape is "
                f"{self.code_shape}"
            )
        if self.kind == "next-scale":
            if self.pos == "rope":  # positions are (scale, row, column): learned embeddings
                raise UserError("a next-scale prior takes learned positions (--pos learned)")
            if self.code_shape and len(self.scales) < 2:
                raise UserError(
                    f"--kind next-scale needs a multi-scale tokenizer (--quantizer multiscale "
                    f"with 2 or more scales): these codes {self.code_shape} are one "
                    f"{'scale' if self.scales else 'map'}, with no coarser scale to predict from"
                )
        for name in ("vocab_size", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{name} must be an int >= 0; got {v!r}")

    @property
    def masked(self) -> bool:
        """True for the masked (MaskGIT) kind."""
        return self.kind == "masked"

    @property
    def next_scale(self) -> bool:
        """True for the next-scale (VAR) kind."""
        return self.kind == "next-scale"

    @property
    def seq_len(self) -> int:
        """T = h * w (* Q), or L = sum s_i^2: codes per image, the length of a sequence."""
        return math.prod(self.code_shape) if self.code_shape else 0


_PriorJobOptions = with_defaults(
    JobOptions,
    "_PriorJobOptions",
    steps=3000,
    batch_size=64,
    lr=6e-4,
    warmup_steps=100,
    lr_schedule="cosine",
    min_lr_ratio=0.1,
    grad_clip=1.0,
)


@dataclass
class PriorTrainConfig(_PriorJobOptions):  # type: ignore[misc, valid-type]
    """Options of one ``vqkit prior`` training run: every job's options
    (:class:`vqkit.runtime.options.JobOptions`, with the prior's defaults: 3000 steps of
    64 sequences, AdamW at 6e-4 with 100 warmup steps and a cosine decay to 0.1 x,
    gradients clipped at 1) and the prior's own."""

    renamed: ClassVar[dict[str, str]] = {"warmup": "warmup_steps"}  # stored configs, flags

    weight_decay: float = option(
        0.1,
        "AdamW weight decay of the weight matrices",
        check=nonneg,
        on_resume="fixed",  # AdamW's restored param groups keep the stored value
    )
    eval_sequences: int = option(
        2000, "sequences per split of each evaluation (evenly strided); 0: all", check=nonneg_int
    )
    num_samples: int = option(
        16,
        "images in the sample grid of each evaluation (a speech codec's prior: WAV clips "
        "of one window each)",
        check=nonneg_int,
    )
    audio_window: int = option(
        32,
        "a speech codec's codes: frames per sequence; each clip is cut into windows of this "
        "many frames from its start, the last one shorter (its padding left out of the "
        "loss), and vqkit compress codes a clip window by window (32: every FSDD clip but "
        "one in 1000 whole at 25 frames/s)",
        check=positive_int,
        on_resume="fixed",
    )
    audio_stages: int = option(
        0,
        "a speech codec's codes: model the first N residual stages only (the codes of the "
        "codec's bitrate at N stages); 0: all",
        check=nonneg_int,
        on_resume="fixed",
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> PriorTrainConfig:
        """Options from a dict; a name an older vqkit wrote (``warmup``) is read as today's."""
        values = {cls.renamed.get(k, k): v for k, v in values.items()}
        return super().from_dict(values, where=where)
