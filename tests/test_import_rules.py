"""DESIGN.md's import rule, checked on every import statement (also those inside
functions): coordinator -> scheduler, pricing, protocol; scheduler -> pricing, protocol;
node_agent -> protocol; pricing and protocol import none of the others. And no import
circle between the coordinator's own modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"coordinator", "scheduler", "pricing", "node_agent", "protocol", "agora"}
ALLOWED = {
    "coordinator": {"scheduler", "pricing", "protocol"},
    "scheduler": {"pricing", "protocol"},
    "pricing": set(),
    "protocol": set(),
    "node_agent": {"protocol"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" not in path.parts:
            yield path


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_the_design_allows(package):
    bad = []
    for path in _modules(package):
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_no_import_circles_inside_the_coordinator():
    graph = {}
    for path in _modules("coordinator"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in _imports(path) if m.startswith("coordinator.") and m != name}
    cycles = []

    def visit(node, stack):
        for nxt in graph.get(node, ()):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, stack + [nxt])

    for start in graph:
        seen = {start}
        visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles))[:20])
