"""The package's shape, held by tests: no import cycles (imports inside functions count: they are where the
batch driver and its Ray replicas used to import each other), and the batch package resolves its engine in
one place (`BatchJob.engine`), never by calling the engine mapping itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmops"

pytestmark = pytest.mark.unit


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    prefix = package
                    for _ in range(node.level - 1):
                        prefix = prefix.rpartition(".")[0]
                    base = f"{prefix}.{node.module}" if node.module else prefix
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.split(".")[0] == "llmops" else None
                # a package's __init__ re-exporting its children is not a cycle
                if found and found != module and not (path.name == "__init__.py" and found.startswith(module + ".")):
                    graph[module].add(found)
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, cycles[:5]


def test_the_batch_package_resolves_its_engine_in_one_place():
    calls = []
    for path in (PACKAGE / "batch").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "engine_args", "engine_env", "resolve_engine"):
                calls.append(f"{path.name}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("job.py"), calls
