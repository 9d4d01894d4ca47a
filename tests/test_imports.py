"""dream_core reads bottom-up: every module imports at top level, and no chain of its modules'
imports comes back to where it started. An import inside a function still counts (it is how a
circle hides), so the graph is read from the source, at any depth."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "dream_core"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
MODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py"))


def intra_package_imports(source: str, modules: set[str]) -> set[str]:
    """The package's modules a module's source imports, wherever the import statement sits
    (`from .x import y`, `from . import x`, `from dream_core.x import y`, `import dream_core.x`;
    a name taken from the package itself is an import of `__init__`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE:
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue  # beyond the package
            if node.level == 1:
                target = node.module
            elif node.module and node.module.split(".")[0] == PACKAGE:
                target = ".".join(node.module.split(".")[1:]) or None
            else:
                continue
            if target:
                found.add(target.split(".")[0])
            else:  # `from . import x`: a module, or a name of the package's __init__
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
    return found & modules


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    modules = {p.stem for p in package_dir.glob("*.py")}
    return {p.stem: intra_package_imports(p.read_text(), modules) - {p.stem}
            for p in sorted(package_dir.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module):
    importlib.import_module(f"{PACKAGE}.{module}" if module != "__init__" else PACKAGE)


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_sees_a_circle_hidden_in_a_function(tmp_path):
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (tmp_path / "c.py").write_text("from dream_core import a\n")
    (tmp_path / "d.py").write_text("from .a import f\nimport os\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
