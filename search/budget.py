"""The search's FLOPs budget: who may start, and when everything stops.

Spend is the sum over every trial of its last reported ``train_flops``. Two parties
read it:

* the searcher (:class:`search.searcher.BudgetedOptunaSearch`) starts a new trial only if
  what is left, after the running trials reach their next ASHA milestone, still covers a
  new trial's grace period, and declares the search finished once less than a grace
  period is left;
* :class:`BudgetStopper` stops every running trial once the budget is spent. It is also a
  Tune callback, so after a restore it rebuilds the spend of trials that finished before
  the interruption from their last results.

So the total can overshoot ``budget_flops`` by at most one report interval of each trial
running at the moment the budget is reached.

Work Tune's trials do not account for (trials lost to a driver kill, segments a
restored trial runs again) is *untracked spend*: the runner measures it from MLflow when
it resumes a search and sets it here (:func:`set_untracked_spend`), and both parties add
it, so faults spend the budget instead of silently adding to it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ray import tune

from trainers.contracts import TIME_ATTR

__all__ = ["BudgetPolicy", "BudgetStopper", "note_tune_trials", "set_untracked_spend", "tune_view",
           "untracked_spend"]

_UNTRACKED = {"flops": 0.0}  # this driver process's; set once per (re)start by the runner


def set_untracked_spend(flops: float) -> None:
    """FLOPs spent outside the trials Tune knows (see the module docstring)."""
    _UNTRACKED["flops"] = float(flops)


def untracked_spend() -> float:
    return _UNTRACKED["flops"]


# Tune's own view of its trials, for the searcher (this driver process's): the number of
# controller steps seen so far and the trials unfinished at the latest one. Tune (ray
# 2.60) can finish a trial without telling the searcher: a reused actor whose reset
# fails (``TuneController._on_trial_reset``: the previous trial's thread outlived
# ``TUNE_FUNCTION_THREAD_TIMEOUT_S``) sets the new trial to ERROR and calls neither
# ``on_trial_complete`` nor any callback. The searcher would reserve budget for it
# forever and, once nothing else runs, wait forever.
@dataclass
class _TuneView:
    step: int = 0
    unfinished: frozenset[str] = frozenset()


_TUNE = _TuneView()


def note_tune_trials(trials: Iterable[Any]) -> None:
    """Record, at the start of a controller step, which trials Tune has not finished."""
    _TUNE.unfinished = frozenset(t.trial_id for t in trials if not t.is_finished())
    _TUNE.step += 1


def tune_view() -> tuple[int, frozenset[str]]:
    """``(step, unfinished trial ids)`` as of the latest :func:`note_tune_trials`. A
    trial added to Tune during step *k* is in every view from step *k + 1* on."""
    return _TUNE.step, _TUNE.unfinished

Decision = Literal["start", "wait", "done"]


@dataclass(frozen=True)
class BudgetPolicy:
    """Admission rule for new trials under a global FLOPs budget.

    Args:
        budget_flops: the whole search's training FLOPs.
        grace_flops: what a new trial must be able to spend (ASHA's first rung).
        milestones: ASHA's rungs in FLOPs, ending with ``trial_flops``.
    """

    budget_flops: float
    grace_flops: float
    milestones: tuple[float, ...]

    def next_milestone(self, spent: float) -> float:
        i = bisect_right(self.milestones, spent)
        return self.milestones[min(i, len(self.milestones) - 1)]

    def committed(self, spent: float) -> float:
        """FLOPs a running trial will spend before ASHA next looks at it."""
        return max(0.0, self.next_milestone(spent) - spent)

    def decide(self, spent: Mapping[str, float], running: Iterable[str]) -> Decision:
        total = sum(spent.values()) + untracked_spend()
        if self.budget_flops - total < self.grace_flops:
            return "done"
        reserved = sum(self.committed(spent.get(t, 0.0)) for t in running)
        if self.budget_flops - total - reserved >= self.grace_flops:
            return "start"
        return "wait"


class BudgetStopper(tune.Stopper, tune.Callback):
    """Stops the whole search once the trials' summed ``train_flops`` reach the budget."""

    def __init__(self, budget_flops: float) -> None:
        self.budget_flops = budget_flops
        self.spent: dict[str, float] = {}

    @property
    def total(self) -> float:
        return sum(self.spent.values()) + untracked_spend()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if TIME_ATTR in result:  # a trial Tune retried from a checkpoint reports lower
            # FLOPs again for a while; what it trained before the failure stays spent
            self.spent[trial_id] = max(self.spent.get(trial_id, 0.0), float(result[TIME_ATTR]))
        return self.total >= self.budget_flops

    def stop_all(self) -> bool:
        return self.total >= self.budget_flops

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        note_tune_trials(trials)
        for trial in trials:  # restored trials carry their spend in last_result
            flops = (trial.last_result or {}).get(TIME_ATTR)
            if flops is not None:
                self.spent[trial.trial_id] = max(self.spent.get(trial.trial_id, 0.0), float(flops))
