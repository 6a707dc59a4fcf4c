"""The package graph and the contracts, checked from the source (no imports executed).

Packages depend downward only: spaces <- trainers <- search <- analysis <- recscale (the
command line). Function-local imports count: a hidden upward import is still a cycle.
Contracts (metric names, MLflow tags, the tracking-URI rule) are spelled only in
``trainers/contracts.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainers import contracts

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("spaces", "trainers", "search", "analysis", "recscale")


def _modules() -> list[Path]:
    return sorted(p for pkg in ORDER for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level project packages imported anywhere in ``path`` (functions included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        out.update(n.split(".")[0] for n in names if n.split(".")[0] in ORDER)
    return out


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in ORDER}
    for path in _modules():
        pkg = path.relative_to(ROOT).parts[0]
        graph[pkg] |= _imports(path) - {pkg}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages() -> None:
    cycle = _cycle(package_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_packages_import_only_downward() -> None:
    graph = package_graph()
    for pkg, deps in graph.items():
        upward = {d for d in deps if ORDER.index(d) > ORDER.index(pkg)}
        assert not upward, f"{pkg} imports {sorted(upward)} (allowed: {ORDER[:ORDER.index(pkg)]})"


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _string_constants(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


# the MLflow layout's tag names and the tracking-URI rule are declared once
DECLARED_ONCE = {contracts.TAG_KIND, contracts.TAG_PARENT, contracts.TAG_CONFIG,
                 contracts.TAG_SEARCH, contracts.TAG_STORAGE, contracts.TAG_DATA_FINGERPRINT,
                 "MLFLOW_TRACKING_URI", "mlflow.db"}


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_contracts_are_spelled_only_in_the_contracts_module(path: Path) -> None:
    if path == ROOT / "trainers" / "contracts.py":
        return
    found = [(line, value) for line, value in _string_constants(path)
             if value in DECLARED_ONCE or value in (contracts.OBJECTIVE,)]
    assert not found, f"{path.name} spells contract names {found}; import them from trainers.contracts"


def test_metric_list_is_declared_once() -> None:
    """No other module lists the trial metrics (a tuple/list holding most of them)."""
    metrics = set(contracts.METRICS)
    for path in _modules():
        if path == ROOT / "trainers" / "contracts.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                assert len(values & metrics) < 4, f"{path.name}:{node.lineno} lists metrics"
