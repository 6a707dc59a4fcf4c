"""Audit a finished search: is what MLflow and Tune hold whole and consistent?

After faults (a killed driver, Ctrl-C, a killed trial, a truncated checkpoint) and the
resumes that followed, a search must still satisfy recscale's promises. The audit reads
the search back (MLflow through the tracking store, Tune's experiment state from the
storage the parent run names) and lists every broken promise:

* one MLflow child run per trial, none left RUNNING, the parent FINISHED;
* every child's metric series with strictly increasing steps, in the order logged (no
  duplicates, nothing going backwards, so nothing re-logged after a restore), and no
  gaps: two consecutive reports never further apart than the trial's evaluation
  interval (``report_every_flops`` in whole batches), so no report was dropped;
* the parent's spent FLOPs within the budget's documented overshoot (one report
  interval per concurrent trial, the widest any trial planned in whole batches), and not below what the children's runs show they
  trained (work lost to faults is spent, not hidden);
* every trial Tune ran has its MLflow run, and every trial run (besides those closed
  as ``LOST`` and the reference models the driver trains) is a trial Tune knows;
* the searcher was told every trial MLflow shows finished with a result, and of no
  trial that neither MLflow nor Tune ran (``searcher.json`` on the parent run, written
  at the search's end).

Example::

    report = audit_search("my-search", "sqlite:///mlflow.db")
    assert report.ok, report.problems

:func:`report_structure` reduces a ``recscale analyze`` summary to its shape (the keys a
reader finds and the files written), to compare a faulted search's report with a
fault-free one's.
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
    SEARCHER_ARTIFACT,
    STEP_AXIS,
    TAG_KIND,
    TAG_PARENT,
    TAG_STATUS,
    TAG_STORAGE,
    TAG_TRIAL_ID,
    default_tracking_uri,
)

__all__ = ["AuditReport", "audit_search", "report_structure"]

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


def eval_interval(report_every_flops: float, flops_per_example: float,
                  batch_size: int) -> float:
    """The training FLOPs between two of a trial's evaluations, as the trial plans them
    (``trainers.loop.trial_train_config``: ``report_every_flops`` to the nearest whole
    batch, at least one). Reports at ASHA milestones fall in between, never beyond.

    Example:
        >>> eval_interval(2e4, 10.0, 100)  # 7 batches of 3 * 10 * 100 FLOPs
        21000.0
    """
    per_batch = 3.0 * flops_per_example * batch_size
    return per_batch * max(1, round(report_every_flops / per_batch))


def _series_problems(client: Any, run: Any, trial_id: str,
                     report_every_flops: float | None) -> list[str]:
    out = []
    gap = None
    fpe = run.data.metrics.get("flops_per_example")
    bs = run.data.params.get("train.batch_size")
    if report_every_flops and fpe and bs:
        gap = eval_interval(report_every_flops, float(fpe), int(bs)) * (1 + 1e-9)
    for key in SERIES:
        # in the order logged: by time, and by step among reports stamped alike (one
        # filled in after a restore carries the time of the report before it)
        points = sorted(client.get_metric_history(run.info.run_id, key),
                        key=lambda m: (m.timestamp, m.step))
        steps = [int(m.step) for m in points]
        if len(set(steps)) != len(steps):
            out.append(f"trial {trial_id}: {key} logged twice at "
                       f"{len(steps) - len(set(steps))} step(s)")
        back = sum(b < a for a, b in zip(steps, steps[1:]))
        if back:
            out.append(f"trial {trial_id}: {key} went backwards {back} time(s)")
        if gap is not None:
            wide = sum(b - a > gap for a, b in zip([0, *sorted(steps)], sorted(steps)))
            if wide:
                out.append(f"trial {trial_id}: {key} has {wide} gap(s) wider than its "
                           f"evaluation interval ({gap:.4g} FLOPs): a report is missing")
    return out


def _tune_problems(storage: str, children: list[Any]) -> tuple[list[str], int | None]:
    from ray.tune import ExperimentAnalysis

    try:
        tune_trials = ExperimentAnalysis(storage).trials
    except (ValueError, OSError, RuntimeError) as err:
        return [f"Tune's state in {storage} cannot be read: {err}"], None
    known = {t.trial_id for t in tune_trials}
    # a trial stopped before its first report holds only {"trial_id": ...}: it never ran
    ran = {t.trial_id for t in tune_trials if OBJECTIVE in (t.last_result or {})}
    logged = {str(r.data.tags.get(TAG_TRIAL_ID)) for r in children
              if r.data.tags.get(TAG_STATUS) != "LOST"
              and not is_reference_id(r.data.tags.get(TAG_TRIAL_ID))}
    out = []
    if ran - logged:
        out.append(f"trials Tune ran without an MLflow run: {sorted(ran - logged)}")
    if logged - known:
        out.append(f"trial runs Tune does not know, not closed as lost: {sorted(logged - known)}")
    return out, len(ran)


def _searcher_problems(client: Any, parent: Any, children: list[Any],
                       report: AuditReport) -> list[str]:
    """The searcher's record of finished trials against MLflow's (see the module doc)."""
    import json

    from analysis.runs import _artifact_text

    text = _artifact_text(client, parent.info.run_id, SEARCHER_ARTIFACT)
    if text is None:
        return [f"the parent run has no {SEARCHER_ARTIFACT} (the searcher's record)"]
    told = set(json.loads(text)["completed"])
    runs = {str(r.data.tags.get(TAG_TRIAL_ID)): r for r in children
            if r.data.tags.get(TAG_STATUS) != "LOST"
            and not is_reference_id(r.data.tags.get(TAG_TRIAL_ID))}
    ended = {t for t, r in runs.items() if r.info.status != "RUNNING" and OBJECTIVE in r.data.metrics}
    report.numbers.update({"searcher_completed": len(told), "mlflow_completed": len(ended)})
    out = []
    if ended - told:
        out.append(f"trials finished in MLflow that the searcher was never told: {sorted(ended - told)}")
    # told without a run: only a trial stopped before its first report (no run, no result)
    unrun = told - set(runs)
    if unrun:
        report.numbers["searcher_told_without_run"] = len(unrun)
    return out


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
    try:
        cfg: Any = SearchConfig.model_validate(load_search(name, uri).settings)
    except (AnalysisError, ValueError):
        cfg = None
        problems.append("the search's settings (search.json) cannot be read back")
    interval = None if cfg is None else cfg.report_every_flops
    trained = 0.0
    lost_runs = 0
    for r in children:
        trial_id = str(r.data.tags.get(TAG_TRIAL_ID))
        # the reference models evaluate once per epoch, not at the search's interval
        problems += _series_problems(client, r, trial_id,
                                     None if is_reference_id(trial_id) else interval)
        steps = [int(m.step) for m in client.get_metric_history(r.info.run_id, OBJECTIVE)]
        trained += max(steps, default=0)
        lost_runs += r.data.tags.get(TAG_STATUS) == "LOST"
    m = parent.data.metrics
    spent = float(m.get(f"{SEARCH_PREFIX}spent_flops", float("nan")))
    report.numbers.update({"trial_runs": len(children), "lost_runs": lost_runs,
                           "trained_flops": trained, "spent_flops": spent,
                           "lost_flops": float(m.get(f"{SEARCH_PREFIX}{LOST_FLOPS}", 0.0))})
    if cfg is not None:
        # one report interval per concurrent trial, as the trials plan it: in whole
        # batches, so up to half a batch longer than report_every_flops
        widest = max((eval_interval(cfg.report_every_flops,
                                    float(r.data.metrics["flops_per_example"]),
                                    int(r.data.params["train.batch_size"]))
                      for r in children if "flops_per_example" in r.data.metrics
                      and "train.batch_size" in r.data.params
                      and not is_reference_id(r.data.tags.get(TAG_TRIAL_ID))),
                     default=cfg.report_every_flops)
        bound = cfg.budget_flops + cfg.max_concurrent * max(widest, cfg.report_every_flops)
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
    problems += _searcher_problems(client, parent, children, report)
    return report


def report_structure(summary: dict[str, Any]) -> dict[str, Any]:
    """The shape of a ``recscale analyze`` summary: its top-level keys, the keys one level
    down in its sections of sections (``"fits.joint"``), and the files the report wrote. Two searches of the same
    settings, one faulted and one not, must give the same structure (the numbers differ).

    Example:
        >>> report_structure({"n_trials": 3, "fits": {"joint": {}}, "files": ["a.png"],
        ...                   "trial_status": {"STOPPED": 2}})
        {'keys': ['files', 'fits', 'fits.joint', 'n_trials', 'trial_status'], 'files': ['a.png']}
    """
    keys = set()
    for key, value in summary.items():
        keys.add(key)
        # a section of sections (fits, recommendation) has a fixed shape; a count per
        # status or family ({"STOPPED": 9, "LOST": 2}) is data, not structure
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            keys.update(f"{key}.{sub}" for sub in value)
    return {"keys": sorted(keys), "files": sorted(summary.get("files", []))}
