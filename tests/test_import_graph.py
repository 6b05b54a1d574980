"""No import circles inside ``dpo_jax``: the package's modules import downward only.

The graph is read with ``ast`` (nothing is imported). Every ``import dpo_jax...``,
``from dpo_jax... import ...`` and relative import counts, at module level and inside
functions alike: a function-level import that only dodges a cycle is still a cycle edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "dpo_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under the package (``__init__`` names the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        # The package a relative import is anchored at.
        here = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = here.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # ``from pkg import sub`` imports the submodule ``pkg.sub``; otherwise a name in base.
                targets = [f"{base}.{a.name}" for a in node.names if a.name != "*"] or [base]
            for target in targets:
                if target != PACKAGE and not target.startswith(PACKAGE + "."):
                    continue
                dep = _resolve(target, modules)
                if dep is None or dep == mod:
                    continue
                graph[mod].add(dep)
                # Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first.
                parent = dep.rpartition(".")[0]
                while parent and not mod.startswith(parent + ".") and parent != mod:
                    if parent in modules:
                        graph[mod].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_graph_sees_the_package():
    graph = _edges(_modules())
    assert f"{PACKAGE}.cli" in graph and graph[f"{PACKAGE}.cli"], "the parser found no edges"


def test_a_function_level_or_relative_import_closes_a_cycle(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "a.py").write_text(f"def f():\n    from {PACKAGE} import b\n")
    (pkg / "b.py").write_text("from .sub.c import g\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    (pkg / "d.py").write_text(f"import {PACKAGE}.a\n")
    graph = _edges(_modules(pkg))
    assert graph[f"{PACKAGE}.b"] == {f"{PACKAGE}.sub", f"{PACKAGE}.sub.c"}
    assert _cycles(graph) == [[f"{PACKAGE}.{m}" for m in ("a", "b", "sub", "sub.c")]]


def test_no_import_cycles():
    graph = _edges(_modules())
    cycles = _cycles(graph)
    detail = "\n".join(
        "  "
        + ", ".join(c)
        + "\n    edges: "
        + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in cycles
    )
    assert not cycles, f"import cycles inside {PACKAGE}:\n{detail}"
