"""A budgeted searcher over a one-knob space, for tests of its bookkeeping."""

from __future__ import annotations

from typing import Any

import optuna

from search.budget import BudgetPolicy
from search.searcher import BudgetedOptunaSearch


def _space(trial: optuna.Trial) -> dict[str, int]:
    trial.suggest_int("x", 0, 3)
    return {}


def small_searcher(policy: BudgetPolicy | None = None, **kwargs: Any) -> BudgetedOptunaSearch:
    """``BudgetedOptunaSearch`` over ``x ∈ {0..3}``, every config feasible, minimising
    ``loss``; by default a budget that always has room (1e9 FLOPs, grace 1e6)."""
    return BudgetedOptunaSearch(space=_space, feasibility=lambda flat: (True, -1.0, "ok"),
                                policy=policy or BudgetPolicy(1e9, 1e6, (1e6, 1e7)),
                                metric="loss", mode="min", **({"seed": 0} | kwargs))
