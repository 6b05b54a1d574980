"""No import circles inside ``dpo_jax``, and no import of a higher layer (``LAYERS``):
the package's modules import downward only.

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


# The layers, lowest first (docs/ARCHITECTURE.md "The layers"). A module imports only
# modules of its own layer or of lower ones; within a layer only the cycle test applies.
# A package name covers its submodules, the longest listed name wins, and every module
# must be covered by a name other than the bare package (a new module picks its layer).
LAYERS: dict[str, int] = {
    # 0: leaves every layer may use: errors, paths, run guards, the metrics log
    PACKAGE: 0,
    f"{PACKAGE}.errors": 0,
    f"{PACKAGE}.paths": 0,
    f"{PACKAGE}.integrity": 0,
    f"{PACKAGE}.metrics": 0,
    f"{PACKAGE}.guards": 0,
    f"{PACKAGE}.hub": 0,  # Hub names -> local snapshot directories
    # 1: models
    f"{PACKAGE}.models": 1,
    # 2: data, losses, scoring, objectives, and the pure pieces the step is built from
    f"{PACKAGE}.data": 2,
    f"{PACKAGE}.losses": 2,
    f"{PACKAGE}.metric_accumulators": 2,
    f"{PACKAGE}.logprobs": 2,
    f"{PACKAGE}.scoring": 2,
    f"{PACKAGE}.objectives": 2,
    f"{PACKAGE}.ppo": 2,
    f"{PACKAGE}.policy_gradient": 2,
    f"{PACKAGE}.sharding": 2,
    f"{PACKAGE}.optim": 2,
    f"{PACKAGE}.lora": 2,  # adapters are a params transform the step applies
    f"{PACKAGE}.configs": 2,  # default.py reads data's and sharding's defaults
    f"{PACKAGE}.fast_random": 2,  # jax-equal categorical draws, pure
    f"{PACKAGE}.code_fingerprint": 2,  # hashes of the loss / objective code a config uses
    f"{PACKAGE}.token_choice": 2,  # greedy / top-k / top-p over logits, pure
    # 3: the step
    f"{PACKAGE}.train_step": 3,
    # 4: trainer, checkpoints, the loop, sampling, rewards, rollouts
    f"{PACKAGE}.trainer": 4,
    f"{PACKAGE}.loading": 4,
    f"{PACKAGE}.loop": 4,
    f"{PACKAGE}.checkpoint": 4,
    f"{PACKAGE}.resume": 4,
    f"{PACKAGE}.export": 4,
    f"{PACKAGE}.reference": 4,
    f"{PACKAGE}.ref_fingerprint": 4,
    f"{PACKAGE}.sampling": 4,
    f"{PACKAGE}.saved_models": 4,
    f"{PACKAGE}.callbacks": 4,  # on_log / on_eval / on_save of the loop
    f"{PACKAGE}.startup": 4,  # the start-up summary of a run  # a policy from a HF directory or a checkpoint
    f"{PACKAGE}.rewards": 4,
    f"{PACKAGE}.judge": 4,
    f"{PACKAGE}.reward_model": 4,
    f"{PACKAGE}.reward_sources": 4,
    f"{PACKAGE}.evaluation": 4,
    f"{PACKAGE}.rollouts": 4,
    f"{PACKAGE}.ppo_loop": 4,
    f"{PACKAGE}.group_loop": 4,
    f"{PACKAGE}.online_dpo": 4,
    f"{PACKAGE}.online": 4,
    # validates the whole config, on-policy sections included (online.METHODS)
    f"{PACKAGE}.configs.validate": 4,
    # 5: entry points: the Python API's setup and the command line
    f"{PACKAGE}.train": 5,
    f"{PACKAGE}.cli": 5,
}

# Upward edges that exist today, each with its reason; empty is the goal.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _layer(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest listed name that is `module` or a package above it
    (the bare package covers only itself)."""
    name = module
    while name:
        if name in layers and (name != PACKAGE or module == PACKAGE):
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def _upward(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """`a (L) -> b (M)` for every import of a higher layer, and every module without one."""
    found = [f"{m}: in no layer (add it to LAYERS)" for m in graph if _layer(m, layers) is None]
    for mod in sorted(graph):
        for dep in sorted(graph[mod]):
            lm, ld = _layer(mod, layers), _layer(dep, layers)
            if None in (lm, ld) or ld <= lm or (mod, dep) in ALLOWED_UPWARD:
                continue
            found.append(f"{mod} (layer {lm}) -> {dep} (layer {ld})")
    return found


def test_a_lazy_upward_import_is_caught(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text(f"def f():\n    from {PACKAGE} import high\n")
    (pkg / "high.py").write_text("from . import low\n")
    (pkg / "stray.py").write_text("")
    layers = {PACKAGE: 0, f"{PACKAGE}.low": 1, f"{PACKAGE}.high": 2}
    assert _upward(_edges(_modules(pkg)), layers) == [
        f"{PACKAGE}.stray: in no layer (add it to LAYERS)",
        f"{PACKAGE}.low (layer 1) -> {PACKAGE}.high (layer 2)",
    ]


def test_modules_import_only_their_layer_or_lower():
    found = _upward(_edges(_modules()), LAYERS)
    assert not found, "imports of a higher layer (docs/ARCHITECTURE.md):\n  " + "\n  ".join(found)
