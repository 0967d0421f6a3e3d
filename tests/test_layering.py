"""Layering: the core imports no higher layer, and no module imports itself back through others.

Read statically (ast) from the sources, function-level imports included: a lazy import still ties
the two modules together, and a cycle of them is the same tangle at run time. Layers, low to high:
`latentwire/` (core: codec, settings, registry, model runtime) < `bridge/`, `compression/` <
`services/`. Every module is also imported for real, so a module the graph names is one that loads.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("latentwire", "bridge", "compression", "services")
CORE, HIGHER = "latentwire", ("bridge", "compression", "services")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports anywhere in its source (`from a import b` counts as
    a.b when that is a module, else as a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    out = set()
    for mod in found:  # `import a.b.c` names a.b.c; keep the longest project module it names
        while mod and mod not in MODULES:
            mod = mod.rpartition(".")[0]
        if mod and mod != name:
            out.add(mod)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
CHECKED = GRAPH


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_graph_sees_the_packages():
    assert {"latentwire.codec", "bridge.base", "bridge.load", "services.bridge_service"} <= set(GRAPH)
    assert "bridge.base" in GRAPH["bridge.perceiver"] and "latentwire.codec" in GRAPH["bridge.token_index"]


def test_the_core_imports_no_higher_layer():
    bad = {name: sorted(m for m in deps if m.split(".")[0] in HIGHER)
           for name, deps in CHECKED.items() if name.split(".")[0] == CORE}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_import_cycles():
    assert _cycles(CHECKED) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)
