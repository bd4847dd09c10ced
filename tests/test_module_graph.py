"""The rule of the code's shape that a reader relies on: no module of ``router`` imports one that
imports it back, directly or through others, counting imports made only for type checking and
those made inside functions (a cycle there is a cycle in the design all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "router"


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the router modules it imports (``from package import module`` names the module)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {other for other in found if other in modules and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path that comes back to where it started, for every module on such a path."""
    found, reported = [], set()
    for start in sorted(graph):
        path, stack, seen = [start], [iter(sorted(graph[start]))], {start}
        while stack:
            following = next(stack[-1], None)
            if following is None:
                stack.pop()
                seen.discard(path.pop())
                continue
            if following == start and start not in reported:
                found.append([*path, start])
                reported.update(path)
            elif following not in seen and following not in reported and following > start:
                path.append(following)
                seen.add(following)
                stack.append(iter(sorted(graph[following])))
    return found


def test_the_graph_is_read_whole():
    graph = imports(module_names())
    assert "router.store.sqlite_sql" in graph["router.store.sqlite"]  # from router.store import sqlite_sql
    assert "router.delivery" in graph["router.app"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(imports(module_names())) == []
