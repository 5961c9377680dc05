"""The package's import graph: no circle, and a config that imports only leaves."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vesuvius_monai"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules that ``path`` imports, at module level or inside a function (a deferred import is a
    dependency all the same), with the packages above each (Python runs a package's ``__init__`` first), except the
    importer's own packages."""
    name = module_name(path)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if path.name == "__init__.py":
        own.add(name)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in modules and candidate not in own:
                    found.add(candidate)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): module_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (a list of modules, first == last), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_find_cycle_finds_a_circle_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "vesuvius_monai.config.sections" in graph and graph["vesuvius_monai.cli"]
    assert find_cycle(graph) == []


def test_the_config_imports_only_leaves():
    """The config imports no module of the package that imports the config back (directly or not)."""
    graph = import_graph()
    config = {m for m in graph if m == "vesuvius_monai.config" or m.startswith("vesuvius_monai.config.")}
    reached, todo = set(), [d for m in config for d in graph[m] if d not in config]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    assert not reached & config
    assert reached <= {"vesuvius_monai", "vesuvius_monai.errors", "vesuvius_monai.io", "vesuvius_monai.io.atomic",
                       "vesuvius_monai.io.lock", "vesuvius_monai.io.paths", "vesuvius_monai.metrics",
                       "vesuvius_monai.metrics.names"}, \
        sorted(reached)

