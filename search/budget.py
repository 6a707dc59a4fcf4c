"""The search's FLOPs budget: who may start, and when everything stops.

Spend is the sum over every trial of what it has cost, its last reported ``work_flops``
(:data:`~trainers.contracts.WORK_ATTR`: its ``train_flops`` plus the segments it trained
again after a restore or a retry). Two parties read it:

* the searcher (:class:`search.searcher.BudgetedOptunaSearch`) starts a new trial only if
  what is left, after the running trials reach their next ASHA milestone, still covers a
  new trial's grace period, and declares the search finished once less than a grace
  period is left;
* :class:`BudgetStopper` stops every running trial once the budget is spent. It is also a
  Tune callback, so after a restore it rebuilds the spend of trials that finished before
  the interruption from their last results.

So the total can overshoot ``budget_flops`` by at most one report interval of each trial
running at the moment the budget is reached.

A resumed search knows more than Tune's saved state: the runner reads MLflow when it
resumes (``search.runner.reconcile_resumed``) and sets here the work of trials Tune does
not know (*untracked spend*: trials lost to a driver kill, :func:`set_untracked_spend`)
and, for the trials it restores, the work their runs logged after Tune last saved
(*floors*, :func:`set_work_floors`). Both parties count a trial's work as the larger of
its reports and its floor, so a restored trial's spend is neither forgotten nor, once it
reports again, counted twice. Work is counted as it is done, never charged ahead: a trial
restored with its re-run segment still ahead costs nothing until it trains it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ray import tune

from trainers.contracts import TIME_ATTR, WORK_ATTR

__all__ = ["BudgetPolicy", "BudgetStopper", "counted_spend", "note_tune_trials",
           "reported_work", "set_untracked_spend", "set_work_floors", "tune_view",
           "untracked_spend"]

_UNTRACKED = {"flops": 0.0}  # this driver process's; set once per (re)start by the runner
_FLOORS: dict[str, float] = {}  # likewise: trial id -> work its run logged (MLflow)


def set_untracked_spend(flops: float) -> None:
    """FLOPs spent outside the trials Tune knows (see the module docstring)."""
    _UNTRACKED["flops"] = float(flops)


def untracked_spend() -> float:
    return _UNTRACKED["flops"]


def set_work_floors(floors: Mapping[str, float]) -> None:
    """The work each restored trial's run logged (see the module docstring)."""
    _FLOORS.clear()
    _FLOORS.update({str(k): float(v) for k, v in floors.items()})


def reported_work(result: Mapping[str, Any]) -> float | None:
    """What a trial's report says it has cost: ``work_flops``, or ``train_flops`` from a
    report without it (a diverged trial's last loop report, an older search's)."""
    value = result.get(WORK_ATTR, result.get(TIME_ATTR))
    return None if value is None else float(value)


def counted_spend(work: Mapping[str, float]) -> float:
    """The search's spend: every trial's work (``trial id -> its furthest reported
    work``), each at least its floor, plus the trials' floors that have not reported in
    this process and the untracked spend.

    Example:
        >>> set_work_floors({"a": 900.0}); set_untracked_spend(50.0)
        >>> counted_spend({"a": 300.0, "b": 100.0})  # a restored "a" re-running 0..900
        1050.0
        >>> counted_spend({"a": 1200.0})
        1250.0
        >>> set_work_floors({}); set_untracked_spend(0.0)
    """
    floors = _FLOORS
    total = sum(max(v, floors.get(t, 0.0)) for t, v in work.items())
    total += sum(f for t, f in floors.items() if t not in work)
    return total + untracked_spend()


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

    def decide(self, spent: Mapping[str, float], running: Iterable[str],
               work: Mapping[str, float] | None = None) -> Decision:
        """``spent``: each trial's furthest ``train_flops`` (where it stands between
        ASHA's milestones); ``work``: what each has cost (:func:`counted_spend`;
        ``spent`` when not given)."""
        total = counted_spend(spent if work is None else work)
        if self.budget_flops - total < self.grace_flops:
            return "done"
        reserved = sum(self.committed(spent.get(t, 0.0)) for t in running)
        if self.budget_flops - total - reserved >= self.grace_flops:
            return "start"
        return "wait"


class BudgetStopper(tune.Stopper, tune.Callback):
    """Stops the whole search once the trials' summed work reaches the budget."""

    def __init__(self, budget_flops: float) -> None:
        self.budget_flops = budget_flops
        self.spent: dict[str, float] = {}  # trial id -> its furthest reported work

    @property
    def total(self) -> float:
        return counted_spend(self.spent)

    def _count(self, trial_id: str, result: Mapping[str, Any]) -> None:
        work = reported_work(result)
        if work is not None:  # monotone; an older search's retried trial reported lower
            self.spent[trial_id] = max(self.spent.get(trial_id, 0.0), work)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self._count(trial_id, result)
        return self.total >= self.budget_flops

    def stop_all(self) -> bool:
        return self.total >= self.budget_flops

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        note_tune_trials(trials)
        for trial in trials:  # restored trials carry their spend in last_result
            self._count(trial.trial_id, trial.last_result or {})
