"""OptunaSearch that never proposes an infeasible config and spends a FLOPs budget.

Feasibility is decided from the config alone (analytic FLOPs, block dimension rules)
before a trial exists: an infeasible sample is told to Optuna as PRUNED with a positive
constraint value (``Trial.set_constraint``), so TPE learns to avoid that region, and is
re-sampled. Such a config is never trained.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.budget import BudgetPolicy, counted_spend, reported_work, tune_view
from search.settings import MIN_STARTUP_TRIALS
from trainers.contracts import TIME_ATTR, UserError

__all__ = ["SAMPLERS", "BudgetedOptunaSearch", "Feasibility", "compact_finished_trial",
           "create_sampler"]

log = logging.getLogger(__name__)

# (feasible, constraint value (<= 0 feasible), reason)
Feasibility = Callable[[dict[str, Any]], tuple[bool, float, str]]

MAX_RESAMPLES = 500
#: how many samples an enqueued point (a family to cover) gets to find a feasible config
#: before it is dropped and the search samples freely: a family with a sliver of its
#: space under the serving cap (Wukong at 2e4 FLOPs/example: ~0 of 400 random draws)
#: must not end the search
MAX_FIXED_RESAMPLES = 100

#: OptunaSearch's warning that the define-by-run space is slow (it is TPE that is)
_SLOW_SPACE_WARNING = "Define-by-run function passed in the `space` argument took"

#: system attributes a multivariate sampler sets on a running trial to share its relative
#: sample with other workers (``optuna.samplers._tpe.sampler._RELATIVE_PARAMS_KEY``, and
#: the GP sampler's); a finished trial's ``params`` supersede them (TPESampler._get_params)
_RELATIVE_PARAMS_PREFIXES = ("tpe:relative_params:", "gp:relative_params:")


def compact_finished_trial(study: optuna.Study, trial_id: int,
                           interned: dict[Any, Any]) -> None:
    """Shrink what an in-memory Optuna study keeps of a finished trial, changing nothing
    a sampler reads.

    Each suggestion builds its own distribution object (``suggest_categorical`` makes a
    ``CategoricalDistribution`` with its choices at every call) and the trial keeps it:
    equal distributions are replaced by one shared object (``interned``, distribution ->
    itself; distributions are immutable and compare and hash by value), and the
    parameter names (built afresh for each trial by the space) by interned strings. The relative
    sample TPE shares while a trial runs (a JSON string per trial) is dropped: for a
    finished trial TPE reads ``params``. Only for ``InMemoryStorage`` (the searcher's);
    private ``InMemoryStorage._get_trial``/``_lock`` (optuna 5.0.0,
    ``tests/test_driver_memory.py`` checks them).
    """
    storage = study._storage
    if not isinstance(storage, optuna.storages.InMemoryStorage):
        return
    with storage._lock:
        trial = storage._get_trial(trial_id)
        if not trial.state.is_finished():
            return
        trial.params = {sys.intern(name): value for name, value in trial.params.items()}
        trial.distributions = {sys.intern(name): interned.setdefault(dist, dist)
                               for name, dist in trial.distributions.items()}
        attrs = trial.system_attrs
        if any(key.startswith(_RELATIVE_PARAMS_PREFIXES) for key in attrs):
            trial.system_attrs = {key: value for key, value in attrs.items()
                                  if not key.startswith(_RELATIVE_PARAMS_PREFIXES)}


def _tpe(seed: int, multi_objective: bool, startup_trials: int) -> optuna.samplers.BaseSampler:
    """TPE, multivariate and grouped so conditional knobs are modelled jointly, sampling
    at random until ``startup_trials`` trials have finished; NSGA-II when there are two
    objectives."""
    if multi_objective:
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials,
                                      multivariate=True, group=True, constant_liar=True)


def _random(seed: int, multi_objective: bool, startup_trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


#: name -> Optuna sampler factory ``(seed, multi_objective, startup_trials) -> sampler``
SAMPLERS: dict[str, Callable[[int, bool, int], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "random": _random,
}


def create_sampler(kind: str, seed: int, multi_objective: bool = False,
                   startup_trials: int = MIN_STARTUP_TRIALS) -> optuna.samplers.BaseSampler:
    """The Optuna sampler registered as ``kind``; an unknown name lists the valid ones.
    ``startup_trials``: finished trials a model-based sampler waits for, sampling at
    random meanwhile (TPE's ``n_startup_trials``)."""
    try:
        factory = SAMPLERS[kind]
    except KeyError:
        raise UserError(f"unknown searcher {kind!r}; valid: {', '.join(sorted(SAMPLERS))}") from None
    return factory(seed, multi_objective, startup_trials)


class BudgetedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` with a feasibility filter and a FLOPs-budget admission rule.

    Args:
        space: the define-by-run function (``SearchSpace.suggest``).
        feasibility: maps a flat sampled config to ``(ok, constraint, reason)``.
        policy: the budget admission rule.
        **kwargs: passed to ``OptunaSearch`` (metric, mode, sampler, ...).
    """

    def __init__(self, space: Callable[..., Any], feasibility: Feasibility,
                 policy: BudgetPolicy, **kwargs: Any) -> None:
        super().__init__(space=space, **kwargs)
        self._feasibility = feasibility
        self._policy = policy
        self._spent: dict[str, float] = {}  # trial id -> furthest train_flops (ASHA's axis)
        self._work: dict[str, float] = {}  # trial id -> furthest work_flops (the budget's)
        self._live: dict[str, int] = {}  # running trial id -> Tune's step at its suggestion
        self.rejected: list[str] = []
        self._interned: dict[Any, Any] = {}  # see compact_finished_trial
        # OptunaSearch warns when the define-by-run space takes over 1 s, the time in its
        # text: the warnings registry then keeps one key per warning, i.e. per trial
        # late in a search, where TPE's sampling (inside that function) takes that long
        warnings.filterwarnings("ignore", message=_SLOW_SPACE_WARNING, category=UserWarning)

    # Private attributes used below, for want of a public API (checked against ray 2.60.0
    # and optuna 5.0.0; tests/test_private_apis.py fails loudly if they change):
    # OptunaSearch._ot_trials (trial id -> optuna Trial) and OptunaSearch._ot_study, to
    # tell Optuna a rejected sample as PRUNED; OptunaSearch._completed_trials (ids told
    # as finished; tests/test_driver_memory.py), to forget a finished trial's handle;
    # optuna Trial._trial_id, to read the enqueued point's "fixed_params" system attribute
    # and enqueue it again.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if trial_id not in self._ot_trials:
            self._forget_trials_tune_dropped()
            decision = self._policy.decide(self._spent, self._live, self._costs())
            if decision == "done":
                return Searcher.FINISHED
            if decision == "wait":
                return None
        tries: dict[str, int] = {}  # an enqueued point's fixed part -> its rejections
        for _ in range(MAX_RESAMPLES):
            params = super().suggest(trial_id)
            assert params is not None
            ot_trial = self._ot_trials[trial_id]
            ok, violation, reason = self._feasibility(params)
            ot_trial.set_constraint("feasible", violation)
            if ok:
                self._live[trial_id] = tune_view()[0]
                self._spent.setdefault(trial_id, 0.0)
                return params
            self.rejected.append(reason)
            assert self._ot_study is not None
            fixed = ot_trial.storage.get_trial_system_attrs(ot_trial._trial_id).get("fixed_params")
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            del self._ot_trials[trial_id]
            if self.forget_finished:
                self._compact(ot_trial._trial_id)
            if not fixed:
                continue
            key = repr(sorted(fixed.items()))
            tries[key] = tries.get(key, 0) + 1
            if tries[key] < MAX_FIXED_RESAMPLES:
                # an enqueued point (e.g. a family to cover) keeps its fixed part ...
                self._ot_study.enqueue_trial(fixed, skip_if_exists=False)
            else:  # ... unless almost none of it fits: then it is given up, not the search
                log.warning("no feasible config with %s in %d samples (last reason: %s); "
                            "it is dropped from the points to evaluate", fixed,
                            MAX_FIXED_RESAMPLES, reason)
        log.error("no feasible config in %d samples; last reason: %s", MAX_RESAMPLES, reason)
        return Searcher.FINISHED

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # Tune's steps count from 0 in each driver process (search.budget.tune_view):
        # the running trials of a saved state are checked from this process's first step
        self._live = dict.fromkeys(self._live, 0)

    def _forget_trials_tune_dropped(self) -> None:
        """Complete, as errored, every trial this searcher counts as running that Tune
        has finished without telling it (see :func:`search.budget.tune_view`): otherwise
        its reservation would keep new trials waiting, for ever once nothing else runs."""
        step, unfinished = tune_view()
        for trial_id in [t for t, at in self._live.items() if at < step and t not in unfinished]:
            log.warning("trial %s ended without its result reaching the searcher (Tune "
                        "could not reuse an actor for it); told to Optuna as failed", trial_id)
            self.on_trial_complete(trial_id, error=True)

    #: Drop a finished trial's ``optuna.Trial`` handle once its result is told (see
    #: :meth:`on_trial_complete`) and compact what the study keeps of it
    #: (:func:`compact_finished_trial`); a class attribute so a benchmark can measure without.
    forget_finished = True

    def _compact(self, storage_id: int) -> None:
        """:func:`compact_finished_trial` on the study's trial ``storage_id`` (a searcher
        pickled before this existed has no ``_interned`` yet)."""
        if self._ot_study is not None:
            compact_finished_trial(self._ot_study, storage_id,
                                   self.__dict__.setdefault("_interned", {}))

    # Tune (ray 2.60 ``TuneController.save_to_dir``) writes the experiment state, then the
    # searcher state: a driver killed between the two resumes trials that the restored
    # searcher never suggested. Their spend still counts; Optuna is simply not told about
    # them (OptunaSearch would raise KeyError and end the search).
    def _knows(self, trial_id: str) -> bool:
        if trial_id in self._ot_trials or trial_id in self._completed_trials:
            return True  # a completed one: OptunaSearch ignores it with a warning
        log.warning("trial %s is not in the restored searcher state (saved before it was "
                    "suggested); its result is not told to Optuna", trial_id)
        return False

    def _work_done(self) -> dict[str, float]:
        """Trial id -> its furthest reported work (a searcher pickled before work was
        counted has none yet)."""
        done: dict[str, float] = self.__dict__.setdefault("_work", {})
        return done

    def _costs(self) -> dict[str, float]:
        """Trial id -> what it has cost: its work, at least its ``train_flops``."""
        done = self._work_done()
        return {t: max(v, done.get(t, 0.0)) for t, v in self._spent.items()} | {
            t: w for t, w in done.items() if t not in self._spent}

    def _count(self, trial_id: str, result: dict[str, Any]) -> None:
        """Monotone: a retried trial's ``train_flops`` restart lower for a while."""
        if TIME_ATTR in result:
            self._spent[trial_id] = max(self._spent.get(trial_id, 0.0), float(result[TIME_ATTR]))
        work = reported_work(result)
        if work is not None:
            done = self._work_done()
            done[trial_id] = max(done.get(trial_id, 0.0), work)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._count(trial_id, result)
        if self._knows(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if result:
            self._count(trial_id, result)
        self._live.pop(trial_id, None)
        ot_trial = self._ot_trials.get(trial_id)
        if self._knows(trial_id):
            super().on_trial_complete(trial_id, result=result, error=error)
        if self.forget_finished and trial_id in self._completed_trials:
            if ot_trial is not None:
                self._compact(ot_trial._trial_id)
            # Told to the study, which keeps the trial (TPE needs it); the handle holds
            # only a stale copy of it (``Trial._cached_frozen_trial``) and the sampler's
            # relative search space, and nothing asks for it again: OptunaSearch answers
            # a late result or completion of a completed trial from ``_completed_trials``.
            self._ot_trials.pop(trial_id, None)

    @property
    def spent(self) -> float:
        """What the search has cost, as this searcher counts it (:func:`counted_spend`)."""
        return counted_spend(self._costs())
