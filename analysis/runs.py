"""Read a search back from MLflow into pandas (the layout of ARCHITECTURE.md).

``trials``: one row per trial run (config columns with dotted keys, typed from the
run's ``recscale.config`` JSON tag; last value of every metric; ``best_val_logloss``).
``history``: one row per report (``step = examples_seen``) with the metric series.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = ["AnalysisError", "SearchRuns", "load_search", "runs_from_frames"]

HISTORY_METRICS = ("val_logloss", "val_auc", "train_flops", "examples_seen")


class AnalysisError(ValueError):
    """An analysis that cannot be made; the message is one line."""


@dataclass(frozen=True)
class SearchRuns:
    """A search's trials and per-report history."""

    name: str
    trials: pd.DataFrame
    history: pd.DataFrame
    parent_run_id: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def runs_from_frames(trials: pd.DataFrame, history: pd.DataFrame, name: str = "search",
                     settings: dict[str, Any] | None = None) -> SearchRuns:
    """A :class:`SearchRuns` from plain frames (tests, or runs read by other means)."""
    if trials.empty:
        raise AnalysisError(f"search {name!r} has no trials")
    trials = trials.copy()
    if "best_val_logloss" not in trials and not history.empty:
        best = history.groupby("run_id")["val_logloss"].min()
        trials["best_val_logloss"] = trials["run_id"].map(best)
    return SearchRuns(name, trials.reset_index(drop=True), history.reset_index(drop=True),
                      settings=settings or {})


def load_search(name: str, tracking_uri: str | None = None) -> SearchRuns:
    """All trial runs of the search ``name`` (an MLflow experiment) as frames."""
    from mlflow.tracking import MlflowClient

    from search.tracking import default_tracking_uri

    uri = default_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise AnalysisError(f"no search named {name!r} in {uri}")
    parents = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'search'",
                                 max_results=1)
    if not parents:
        raise AnalysisError(f"experiment {name!r} in {uri} has no recscale search run")
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`recscale.kind` = 'trial'",
        max_results=50_000)
    if not children:
        raise AnalysisError(f"search {name!r} has no trial runs yet")
    rows, hist = [], []
    for run in children:
        tags = run.data.tags
        config = json.loads(tags.get("recscale.config") or "{}")
        row: dict[str, Any] = {"run_id": run.info.run_id, "trial_id": tags.get("trial_id"),
                               "block": tags.get("block"), "status": tags.get("status")}
        row.update(_flatten(config))
        row.update(run.data.metrics)
        rows.append(row)
        series: dict[int, dict[str, float]] = {}
        for metric in HISTORY_METRICS:
            for m in client.get_metric_history(run.info.run_id, metric):
                series.setdefault(m.step, {})[metric] = m.value
        for step, values in sorted(series.items()):
            hist.append({"run_id": run.info.run_id, "trial_id": row["trial_id"],
                         "block": row["block"], "step": step,
                         "flops_per_example": row.get("flops_per_example"),
                         "params_dense": row.get("params_dense"), **values})
    settings = json.loads(parent.data.tags.get("recscale.config") or "{}")
    runs = runs_from_frames(pd.DataFrame(rows), pd.DataFrame(hist), name, settings)
    return SearchRuns(runs.name, runs.trials, runs.history, parent.info.run_id, settings, uri)
