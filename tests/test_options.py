"""Tests of vqkit's options module: compose refuses two declarations of one name that
differ."""

from dataclasses import dataclass

import pytest

from vqkit.options import Options, compose, option


@dataclass
class Shared(Options):
    weight: float = option(1.0, "a shared weight")


@dataclass
class A(Shared):
    a: int = option(1, "a")


@dataclass
class B(Shared):
    b: int = option(2, "b")


def _group(name, default, **kw):
    return dataclass(
        type(
            name, (Options,), {"__annotations__": {"t": "float"}, "t": option(default, "tau", **kw)}
        )
    )


def test_one_declaration_inherited_by_two_groups_composes():
    flat = compose("Flat", (A, B), bases=(Options,))
    assert flat.defaults() == {"weight": 1.0, "a": 1, "b": 2}


@pytest.mark.parametrize(
    "other, what",
    [
        (dict(default=0.01), "default 1.0 vs 0.01"),
        (dict(default=1.0, type=int), "type"),
        (dict(default=1.0, choices=(1.0, 2.0)), "choices"),
    ],
)
def test_two_declarations_that_differ_are_refused_naming_both_groups(other, what):
    lfq = _group("LFQish", 1.0)
    ibq = _group("IBQish", **other)
    with pytest.raises(TypeError, match=rf"'t' is declared twice, by LFQish and IBQish.*{what}"):
        compose("Flat", (lfq, ibq))


def test_two_equal_declarations_compose_as_one():
    flat = compose("Flat", (_group("X", 0.5), _group("Y", 0.5)), bases=(Options,))
    assert flat.defaults() == {"t": 0.5}
