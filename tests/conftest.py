"""Shared fixtures. Ray and MLflow servers are started by the tests that need them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


#: modules whose tests run one after another on one pytest-xdist worker: they start
#: their own Ray clusters, MLflow servers and faults (a node killed, memory filled) with
#: timeouts of minutes, and are not run beside each other
SERIAL_MODULES = {"test_chaos", "test_cluster"}


def _uses_a_shared_fixture(item: pytest.Item) -> bool:
    """Whether the test uses a module- or class-scoped fixture (a search, a cluster)."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        defs and defs[-1].scope in ("module", "class", "package")
        for defs in info.name2fixturedefs.values())


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under ``pytest -n 2 --dist loadgroup`` (``make unit``): the modules of
    :data:`SERIAL_MODULES` share one worker, and a module's tests that share a fixture of
    module scope stay on one worker (the fixture is built once); every other test goes
    wherever a worker is free. Without xdist the mark is inert. (Marked as each item is
    collected: xdist reads the marks in its own ``pytest_collection_modifyitems``, which
    runs before a conftest's.)"""
    module = item.path.stem
    if module in SERIAL_MODULES:
        item.add_marker(pytest.mark.xdist_group("serial"))
    elif _uses_a_shared_fixture(item):
        item.add_marker(pytest.mark.xdist_group(module))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest work first, so that no worker is left with a long group at the end: the
    serial group, then every group holding a ``slow`` test, then the rest (a stable sort:
    a group's tests stay together and in their order)."""
    def group(item: pytest.Item) -> str:
        mark = item.get_closest_marker("xdist_group")
        return str(mark.args[0]) if mark is not None else item.nodeid

    slow = {group(i) for i in items if i.get_closest_marker("slow") is not None}
    items.sort(key=lambda i: 0 if group(i) == "serial" else 1 if group(i) in slow else 2)
