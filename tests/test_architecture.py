"""docs/architecture.md stays true: every module of src/vqkit is named on it, rooms
import only downward, imports have no cycles (those inside functions included), no
library module imports a CLI module, and the library's rooms load without the
tokenizer's training job."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vqkit"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# rooms, lowest first: a room may import its own room and any room of a lower rank
RANKS = {
    "options": 0,
    "errors": -1,
    "distributed": 0,
    "search": 1,
    "metrics": 1,
    "storage": 1,
    "codebook": 2,
    "quantizers": 3,
    "models": 4,
    "data": 4,
    "losses": 4,
    "evaluation": 5,
    "runtime": 5,
    "training": 6,
    "prior": 7,
    "compress": 8,
    "cli": 9,
    "__main__": 10,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): a block that never runs."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, runtime_only: bool):
    """Every node under ``node`` (function bodies included); ``runtime_only``: without
    the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` branch runs)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if runtime_only and _is_type_checking(child):
            for sub in child.orelse:
                yield sub
                yield from _walk(sub, runtime_only)
            continue
        yield from _walk(child, runtime_only)


def _imports(name: str, path: Path, *, runtime_only: bool = False) -> set[str]:
    """The vqkit modules ``name`` imports anywhere: at module level and inside functions
    (and, unless ``runtime_only``, in ``if TYPE_CHECKING:`` blocks)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = _walk(tree, runtime_only)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "vqkit" or m.startswith("vqkit.")}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_is_named_on_the_architecture_page():
    doc = DOC.read_text()
    missing = []
    for path in sorted(_modules().values()):
        if path.name == "__init__.py":
            continue
        if f"{path.name}`" not in doc and f"{path.stem}.py" not in doc:
            missing.append(str(path.relative_to(SRC)))
    assert not missing, f"modules missing from docs/architecture.md: {missing}"


def test_every_room_has_a_rank():
    rooms = {_room(n) for n in _modules() if _room(n)}
    assert rooms <= set(RANKS), f"rooms without a rank here: {rooms - set(RANKS)}"


def test_rooms_import_only_downward():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        room = _room(name)
        if room is None:  # the package front re-exports from every room
            continue
        for target in _imports(name, path):
            other = _room(target)
            if other is None or other not in RANKS:
                continue
            if RANKS[other] > RANKS[room] or (RANKS[other] == RANKS[room] and other != room):
                bad.append(f"{name} -> {target}")
    assert not bad, f"upward or sideways imports: {bad}"


def test_no_import_cycles():
    """Imports inside functions count: a deferred import that closes a cycle still ties
    the two modules to each other, whichever of them loads first. An ``if
    TYPE_CHECKING:`` import (a name for an annotation; it never runs) does not."""
    modules = _modules()
    graph = {
        n: {t for t in _imports(n, p, runtime_only=True) if t in modules and t != n}
        for n, p in modules.items()
    }
    # a package's __init__ importing its own submodules is how packages are built
    for n in graph:
        graph[n] = {t for t in graph[n] if not t.startswith(n + ".")}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for t in graph[n]:
            if state.get(t) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(t) :] + [t])}")
            if t not in state:
                visit(t, stack + [t])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def _is_cli(module: str) -> bool:
    return module.split(".")[-1] in ("cli", "__main__")


def test_no_library_module_imports_a_cli_module():
    """Only a command-line module (``cli.py``, ``__main__.py``) imports a ``cli`` module,
    at module level or inside a function: what the library needs lives in the library."""
    bad = sorted(
        f"{name} -> {target}"
        for name, path in _modules().items()
        if not _is_cli(name)
        for target in _imports(name, path)
        if target.split(".")[-1] == "cli"
    )
    assert not bad, f"library modules importing a CLI module: {bad}"


TRAINING_JOB = ("vqkit.training.tokenizer", "vqkit.training.adversarial_step")


@pytest.mark.parametrize("package", ["vqkit.compress", "vqkit.prior"])
def test_compress_and_prior_load_without_the_tokenizer_training_job(package):
    """A fresh interpreter that imports the prior or the codec does not load the
    tokenizer's trainer nor its adversarial step (they belong to ``vqkit train``)."""
    code = (
        f"import sys, {package}; print(' '.join(m for m in {TRAINING_JOB!r} if m in sys.modules))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    loaded = run.stdout.split()
    assert not loaded, f"import {package} loads {loaded}"
