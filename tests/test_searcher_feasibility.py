"""The budgeted searcher under the serving cap: rejected samples, and an enqueued point
(a family to cover) that almost never fits."""

from __future__ import annotations

import logging
from typing import Any

import optuna
import pytest

from search.budget import BudgetPolicy
from search.searcher import MAX_FIXED_RESAMPLES, BudgetedOptunaSearch


def _space(trial: optuna.Trial) -> dict[str, Any]:
    trial.suggest_categorical("block", ["wide", "narrow"])
    trial.suggest_int("width", 1, 64)
    return {}


def _feasible(flat: dict[str, Any]) -> tuple[bool, float, str]:
    """``wide`` never fits under the cap; ``narrow`` fits when width <= 32."""
    cost = flat["width"] * (1e6 if flat["block"] == "wide" else 1e3)
    return cost <= 32e3, cost - 32e3, f"flops_per_example {cost:.3g} > cap 3.2e+04"


def _searcher(points: list[dict[str, Any]]) -> BudgetedOptunaSearch:
    return BudgetedOptunaSearch(space=_space, feasibility=_feasible,
                                policy=BudgetPolicy(1e12, 1e6, (1e6, 1e7)),
                                metric="loss", mode="min", seed=0, points_to_evaluate=points)


def test_a_point_that_never_fits_is_dropped_not_the_search(caplog: pytest.LogCaptureFixture) -> None:
    search = _searcher([{"block": "wide"}, {"block": "narrow"}])
    with caplog.at_level(logging.WARNING, logger="search.searcher"):
        # the two points take turns (a rejected point goes back to the end of the queue)
        # until `narrow` fits; `wide` stays enqueued ...
        first = search.suggest("t0")
        assert first["block"] == "narrow" and _feasible(first)[0]
        assert "dropped" not in caplog.text
        # ... and has its tries in the next suggestion, then is dropped, not the search
        second = search.suggest("t1")
    assert isinstance(second, dict) and _feasible(second)[0]
    assert "dropped from the points to evaluate" in caplog.text and "'wide'" in caplog.text
    wide = [t for t in search._ot_study.trials if t.params.get("block") == "wide"]
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in wide)
    assert MAX_FIXED_RESAMPLES <= len(wide) < 2 * MAX_FIXED_RESAMPLES
    assert isinstance(search.suggest("t2"), dict)  # free samples from here on
    assert len([t for t in search._ot_study.trials if t.params.get("block") == "wide"]) < len(wide) + 20


def test_a_search_whose_every_sample_fails_still_ends() -> None:
    """No config at all under the cap: the searcher ends the search (FINISHED), as before."""
    search = BudgetedOptunaSearch(space=_space, feasibility=lambda flat: (False, 1.0, "over"),
                                  policy=BudgetPolicy(1e12, 1e6, (1e6, 1e7)),
                                  metric="loss", mode="min", seed=0)
    assert search.suggest("t0") == BudgetedOptunaSearch.FINISHED


def test_a_restored_searcher_keeps_its_rejections(tmp_path) -> None:
    """What Tune saves of the searcher (``save``, each experiment checkpoint) holds the
    samples it rejected; a resumed search's searcher starts from them, so the count the
    parent run reports covers every segment."""
    search = _searcher([{"block": "wide"}, {"block": "narrow"}])
    assert isinstance(search.suggest("t0"), dict)
    assert search.rejected  # `wide` never fits
    path = str(tmp_path / "searcher.pkl")
    search.save(path)
    again = _searcher([])
    again.restore(path)
    assert again.rejected == search.rejected
    assert isinstance(again.suggest("t1"), dict)
    assert len(again.rejected) >= len(search.rejected)
