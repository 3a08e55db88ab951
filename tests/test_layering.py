"""The package's import graph (every import, lazy ones inside functions included; TYPE_CHECKING imports aside) has no
circle, except the models <-> cli shims (`python -m scoresolve.models.train|evaluate` call the cli), and the grids
read saved grids without importing the optimiser."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "scoresolve"
KNOWN = {frozenset({"scoresolve.cli", "scoresolve.models"})}  # the packages of a tolerated circle


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for cand in [target] + [f"{target}.{a.name}" for a in node.names]:
                if cand in mods and cand != name:
                    graph[name].add(cand)
    return graph


def _cycles(graph: dict[str, set[str]], nodes: list[str]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_package_modules():
    mods = _modules()
    graph = _graph(mods)
    assert "scoresolve.solvers._grid" in graph["scoresolve.solvers._registry"]  # the graph sees real imports
    bad = [c for c in _cycles(graph, sorted(mods))
           if frozenset(".".join(m.split(".")[:2]) for m in c) not in KNOWN]
    assert not bad, f"import circles: {[sorted(c) for c in bad]}"


def test_grids_do_not_import_the_optimiser():
    graph = _graph(_modules())
    assert "scoresolve.tuning" not in graph["scoresolve.solvers.grids"]
    assert not any(m.startswith("scoresolve.tuning") or m == "scoresolve.sampling"
                   for m in graph["scoresolve.solvers._registry"] | graph["scoresolve.solvers.grid_store"])
