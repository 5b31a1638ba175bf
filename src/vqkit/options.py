"""One home per option.

An option is declared once, as a dataclass field made by :func:`option`: its type,
default, validation and help text. Everything else derives from that declaration:
the constructor checks (:class:`Options`), config files and checkpoint metadata
(:meth:`Options.from_dict` / :meth:`Options.to_dict`), the command-line flags
(:func:`add_arguments`) and the flat configurations composed of several option
groups (:func:`compose`).

    @dataclass
    class EMAOptions(CodebookOptions):
        decay: float = option(0.99, "EMA decay of the codebook statistics", check=unit_interval)

Field annotations are documentation only (``from __future__ import annotations``
makes them strings); the runtime type is ``type=`` or the default's type.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar

from .errors import UserError

__all__ = [
    "Options",
    "add_arguments",
    "compose",
    "option",
    "option_fields",
    "with_defaults",
    "finite",
    "nonneg",
    "nonneg_int",
    "positive",
    "positive_int",
    "unit_interval",
    "unit_interval_excl_one",
    "unit_interval_excl_zero",
]

Check = Callable[[Any], "str | None"]
G = TypeVar("G")


def option(
    default: Any,
    help: str,
    *,
    type: type | None = None,
    choices: Iterable[Any] | None = None,
    check: Check | None = None,
    applies_to: str = "",
    on_resume: str = "apply",
) -> Any:
    """A dataclass field that declares an option.

    Args:
        default: the default value (``None`` allowed when ``type`` is given).
        help: one line for ``--help`` and the docs.
        type: ``int``, ``float``, ``str`` or ``bool``; default: the default's type.
        choices: the allowed values, if a closed set.
        check: ``check(value) -> None | str``: returns what the value must be
            (e.g. ``"> 0"``) when it is invalid. Floats are also checked finite.
        applies_to: a short note for the help text (e.g. ``"rvq"``).
        on_resume: ``"apply"`` (a resumed run may change it; the change is applied and
            reported) or ``"fixed"`` (it shapes the state in the checkpoint: a resumed
            run that asks for another value is refused).
    """
    if on_resume not in ("apply", "fixed"):
        raise UserError(f"on_resume must be 'apply' or 'fixed'; got {on_resume!r}")
    typ = type if type is not None else builtin_type(default)
    meta = {
        "help": help,
        "type": typ,
        "choices": tuple(choices) if choices is not None else None,
        "check": check,
        "applies_to": applies_to,
        "on_resume": on_resume,
    }
    return field(default=default, metadata=meta)


def builtin_type(default: Any) -> type:
    for t in (bool, int, float, str):
        if isinstance(default, t):
            return t
    raise TypeError(f"option default {default!r} needs an explicit type=")


def option_fields(cls: Any) -> tuple[Field, ...]:
    """The declared options of a dataclass (fields made by :func:`option`)."""
    return tuple(f for f in fields(cls) if "help" in f.metadata)


def coerce(name: str, value: Any, f: Field) -> Any:
    """``value`` as the option's type, or a ValueError naming the option."""
    typ = f.metadata["type"]
    if value is None:
        if f.default is None:
            return None
        raise UserError(f"{name} must be a {typ.__name__}; got None")
    if typ is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false; got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise UserError(f"{name} must be an int; got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number; got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number; got {value!r}")
    elif typ is str:
        if not isinstance(value, str):
            raise UserError(f"{name} must be a string; got {value!r}")
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise UserError(f"{name} must be one of {list(choices)}; got {value!r}")
    check = f.metadata["check"]
    if check is not None:
        problem = check(value)
        if problem:
            raise UserError(f"{name} must be {problem}; got {value!r}")
    return value


