"""Audit a finished search: is what MLflow and Tune hold whole and consistent?

After faults (a killed driver, Ctrl-C, a killed trial, a truncated checkpoint) and the
resumes that followed, a search must still satisfy recscale's promises. The audit reads
the search back (MLflow through the tracking store, Tune's experiment state from the
storage the parent run names) and lists every broken promise:

* one MLflow child run per trial, none left RUNNING, the parent FINISHED;
* every child's metric series with strictly increasing steps, in the order logged (no
  duplicates, nothing going backwards, so nothing re-logged after a restore);
* the parent's spent FLOPs within the budget's documented overshoot (one report
  interval per concurrent trial), and not below what the children's runs show they
  trained (work lost to faults is spent, not hidden);
* every trial Tune ran has its MLflow run, and every trial run (besides those closed
  as ``LOST`` and the reference models the driver trains) is a trial Tune knows.

Example::

    report = audit_search("my-search", "sqlite:///mlflow.db")
    assert report.ok, report.problems
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from analysis.runs import AnalysisError
from search.references import is_reference_id
from trainers.contracts import (
    KIND_SEARCH,
    KIND_TRIAL,
    LOST_FLOPS,
    OBJECTIVE,
    SEARCH_PREFIX,
    STEP_AXIS,
    TAG_KIND,
    TAG_PARENT,
    TAG_STATUS,
    TAG_STORAGE,
    TAG_TRIAL_ID,
    default_tracking_uri,
)

__all__ = ["AuditReport", "audit_search"]

#: The series checked for duplicate or backward steps.
SERIES = (OBJECTIVE, STEP_AXIS)


@dataclass
class AuditReport:
    """The audit's findings: ``problems`` (empty when every promise holds) and the
    numbers they were judged on."""

    problems: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _series_problems(client: Any, run_id: str, trial_id: str) -> list[str]:
    out = []
    for key in SERIES:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
        steps = [int(m.step) for m in points]
        if len(set(steps)) != len(steps):
            out.append(f"trial {trial_id}: {key} logged twice at "
                       f"{len(steps) - len(set(steps))} step(s)")
        back = sum(b < a for a, b in zip(steps, steps[1:]))
        if back:
            out.append(f"trial {trial_id}: {key} went backwards {back} time(s)")
    return out


def _tune_problems(storage: str, children: list[Any]) -> tuple[list[str], int | None]:
    from ray.tune import ExperimentAnalysis

    try:
        tune_trials = ExperimentAnalysis(storage).trials
    except (ValueError, OSError, RuntimeError) as err:
        return [f"Tune's state in {storage} cannot be read: {err}"], None
    known = {t.trial_id for t in tune_trials}
    ran = {t.trial_id for t in tune_trials if t.last_result}
    logged = {str(r.data.tags.get(TAG_TRIAL_ID)) for r in children
              if r.data.tags.get(TAG_STATUS) != "LOST"
              and not is_reference_id(r.data.tags.get(TAG_TRIAL_ID))}
    out = []
    if ran - logged:
        out.append(f"trials Tune ran without an MLflow run: {sorted(ran - logged)}")
    if logged - known:
        out.append(f"trial runs Tune does not know, not closed as lost: {sorted(logged - known)}")
    return out, len(ran)


def audit_search(name: str, tracking_uri: str | None = None) -> AuditReport:
    """Check the search ``name`` in the MLflow store ``tracking_uri`` (see the module
    docstring).

    Raises:
        AnalysisError: no such search in that store.
    """
    from mlflow.tracking import MlflowClient

    from analysis.runs import load_search
    from search.settings import SearchConfig

    uri = default_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise AnalysisError(f"no search named {name!r} in {uri}")
    runs = client.search_runs([str(exp.experiment_id)], max_results=50_000)
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == KIND_SEARCH]
    report = AuditReport()
    problems = report.problems
    if len(parents) != 1:
        problems.append(f"{len(parents)} search parent runs (want 1)")
    if not parents:
        return report
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get(TAG_KIND) == KIND_TRIAL
                and r.data.tags.get(TAG_PARENT) == parent.info.run_id]
    if parent.info.status != "FINISHED":
        problems.append(f"the parent run is {parent.info.status}")
    ids = [str(r.data.tags.get(TAG_TRIAL_ID)) for r in children]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"trials with more than one run: {', '.join(dup)}")
    running = [str(r.data.tags.get(TAG_TRIAL_ID)) for r in children if r.info.status == "RUNNING"]
    if running:
        problems.append(f"{len(running)} trial run(s) left RUNNING: {', '.join(running)}")
    trained = 0.0
    lost_runs = 0
    for r in children:
        problems += _series_problems(client, r.info.run_id, str(r.data.tags.get(TAG_TRIAL_ID)))
        steps = [int(m.step) for m in client.get_metric_history(r.info.run_id, OBJECTIVE)]
        trained += max(steps, default=0)
        lost_runs += r.data.tags.get(TAG_STATUS) == "LOST"
    m = parent.data.metrics
    spent = float(m.get(f"{SEARCH_PREFIX}spent_flops", float("nan")))
    report.numbers.update({"trial_runs": len(children), "lost_runs": lost_runs,
                           "trained_flops": trained, "spent_flops": spent,
                           "lost_flops": float(m.get(f"{SEARCH_PREFIX}{LOST_FLOPS}", 0.0))})
    try:
        cfg = SearchConfig.model_validate(load_search(name, uri).settings)
    except (AnalysisError, ValueError):
        problems.append("the search's settings (search.json) cannot be read back")
    else:
        interval = min(cfg.grace, cfg.trial_budget) / cfg.reports_per_grace
        bound = cfg.budget_flops + cfg.max_concurrent * interval
        report.numbers.update({"budget_flops": cfg.budget_flops, "overshoot_bound": bound})
        if not spent <= bound:
            problems.append(f"spent {spent:.4g} FLOPs, over the budget's bound {bound:.4g}")
    if trained > spent * (1 + 1e-9):
        problems.append(f"the trial runs trained {trained:.4g} FLOPs but the search counts "
                        f"{spent:.4g}: work not accounted for")
    storage = parent.data.tags.get(TAG_STORAGE)
    if storage:
        found, n_ran = _tune_problems(storage, children)
        problems += found
        report.numbers["tune_trials_run"] = n_ran
    return report
