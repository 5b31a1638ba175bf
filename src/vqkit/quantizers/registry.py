"""The quantizer kinds: each quantizer module registers its option group here, and
everything that builds a quantizer by name (the model, the CLI, config files) goes
through :func:`build_quantizer`.

A kind is ``(name, options)``: ``options`` is a :class:`QuantizerOptions` dataclass
declared in the quantizer's own module (type, default, check and help of every
option, once) whose :meth:`~QuantizerOptions.build` makes the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..options import Options, option_fields

if TYPE_CHECKING:
    from .base import BaseQuantizer

__all__ = [
    "QuantizerKind",
    "QuantizerOptions",
    "build_quantizer",
    "get_kind",
    "quantizer_kinds",
    "register_quantizer",
]


@dataclass
class QuantizerOptions(Options):
    """The declared options of one quantizer kind; :meth:`build` makes the module.

    The rule tying the three names of an option: the field name is the constructor's
    argument name, and the flag is ``--`` + that name with ``_`` -> ``-`` (so
    ``build_quantizer(kind, dim, **constructor_kwargs)`` works). ``renamed`` maps the
    names older configs stored to today's ({old: new}); a kind lists there every
    option it renames, so checkpoints and config files keep loading."""

    renamed: ClassVar[dict[str, str]] = {}

    def build(self, dim: int) -> BaseQuantizer:
        """The quantizer for inputs with ``dim`` channels."""
        raise NotImplementedError


@dataclass(frozen=True)
class QuantizerKind:
    name: str
    options: type[QuantizerOptions]
    help: str

    def option_names(self) -> frozenset[str]:
        return frozenset(f.name for f in option_fields(self.options))


_KINDS: dict[str, QuantizerKind] = {}


def register_quantizer(name: str, options: type[QuantizerOptions], help: str) -> None:
    """Make ``--quantizer name`` (and ``build_quantizer(name, ...)``) build
    ``options(...).build(dim)``. Called once at the bottom of each quantizer module."""
    if name in _KINDS and _KINDS[name].options is not options:
        raise ValueError(f"quantizer kind {name!r} is already registered")
    _KINDS[name] = QuantizerKind(name, options, help)


def quantizer_kinds() -> tuple[str, ...]:
    """Registered kind names, in registration order."""
    return tuple(_KINDS)


def get_kind(name: str) -> QuantizerKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"quantizer must be one of {list(_KINDS)}; got {name!r}") from None


def build_quantizer(kind: str, dim: int, **options: Any) -> BaseQuantizer:
    """A quantizer of ``kind`` for inputs with ``dim`` channels, from its declared
    options (unknown names are errors), e.g.
    ``build_quantizer("ema", 64, num_embeddings=512, decay=0.99)``,
    ``build_quantizer("rvq", 64, num_quantizers=4, stage="ema")``,
    ``build_quantizer("fsq", 64, levels="8,5,5,5")``."""
    spec = get_kind(kind)
    return spec.options.from_dict(options, where=f"{kind} options").build(dim)