@dataclass
class Options:
    """Base of every option group: validates (and coerces) each declared field on
    construction, reads and writes plain dicts."""

    def __post_init__(self) -> None:
        for f in option_fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), f))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> Any:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"{where}: unknown options {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def group(self, cls: type[G]) -> G:
        """The option group ``cls`` (a class whose options this flat config holds, e.g. the
        loss terms' ``LossOptions`` of a ``TrainConfig``), typed and checked."""
        return cls(**{f.name: getattr(self, f.name) for f in option_fields(cls)})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def compose(
    name: str,
    groups: Iterable[type],
    *,
    exclude: Iterable[str] = (),
    bases: tuple[type, ...] = (),
    doc: str = "",
) -> type:
    """A flat dataclass holding the options of several groups, each field the very
    ``Field`` declared in its group. A name declared by two groups must be one option:
    the same declaration (one home: inherited from a common base), or at least the same
    default, type, choices, check and help; two declarations of one name that differ
    are refused (TypeError naming both groups and what differs), so a flat config can
    never silently take one group's default for another's."""
    seen: dict[str, tuple[Field, str]] = {}
    skip = set(exclude)
    for group in groups:
        for f in option_fields(group):
            if f.name in skip:
                continue
            if f.name not in seen:
                seen[f.name] = (f, group.__name__)
                continue
            prev, where = seen[f.name]
            differ = [k for k in ("type", "choices") if prev.metadata[k] != f.metadata[k]]
            if prev.default != f.default:
                differ.insert(0, f"default {prev.default!r} vs {f.default!r}")
            if not differ and prev is not f and prev.metadata != f.metadata:
                differ.append("check, help or resume rule")
            if differ:
                raise TypeError(
                    f"option {f.name!r} is declared twice, by {where} and {group.__name__}, "
                    f"differently ({', '.join(differ)}): declare it once, in a group both "
                    "inherit"
                )
    spec = []
    for f, _ in seen.values():
        new = dataclasses.field(default=f.default, metadata=f.metadata)
        spec.append((f.name, Any, new))
    cls = dataclasses.make_dataclass(name, spec, bases=bases)
    cls.__doc__ = doc or cls.__doc__
    return cls


def with_defaults(cls: type, name: str, doc: str = "", **defaults: Any) -> type:
    """A subclass of the option group ``cls`` whose options ``defaults`` names take other
    defaults: the same declaration otherwise (type, check, help, resume rule), so a job
    with other needs (the prior's 3000 steps) does not declare a second ``steps``. An
    unknown name is a TypeError."""
    declared = {f.name: f for f in option_fields(cls)}
    unknown = set(defaults) - set(declared)
    if unknown:
        raise TypeError(f"{cls.__name__} declares no options {sorted(unknown)}")
    spec = [
        (k, Any, dataclasses.field(default=v, metadata=declared[k].metadata))
        for k, v in defaults.items()
    ]
    out = dataclasses.make_dataclass(name, spec, bases=(cls,))
    out.__doc__ = doc or cls.__doc__
    return out


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """One ``--flag`` per declared option of ``cls`` (``default=None``, so a caller can
    tell given flags from defaults); bools get ``--flag/--no-flag``."""
    aliases = aliases or {}
    for f in option_fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, [])]
        meta = f.metadata
        text = meta["help"].replace("%", "%%")
        if meta["applies_to"]:
            text = f"{meta['applies_to']}: {text}"
        if f.default is not None:
            text += f" (default: {f.default})"
        if meta["type"] is bool:
            parser.add_argument(
                *flags,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            parser.add_argument(
                *flags,
                dest=f.name,
                type=meta["type"],
                default=None,
                help=text,
                choices=meta["choices"],
                metavar=None if meta["choices"] else f.name.upper(),
            )


# -- checks: each returns None when fine, else what the value must be --------------


def positive_int(v: int) -> str | None:
    return None if v >= 1 else "a positive int"


def nonneg_int(v: int) -> str | None:
    return None if v >= 0 else "an int >= 0"


def positive(v: float) -> str | None:
    return None if v > 0 else "> 0"


def nonneg(v: float) -> str | None:
    return None if v >= 0 else ">= 0"


def unit_interval(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "in [0, 1]"


def unit_interval_excl_one(v: float) -> str | None:
    """[0, 1): dropout rates, EMA decays, Adam betas (1 would freeze or drop everything)."""
    return None if 0.0 <= v < 1.0 else "in [0, 1)"


def unit_interval_excl_zero(v: float) -> str | None:
    """(0, 1]: fractions that must keep something (top-p mass, crop scale)."""
    return None if 0.0 < v <= 1.0 else "in (0, 1]"


def finite(v: float) -> str | None:
    return None if math.isfinite(v) else "finite"
