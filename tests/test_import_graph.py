"""The modules of ``src/convgrad`` import one way (DESIGN §2): no circles.

Every import statement of the package is read from the source (at module level and inside
functions alike, since a lazy import is still a dependency), plus the module names in the
backend registry (``register("name", "module:Class")``).  An import names a module: ``from
convgrad.a import b`` is an edge to ``convgrad.a.b`` when ``b`` is a submodule and to
``convgrad.a`` otherwise.  A package's ``__init__`` importing its own submodules is an edge
from the package to the submodule, so re-exporting is not a circle; a submodule importing a
name from its package's ``__init__`` is an edge back, and then it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import convgrad

PACKAGE_ROOT = Path(convgrad.__file__).resolve().parent
PACKAGE = "convgrad"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges from each module of the package to the modules of the package it names."""
    edges: dict[str, set[str]] = {name: set() for name in modules}

    def target(name: str) -> str | None:
        # The longest prefix of ``name`` that is a module of the package.
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in modules:
                return candidate
            parts.pop()
        return None

    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            named: list[str] = []
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve_relative(name, is_package, node.level, node.module) if node.level
                        else node.module or "")
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    named.append(submodule if submodule in modules else base)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "register"
                  and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and ":" in node.args[1].value):
                named = [node.args[1].value.split(":")[0]]
            for module in named:
                if module == PACKAGE or module.startswith(PACKAGE + "."):
                    found = target(module)
                    if found is not None and found != name:
                        edges[name].add(found)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(edges.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state:
                cycle = visit(succ)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_edges(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_lazy_imports_and_the_registry() -> None:
    edges = import_edges(_modules())
    # A lazy import inside a method, and a module named only by the registry.
    assert "convgrad.cuda_host" in edges["convgrad.backends.cupy_backend"]
    assert "convgrad.backends.numpy_backend" in edges["convgrad.backends"]
    assert "convgrad.backends.numba_backend" in edges["convgrad.backends"]


def test_no_backend_imports_from_testing() -> None:
    edges = import_edges(_modules())
    offenders = sorted(f"{module} -> {dep}" for module, deps in edges.items() if module.startswith("convgrad.backends")
                       for dep in deps if dep.startswith("convgrad.testing"))
    assert not offenders, offenders


@pytest.mark.parametrize("source, expected", [
    ("import convgrad.problem\n", {"convgrad.problem"}),
    ("from convgrad import problem\n", {"convgrad.problem"}),
    ("from . import problem\n", {"convgrad.problem"}),
    ("def f():\n    from .problem import ConvProblem\n", {"convgrad.problem"}),
    ("from convgrad import config\n", {"convgrad"}),
])
def test_edges_of_planted_imports(tmp_path: Path, source: str, expected: set[str]) -> None:
    modules = {"convgrad": PACKAGE_ROOT / "__init__.py", "convgrad.problem": PACKAGE_ROOT / "problem.py"}
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    modules["convgrad.planted"] = planted
    assert import_edges(modules)["convgrad.planted"] == expected


def test_a_planted_cycle_is_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
