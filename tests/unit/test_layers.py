"""Layers that only point down: flows -> tasks -> core. The core (the ottimo package, its CLI aside) imports no
Prefect, no flows and no tasks; tasks import no flows; no two project modules import each other, directly or
through others (imports inside functions count: they are how cycles hide)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("ottimo", "tasks", "flows")
ORCHESTRATION = ("prefect", "prefect_dask", "flows", "tasks")


def modules() -> dict[str, Path]:
    """Every project module by dotted name (packages by their __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules `path` imports anywhere in its body: for `from a.b import c`, a.b.c if it is a module, else a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def test_the_core_imports_no_prefect_flows_or_tasks():
    known = modules()
    offenders = {}
    for name, path in known.items():
        if not name.startswith("ottimo") or name.startswith("ottimo.cli"):
            continue  # ottimo.cli is the one part of the package that starts flows
        bad = sorted(m for m in imports(path, known) if m.split(".")[0] in ORCHESTRATION)
        if bad:
            offenders[name] = bad
    assert not offenders, f"core modules importing the orchestration layer: {offenders}"


def test_tasks_import_no_flows():
    known = modules()
    offenders = {n: sorted(m for m in imports(p, known) if m.split(".")[0] == "flows")
                 for n, p in known.items() if n.startswith("tasks")}
    assert not {n: m for n, m in offenders.items() if m}, offenders


def test_no_import_cycles_among_project_modules():
    known = modules()
    graph = {name: {m for m in imports(path, known) if m in known and m != name} for name, path in known.items()}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_and_a_core_import_of_prefect(tmp_path):
    """The walkers above find what they look for (they would pass vacuously on a broken parser)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from prefect import flow\n    from ottimo.registry import versions\n")
    assert {"prefect", "ottimo.registry.versions"} <= imports(bad, modules())
