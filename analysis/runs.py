"""Read a search back from MLflow into pandas (the layout of ARCHITECTURE.md).

A search is one MLflow experiment with one parent run (tag ``recscale.kind=search``) and
one nested child run per trial (tags ``recscale.kind=trial``, ``mlflow.parentRunId``,
``block``, ``trial_id``, ``trial_status``; params = the flattened config with dotted keys;
the typed config as the ``config.json`` artifact; metrics per report with
``step = train_flops``, the per-trial constants once at step 0).

:class:`SearchRuns` holds

* ``trials``: one row per trial: ``run_id``, ``trial_id``, ``block``, ``status`` (the
  ``trial_status`` tag), ``config`` (the trial's typed config, flat: ``{"model.block":
  "wukong", "model.d_model": 32, "train.lr": 0.001, ...}``, read from the run's
  ``config.json``; no pandas column turns its ints into floats), the same values as
  columns (``model.block``, ``model.d_model``, ``train.lr``, ... for filtering), the
  per-trial constants, and the trial's *result*: every report metric from its last
  report (``trainers.contracts.RESULT_REPORT``), ``result_step`` naming that report;
* ``history``: one row per report: ``run_id``, ``trial_id``, ``block``, ``step`` and
  the metric series (``train_flops``, ``examples_seen``, ``val_logloss``, ``val_auc``,
  ...) with the trial's constants (``flops_per_example``, ``params_dense``, ...),
  sorted by run then step.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pandas as pd

from search.references import is_reference_id, reference_result
from trainers.contracts import (
    CONFIG_ARTIFACT,
    CONSTANT_METRICS,
    DATA_ARTIFACT,
    KIND_SEARCH,
    KIND_TRIAL,
    METRICS,
    SEARCH_ARTIFACT,
    TAG_BLOCK,
    TAG_CONFIG,
    TAG_KIND,
    TAG_PARENT,
    TAG_STATUS,
    TAG_TRIAL_ID,
    VAL_LOSSES_DIR,
    VAL_SE,
    UserError,
    default_tracking_uri,
    missing_store,
)
from trainers.experiment import flatten

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = ["CONFIG_COLUMN", "HISTORY_METRICS", "RESULT_STEP", "AnalysisError", "SearchRuns",
           "find_search", "load_search", "milestone_losses", "runs_from_frames"]

#: The metric series read back per report: every metric of the contract but the
#: per-trial constants (logged once).
HISTORY_METRICS = (*(m for m in METRICS if m not in CONSTANT_METRICS), VAL_SE)
#: The column of ``trials`` holding each trial's typed flat config.
CONFIG_COLUMN = "config"
#: The column of ``trials`` with the step (training FLOPs) of the report that is the
#: trial's result (its last report).
RESULT_STEP = "result_step"
CONFIG_SECTIONS = ("model.", "train.")  # what a trial's config holds (data is the search's)
ID_COLUMNS = ("run_id", "trial_id", "block")


class AnalysisError(UserError):
    """An analysis that cannot be made; the message is one line."""


@dataclass(frozen=True)
class SearchRuns:
    """A search's trials and per-report history (see the module docstring).

    ``settings``: the search's own config (the parent run's ``recscale.config`` tag:
    ``budget_flops``, ``max_flops_per_example``, ``trial_flops``, ``data``, ...).
    """

    name: str
    trials: pd.DataFrame
    history: pd.DataFrame
    parent_run_id: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None
    experiment_id: str | None = None
    #: the parent's ``data.json``: ``{"fingerprint", "splits": {split: {rows, positives,
    #: base_rate}}}`` (empty for a search made before it was logged)
    data: dict[str, Any] = field(default_factory=dict)


def _config_from_columns(row: pd.Series) -> dict[str, Any]:
    """A trial's flat config from its dotted columns, for frames built without the typed
    ``config`` column (a column shared by several families holds NaN where a trial's
    family has no such knob: that is no value of this trial's)."""
    return {k: v for k, v in row.items()
            if isinstance(k, str) and k.startswith(CONFIG_SECTIONS)
            and not (isinstance(v, float) and math.isnan(v))}


def runs_from_frames(trials: pd.DataFrame, history: pd.DataFrame, name: str = "search",
                     settings: dict[str, Any] | None = None, parent_run_id: str | None = None,
                     tracking_uri: str | None = None, experiment_id: str | None = None
                     ) -> SearchRuns:
    """A :class:`SearchRuns` from plain frames (tests, or runs read by other means).

    ``trials`` needs ``run_id`` and ``block``; ``history`` needs ``run_id`` (unless it is
    empty). What the contract implies is filled in: ``trial_id``/``block`` and the
    per-trial constants (``flops_per_example``, ``params_dense``, ``params_embedding``)
    of a report from its trial (and the trial's from its reports), a missing
    ``train_flops = 3·flops_per_example·examples_seen``, ``step = train_flops``, the
    ``config`` column from the dotted config columns where it is absent, and the
    trial's result: every report metric of a trial with reports is taken from its last
    report (``result_step`` is that report's step). Every column of
    :data:`HISTORY_METRICS` exists in ``history`` (NaN where never reported).
    """
    if trials.empty:
        raise AnalysisError(f"search {name!r} has no trials")
    missing = [c for c in ("run_id", "block") if c not in trials]
    if missing:
        raise AnalysisError(f"trials frame lacks column(s) {missing}")
    trials = trials.reset_index(drop=True).copy()
    history = history.reset_index(drop=True).copy()
    if "run_id" not in history:
        if not history.empty:
            raise AnalysisError("history frame lacks column 'run_id'")
        history["run_id"] = pd.Series(dtype=object)
    for col in ("trial_id", "block", "status"):
        if col not in trials:
            trials[col] = trials["run_id"] if col == "trial_id" else None
    if CONFIG_COLUMN not in trials:
        trials[CONFIG_COLUMN] = [_config_from_columns(row) for _, row in trials.iterrows()]
    for col in ("step", *METRICS, VAL_SE):
        history[col] = (pd.to_numeric(history[col], errors="coerce") if col in history
                        else pd.Series(math.nan, index=history.index, dtype=float))
    last = history.groupby("run_id").last()
    for col in CONSTANT_METRICS:
        from_history = trials["run_id"].map(last[col])
        trials[col] = (trials[col].fillna(from_history) if col in trials else from_history)
    per_run = trials.set_index("run_id")
    for col in ("trial_id", "block", *CONSTANT_METRICS):
        from_trial = history["run_id"].map(per_run[col])
        history[col] = history[col].fillna(from_trial) if col in history else from_trial
    derived = 3.0 * history["flops_per_example"] * history["examples_seen"]
    history["train_flops"] = history["train_flops"].fillna(derived)
    history["step"] = history["step"].fillna(history["train_flops"])
    history = history.sort_values(["run_id", "step"], kind="mergesort").reset_index(drop=True)
    # the result: the last report, every metric of it (never mixed across reports)
    final = history.groupby("run_id").tail(1).set_index("run_id")
    has = trials["run_id"].isin(final.index)
    for col in HISTORY_METRICS:
        from_report = trials["run_id"].map(final[col])
        trials[col] = from_report.where(has, trials.get(col, math.nan))
    trials[RESULT_STEP] = trials["run_id"].map(final["step"])
    return SearchRuns(name, trials, history, parent_run_id, dict(settings or {}), tracking_uri,
                      experiment_id)


def _check_store(uri: str) -> None:
    """Refuse a SQLite URI whose file does not exist (MLflow would create an empty one)."""
    if (path := missing_store(uri)) is not None:
        raise AnalysisError(f"no MLflow store at {path} (tracking URI {uri})")


def _search_all(client: MlflowClient, exp_id: str, filt: str) -> list[Run]:
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([exp_id], filter_string=filt, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _history(client: MlflowClient, run: Run) -> dict[int, dict[str, float]]:
    """``step → {metric: value}`` of one run; a step logged twice keeps its latest value."""
    series: dict[int, dict[str, float]] = {}
    for key in HISTORY_METRICS:
        if key not in run.data.metrics:
            continue
        points = sorted(client.get_metric_history(run.info.run_id, key),
                        key=lambda m: (m.step, m.timestamp))
        for m in points:
            series.setdefault(int(m.step), {})[key] = float(m.value)
    return series


def run_config(run: Run, client: MlflowClient | None = None) -> dict[str, Any]:
    """The typed config a trial run was logged with, flat (``model.*``, ``train.*``).

    It is read from the run's ``config.json`` artifact (``ExperimentConfig.to_dict()``,
    written when the trial starts; runs of an older recscale hold it in the
    ``recscale.config`` tag): JSON keeps ``32`` an int and ``0.001`` a float, so nothing
    is parsed back from MLflow's string params.

    Raises:
        AnalysisError: the run has no such JSON, or it does not hold a config.
    """
    raw = run.data.tags.get(TAG_CONFIG)
    where = f"tag {TAG_CONFIG}"
    if not raw and client is not None:
        raw = _artifact_text(client, run.info.run_id, CONFIG_ARTIFACT)
        where = f"artifact {CONFIG_ARTIFACT}"
    try:
        tree = json.loads(raw) if raw else None
    except json.JSONDecodeError as err:
        raise AnalysisError(f"trial run {run.info.run_id}: {where} is not JSON "
                            f"({err.msg})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise AnalysisError(f"trial run {run.info.run_id} has no typed config ({where} "
                            "with a model section)")
    return {k: v for k, v in flatten(tree).items() if k.startswith(CONFIG_SECTIONS)}


def _artifact_text(client: MlflowClient, run_id: str, path: str) -> str | None:
    """The text of a run's JSON artifact ``path``, or None when it has none."""
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
        except (MlflowException, OSError):
            return None
        with open(local) as fh:
            return fh.read()


def _trial_row(run: Run, client: MlflowClient) -> dict[str, Any]:
    tags = run.data.tags
    config = run_config(run, client)
    row: dict[str, Any] = {"run_id": run.info.run_id, "trial_id": tags.get(TAG_TRIAL_ID),
                           "block": tags.get(TAG_BLOCK, config.get("model.block")),
                           "status": tags.get(TAG_STATUS), "run_status": run.info.status,
                           CONFIG_COLUMN: config, **config}
    # a reference model's result is its best evaluation (search.references), as the
    # search's own end table and lift have it
    row.update(reference_result(run.data.metrics) if is_reference_id(row["trial_id"])
               else run.data.metrics)
    return row


def _trial_row_or_none(run: Run, client: MlflowClient) -> dict[str, Any] | None:
    """A trial's row, or None (with a warning) for a run that holds no typed config: one
    a driver killed between creating the run and writing its ``config.json`` (such a run
    has no report either, so nothing is lost by leaving it out)."""
    try:
        return _trial_row(run, client)
    except AnalysisError as err:
        log.warning("left out: %s", err)
        return None


def load_search(name: str, tracking_uri: str | None = None) -> SearchRuns:
    """Every trial run of the search ``name`` (an MLflow experiment) as frames.

    Args:
        name: the search name (= the experiment name).
        tracking_uri: the MLflow store; default ``MLFLOW_TRACKING_URI``, else
            ``sqlite:///<cwd>/mlflow.db``.

    Raises:
        AnalysisError: no such store or experiment, no parent run, or no trial runs.

    Example::

        runs = load_search("ml-unified", "sqlite:///mlflow.db")
        runs.trials.sort_values("val_logloss").head()
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tracking_uri)
    _check_store(uri)
    client = MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(name)
    except MlflowException as err:
        raise AnalysisError(f"cannot read MLflow store {uri}: {str(err).splitlines()[0]}") from err
    if exp is None:
        raise AnalysisError(f"no search named {name!r} in {uri}")
    if exp.lifecycle_stage == "deleted":
        raise AnalysisError(f"search {name!r} in {uri} was deleted")
    exp_id = str(exp.experiment_id)
    parents = _search_all(client, exp_id, f"tags.`{TAG_KIND}` = '{KIND_SEARCH}'")
    if not parents:
        raise AnalysisError(f"experiment {name!r} in {uri} has no recscale search run")
    parent = parents[0]  # the first one created, as search.tracking resumes into it
    children = _search_all(client, exp_id, f"tags.`{TAG_PARENT}` = '{parent.info.run_id}' "
                                           f"and tags.`{TAG_KIND}` = '{KIND_TRIAL}'")
    if not children:
        raise AnalysisError(f"search {name!r} in {uri} has no trial runs yet")
    with ThreadPoolExecutor(max_workers=min(8, len(children))) as pool:
        maybe = list(pool.map(lambda r: _trial_row_or_none(r, client), children))
        kept = [(run, row) for run, row in zip(children, maybe) if row is not None]
        if not kept:  # nothing readable: say why, for the first run
            _trial_row(children[0], client)
        children, rows = [run for run, _ in kept], [row for _, row in kept]
        series = list(pool.map(lambda r: _history(client, r), children))
    hist = [{"run_id": row["run_id"], "trial_id": row["trial_id"], "block": row["block"],
             "step": step, **values}
            for row, s in zip(rows, series) for step, values in sorted(s.items())]
    trials = pd.DataFrame(rows)
    history = pd.DataFrame(hist)
    raw = (parent.data.tags.get(TAG_CONFIG)  # a search made before search.json
           or _artifact_text(client, parent.info.run_id, SEARCH_ARTIFACT) or "{}")
    try:
        settings = json.loads(raw)
    except json.JSONDecodeError:
        settings = {}
    if not isinstance(settings, dict):
        settings = {}
    runs = runs_from_frames(trials, history, name, settings, parent.info.run_id, uri, exp_id)
    try:
        data = json.loads(_artifact_text(client, parent.info.run_id, DATA_ARTIFACT) or "{}")
    except json.JSONDecodeError:
        data = {}
    return replace(runs, data=data if isinstance(data, dict) else {})


def milestone_losses(runs: SearchRuns, run_id: str) -> dict[int, Any]:
    """``train_flops → per-example validation losses`` (float32 NumPy arrays) of a trial's
    reports at ASHA milestones (``val_losses/*.npy``; read with ``allow_pickle=False``);
    empty when the run has none (a search made before they were logged, or no store)."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if runs.tracking_uri is None:
        return {}
    client = MlflowClient(runs.tracking_uri)
    out: dict[int, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id, VAL_LOSSES_DIR, tmp))
        except (MlflowException, OSError):
            return {}
        for path in sorted(local.glob("*.npy")):
            if path.stem.isdigit():
                out[int(path.stem)] = np.load(path, allow_pickle=False).astype(np.float32)
    return out


def find_search(name: str | None, tracking_uri: str | None = None) -> tuple[str, str] | None:
    """``(experiment id, name)`` of the search ``name``, or, without a name, of the
    search whose parent run started last; None when the store has no such search."""
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tracking_uri)
    if missing_store(uri) is not None:
        return None
    client = MlflowClient(uri)
    if name is not None:
        exp = client.get_experiment_by_name(name)
        return None if exp is None else (str(exp.experiment_id), str(exp.name))
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string=f"tags.`{TAG_KIND}` = '{KIND_SEARCH}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    exp_id = str(runs[0].info.experiment_id)
    return exp_id, str(client.get_experiment(exp_id).name)
