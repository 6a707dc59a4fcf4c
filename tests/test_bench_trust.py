"""bench/trust.py keeps a dataset's earlier runs when it records a new one."""

from __future__ import annotations

from types import ModuleType

from tests.bench_scripts import load_bench


def _bench() -> ModuleType:
    return load_bench("trust")


def test_a_new_run_keeps_the_earlier_ones_newest_first() -> None:
    keep = _bench().keep
    results: dict = {"movielens-1m": {"val_auc": 0.81}, "synthetic": {"val_auc": 0.7}}
    keep(results, "movielens-1m", {"val_auc": 0.82})
    keep(results, "movielens-1m", {"val_auc": 0.83})
    ml = results["movielens-1m"]
    assert ml["val_auc"] == 0.83
    assert [e["val_auc"] for e in ml["earlier"]] == [0.82, 0.81]
    assert all("earlier" not in e for e in ml["earlier"])  # one flat list, not nested
    assert results["synthetic"] == {"val_auc": 0.7}  # other datasets untouched
    keep(results, "new", {"val_auc": 0.5})
    assert "earlier" not in results["new"]
