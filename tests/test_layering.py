"""The package's import graph, built from the AST of every module (every import, lazy ones inside functions included;
TYPE_CHECKING imports aside), has no circle: neither between modules nor between the top-level units (a top-level
module, or a subpackage taken as one: ``scoresolve.solvers``, ``scoresolve.evaluation``, ...), so no import points
up. No allow-list: the models <-> cli circle of the 0.1.0 ``python -m scoresolve.models.*`` shims is gone. The
command line is the top: only ``scoresolve.__main__`` imports it. The grids read saved grids without importing the
optimiser."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "scoresolve"


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
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):  # import scoresolve.x.y: the deepest package module named
                for a in node.names:
                    parts = a.name.split(".")
                    hits = [".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in mods]
                    if hits and hits[0] != name:
                        graph[name].add(hits[0])
                continue
            if not isinstance(node, ast.ImportFrom):
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


def _unit(module: str) -> str:
    """The top-level unit of a module: scoresolve.solvers.ode -> scoresolve.solvers, scoresolve.sde -> itself."""
    return ".".join(module.split(".")[:2])


def _unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = defaultdict(set)
    for a, targets in list(graph.items()):
        units[_unit(a)] |= {_unit(b) for b in targets if _unit(b) != _unit(a)}
    return units


def test_no_import_circle_between_package_modules():
    mods = _modules()
    graph = _graph(mods)
    assert "scoresolve.solvers._grid" in graph["scoresolve.solvers._registry"]  # the graph sees real imports
    assert "scoresolve.models.train" in graph["scoresolve.cli.train"]  # lazy imports inside functions too
    bad = _cycles(graph, sorted(mods))
    assert not bad, f"import circles between modules: {[sorted(c) for c in bad]}"


def test_no_upward_import_between_top_level_units():
    mods = _modules()
    units = _unit_graph(_graph(mods))
    bad = _cycles(units, sorted({_unit(m) for m in mods}))
    assert not bad, f"import circles between top-level units (an import pointing up): {[sorted(c) for c in bad]}"
    # the order the layers stand in (each imports only those below it)
    assert "scoresolve.solvers" not in units["scoresolve.sde"] | units["scoresolve.process"]
    assert not {"scoresolve.evaluation", "scoresolve.likelihood"} & units["scoresolve.reverse_variance"]
    assert {u for u, targets in units.items() if "scoresolve.cli" in targets} == {"scoresolve.__main__"}


def test_the_circle_check_fails_on_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [sorted(c) for c in _cycles(defaultdict(set, graph), ["a", "b", "c", "d"])] == [["a", "b", "c"]]
    assert _unit_graph({"scoresolve.models.train": {"scoresolve.cli.train", "scoresolve.models.mlp"}}) == {
        "scoresolve.models": {"scoresolve.cli"}}


def test_grids_do_not_import_the_optimiser():
    graph = _graph(_modules())
    assert "scoresolve.tuning" not in graph["scoresolve.solvers.time_grids"]
    assert not any(m.startswith("scoresolve.tuning") or m == "scoresolve.sampling"
                   for m in graph["scoresolve.solvers._registry"] | graph["scoresolve.solvers.grid_store"])
