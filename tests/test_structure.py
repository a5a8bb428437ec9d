"""The shape of the code, guarded: no import circle in ``streams/``, no module reaching into
another module's private names, and the Faust app kept to topics, agents and timers.

A small AST pass over the runtime packages; it runs nothing of the project.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("serving", "encoders", "streams")
#: Underscore names that are public API of the standard library or of a dependency.
# Documented public names with a leading underscore (namedtuple, enum, and os._exit, the way
# a forked child ends without running the parent's exit handlers).
PUBLIC_UNDERSCORED = {"_asdict", "_replace", "_fields", "_make", "_value", "_missing_", "_name_", "_value_", "_exit"}


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (those under ``if TYPE_CHECKING:`` do not)."""

    def walk(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (n for stmt in child.orelse for n in walk_stmt(stmt))
                continue
            yield from walk_stmt(child)

    def walk_stmt(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        else:
            yield from walk(node)

    yield from walk(tree)


def imported_modules(node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    out = {base} if base in known else set()
    out |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return out


def import_graph(package: str) -> dict[str, set[str]]:
    found = dict(modules(package))
    known = set(found)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {m for node in runtime_imports(tree) for m in imported_modules(node, known)} - {name}
        # A package's __init__ runs before any of its modules: importing streams.x imports streams.
        graph[name] -= {package}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package: str) -> None:
    assert cycles(import_graph(package)) == []


def private_names_defined(tree: ast.Module) -> set[str]:
    """Underscore names a module defines: functions, classes, attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id.startswith("_"):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.startswith("_"):
            names.add(node.target.id)
    return names


def private_uses(path: Path) -> list[str]:
    """Uses of another module's private names: ``from m import _x`` from this project, and
    ``obj._x`` where ``_x`` is not defined in this module (``self``, ``cls`` and ``super()``
    may use their own class's, which a subclass of a dependency's class overrides)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = private_names_defined(tree)
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            problems += [f"{path.name}:{node.lineno} imports {node.module}.{a.name}"
                         for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or attr in PUBLIC_UNDERSCORED or attr in own:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
            continue
        problems.append(f"{path.name}:{node.lineno} uses {ast.unparse(node)}")
    return problems


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_uses_another_modules_private_names(package: str) -> None:
    problems = [p for _, path in modules(package) for p in private_uses(path)]
    assert problems == []


def test_the_app_holds_topics_agents_and_timers_only() -> None:
    app = (ROOT / "streams" / "app.py").read_text(encoding="utf-8")
    assert len(app.splitlines()) <= 250
    tree = ast.parse(app)
    create_app = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "create_app")
    nested = [n.name for n in ast.walk(create_app)
              if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n is not create_app]
    assert len(nested) <= 1, f"agents, timers and handlers are top-level functions or worker methods: {nested}"


def test_the_checks_catch_what_they_guard_against(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from streams.engine import _hidden\n\ndef f(engine):\n    return engine._core\n")
    assert len(private_uses(bad)) == 2
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
