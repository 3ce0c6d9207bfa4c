"""The layering: every import arrow between the package's modules points one way (no circles).

The graph is built statically (``ast`` over the source files, nothing is imported), so a circle is
caught even when it only closes inside a function at run time. What counts as an arrow from
module A to module B:

- every ``import`` and ``from ... import`` in A that names B, wherever it stands: at module level,
  inside a function or method (a deferred import is still a dependency; deferring one side of a
  circle hides it from the import system, not from the reader), or under ``if TYPE_CHECKING``;
- ``from pkg import name`` points at the submodule ``pkg.name`` when there is one, else at ``pkg``
  (its ``__init__``); relative imports are resolved against A's package;
- the implicit import of a parent package (importing ``t0s1.rag.store`` first runs
  ``t0s1/rag/__init__.py``) is not an arrow: that is how Python loads packages, not a choice of A.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "t0s1"


@dataclass(frozen=True)
class Arrow:
    source: str
    target: str
    line: int
    deferred: bool
    """The import stands inside a function or method (runs on call, not on import)."""


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file, for every ``.py`` file under ``root`` (a package's ``__init__`` is the package)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of the package's modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, modules: dict[str, Path]):
        self.module, self.path, self.modules = module, path, modules
        self.arrows: list[Arrow] = []
        self.depth = 0

    def _visit_function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def _add(self, target: str | None, node: ast.stmt) -> None:
        if target is not None and target != self.module:
            self.arrows.append(Arrow(self.module, target, node.lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(_owning_module(alias.name, self.modules), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = _resolve_relative(self.module, _is_package(self.path), node.level, node.module)
        else:
            base = node.module or ""
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.modules else _owning_module(base, self.modules), node)


def import_arrows(root: Path = SOURCE, package: str = "t0s1") -> list[Arrow]:
    """Every arrow between the package's own modules (imports of other packages are left out)."""
    modules = module_names(root, package)
    arrows = []
    for module, path in modules.items():
        visitor = _ImportVisitor(module, path, modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        arrows.extend(visitor.arrows)
    return arrows


@dataclass(frozen=True)
class Circle:
    path: list[str]
    """A shortest circle through the group's first module: ``[a, b, ..., a]``."""
    members: list[str]
    """Every module in the knot (each reaches every other one), sorted."""


def import_cycles(arrows: list[Arrow]) -> list[Circle]:
    """One circle per strongly connected group of modules (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for arrow in arrows:
        graph.setdefault(arrow.source, set()).add(arrow.target)
        graph.setdefault(arrow.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the module count (a few hundred)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [Circle(_circle_in(group, graph), group) for group in sorted(groups)]


def _circle_in(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest circle through the group's first module (breadth-first search back to it)."""
    start, members = group[0], set(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def describe(circle: Circle, arrows: list[Arrow], modules: dict[str, Path], root: Path) -> str:
    """``a -> b -> a``, the import lines that make each arrow, and the other modules in the knot."""
    lines = [" -> ".join(circle.path)]
    for source, target in zip(circle.path, circle.path[1:]):
        where = sorted({
            (arrow.line, f"{modules[source].relative_to(root.parent).as_posix()}:{arrow.line}"
             + (" (in a function)" if arrow.deferred else ""))
            for arrow in arrows
            if arrow.source == source and arrow.target == target
        })
        lines.append(f"    {source} -> {target}: " + ", ".join(text for _, text in where))
    others = sorted(set(circle.members) - set(circle.path))
    if others:
        lines.append("    also in this knot: " + ", ".join(others))
    return "\n".join(lines)


def test_the_package_has_no_import_circles():
    arrows = import_arrows()
    modules = module_names(SOURCE, "t0s1")
    circles = import_cycles(arrows)
    assert not circles, (
        "Import circles (every arrow between t0s1's modules must point one way; move the shared "
        "piece into a module both import, see docs/architecture.md):\n"
        + "\n".join(describe(circle, arrows, modules, SOURCE) for circle in circles)
    )


def test_the_graph_sees_every_kind_of_import():
    """The checker itself: arrows of every kind are found, so a circle cannot hide from it."""
    arrows = {(arrow.source, arrow.target, arrow.deferred) for arrow in import_arrows()}
    assert ("t0s1.models", "t0s1.backends.llamacpp", True) in arrows  # inside load_model
    assert ("t0s1", "t0s1.models", False) in arrows  # from t0s1.models import ... in __init__
    assert ("t0s1.backends.llamacpp", "t0s1.errors", False) in arrows


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"a.py": "def f():\n    from pkg import b\n", "b.py": "import pkg.a\n"},
            [["pkg.a", "pkg.b", "pkg.a"]],
            id="deferred-import-closes-the-circle",
        ),
        pytest.param(
            {"sub/__init__.py": "", "sub/x.py": "from . import y\n", "sub/y.py": "from ..c import name\n",
             "c.py": "from pkg.sub.x import thing\n"},
            [["pkg.c", "pkg.sub.x", "pkg.sub.y", "pkg.c"]],
            id="relative-imports",
        ),
        pytest.param(
            {"a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
             "b.py": "from pkg import a\n"},
            [["pkg.a", "pkg.b", "pkg.a"]],
            id="type-checking-import",
        ),
        pytest.param(
            {"sub/__init__.py": "from pkg.sub.x import X\n", "sub/x.py": "import json\nfrom pkg import c\n",
             "c.py": "import os\n"},
            [],
            id="one-way-with-a-package-init",
        ),
    ],
)
def test_circles_are_found_and_named(tmp_path, files, expected):
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    arrows = import_arrows(root, "pkg")
    circles = import_cycles(arrows)
    assert [circle.path for circle in circles] == expected
    for circle in circles:
        message = describe(circle, arrows, module_names(root, "pkg"), root)
        assert message.startswith(" -> ".join(circle.path)) and "pkg/" in message
