"""docs/architecture.md stays true: every module of src/vqkit is named on it, rooms
import only downward, and module-level imports have no cycles."""

from __future__ import annotations

import ast
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


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
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
        for target in _imports(name, path, top_level_only=False):
            other = _room(target)
            if other is None or other not in RANKS:
                continue
            if RANKS[other] > RANKS[room] or (RANKS[other] == RANKS[room] and other != room):
                bad.append(f"{name} -> {target}")
    assert not bad, f"upward or sideways imports: {bad}"


def test_no_import_cycles():
    modules = _modules()
    graph = {
        n: {t for t in _imports(n, p, top_level_only=True) if t in modules and t != n}
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
