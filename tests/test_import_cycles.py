"""No import circles inside ``fedseg``.

Every ``import`` / ``from ... import`` of a fedseg module counts, wherever it stands: at the top
of a module, inside a function, or under ``if TYPE_CHECKING`` (a circle hidden in a function is
still a circle in the design, and the next edit that moves the import to the top breaks
start-up). A package's ``__init__`` importing its own submodules is not a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fedseg

ROOT = Path(fedseg.__file__).resolve().parent

#: circles known and being removed; each entry must still exist (delete it once it is gone)
ALLOWED: list[list[str]] = [["fedseg.study.report", "fedseg.study.study"]]


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name of a source file under ``root`` (the ``fedseg`` package folder)."""
    parts = ["fedseg", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """The fedseg modules that ``path`` imports (submodules named in ``from`` imports too)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    # `import fedseg.a.b` runs fedseg.a too, but that edge is the package's own business
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module name to the fedseg modules it imports."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(f, known, root) for f in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_find_cycles_reports_a_circle_and_nothing_else() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}

    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "fedseg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedseg.b import X\n"
    )
    (pkg / "b.py").write_text("def f():\n    from fedseg import a\n")

    graph = import_graph(pkg)

    assert graph["fedseg.a"] == {"fedseg.b"}
    assert graph["fedseg.b"] == {"fedseg.a"}
    assert find_cycles(graph) == [["fedseg.a", "fedseg.b"]]


@pytest.mark.parametrize("module", ["fedseg.config", "fedseg.federation.strategy"])
def test_graph_knows_the_package(module: str) -> None:
    assert module in import_graph()


def test_no_import_circles_in_fedseg() -> None:
    cycles = find_cycles(import_graph())

    assert [c for c in cycles if c not in ALLOWED] == []


@pytest.mark.parametrize("allowed", ALLOWED)
def test_allowed_circle_still_exists(allowed: list[str]) -> None:
    assert allowed in find_cycles(import_graph())
