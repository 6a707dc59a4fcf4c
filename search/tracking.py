"""MLflow layout of a search (ARCHITECTURE.md): one experiment per search name, one parent
run per search, one nested child run per trial.

Runs are found again by tags, never remembered in memory, so a resumed search (or a
restarted trial) keeps writing into the same runs and creates no duplicates:

* parent: tags ``recscale.kind=search``, ``recscale.search=<name>``;
* child: tags ``recscale.kind=trial``, ``mlflow.parentRunId``, ``trial_id``, ``block``,
  ``status``; params = the flattened config; metrics per report with
  ``step = examples_seen``.

Trials log their own metrics from their worker processes, batched (one ``log_batch``
per report) and asynchronously, so a slow remote tracking server never stalls the
driver. The driver only writes the parent run and each trial's final status, from a
background thread.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune

__all__ = [
    "TrialStatusCallback",
    "TrialTracker",
    "child_runs",
    "default_tracking_uri",
    "find_or_create_parent",
    "find_trial_run",
]

KIND = "recscale.kind"
SEARCH = "recscale.search"
PARENT = "mlflow.parentRunId"
CONFIG = "recscale.config"  # the trial's (parent's: the search's) full config as JSON


def default_tracking_uri(uri: str | None = None) -> str:
    """The flag, else ``MLFLOW_TRACKING_URI``, else SQLite in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def find_or_create_parent(client: MlflowClient, name: str, params: dict[str, Any],
                          tags: dict[str, str]) -> tuple[str, str, bool]:
    """The search's parent run: ``(experiment_id, run_id, created)``."""
    exp_id = _experiment_id(client, name)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{KIND}` = 'search'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return exp_id, run_id, False
    run = client.create_run(exp_id, run_name=name, tags={KIND: "search", SEARCH: name, **tags})
    run_id = run.info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    return exp_id, run_id, True


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str,
                   trial_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT}` = '{parent_run_id}' and tags.trial_id = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of every trial run under one search's parent run."""
    out: dict[str, str] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        for run in page:
            if "trial_id" in run.data.tags:
                out[run.data.tags["trial_id"]] = run.info.run_id
        token = page.token
        if not token:
            return out


class TrialTracker:
    """A trial's own child run, written from the trial's worker process."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 trial_id: str, block: str, params: dict[str, Any], search: str,
                 config_json: str = "", node_id: str = "") -> None:
        self.client = MlflowClient(tracking_uri)
        run_id = find_trial_run(self.client, experiment_id, parent_run_id, trial_id)
        if run_id is None:
            run = self.client.create_run(
                experiment_id, run_name=f"{block}-{trial_id}",
                tags={KIND: "trial", PARENT: parent_run_id, "trial_id": trial_id,
                      "block": block, "status": "RUNNING", SEARCH: search,
                      CONFIG: config_json, "ray.node_id": node_id},
            )
            run_id = run.info.run_id
            items = [Param(k, str(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])
        else:  # a restored or retried trial, maybe on another node
            self.client.update_run(run_id, status="RUNNING")
            if node_id:
                self.client.set_tag(run_id, "ray.node_id", node_id)
        self.run_id = run_id
        self._pending: list[Any] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One batched, asynchronous write per report."""
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float)]
        self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def flush(self) -> None:
        for op in self._pending:
            op.wait()
        self._pending.clear()


class TrialStatusCallback(tune.Callback):
    """Writes each finished trial's final status tag and run status, off the hot path.

    ``COMPLETED`` (the trial spent its ``trial_flops``), ``DIVERGED`` (NaN/inf loss),
    ``STOPPED`` (ASHA or the budget ended it early) or ``ERROR``.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._done: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"], state["_futures"] = None, []
        return state

    def _submit(self, trial: Any, status: str) -> None:
        self._done.add(trial.trial_id)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-status")
        self._futures.append(self._pool.submit(self._write, trial.trial_id, status))

    def _write(self, trial_id: str, status: str) -> None:
        client = MlflowClient(self.tracking_uri)
        run_id = find_trial_run(client, self.experiment_id, self.parent_run_id, trial_id)
        if run_id is None:
            return
        client.set_tag(run_id, "status", status)
        client.set_terminated(run_id, "FAILED" if status == "ERROR" else "FINISHED")

    @staticmethod
    def _final_status(trial: Any) -> str:
        result = trial.last_result or {}
        reported = str(result.get("trial_status", "")).upper()
        if reported in ("COMPLETED", "DIVERGED"):
            return reported
        return "STOPPED"  # ended early by ASHA or by the global budget

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._submit(trial, self._final_status(trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._submit(trial, "ERROR")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial in trials:  # trials the budget stopper ended with the experiment
            if trial.trial_id not in self._done and trial.last_result:
                self._submit(trial, "ERROR" if trial.status == "ERROR" else self._final_status(trial))
        for fut in self._futures:
            fut.result()
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def end_parent(tracking_uri: str, run_id: str, status: str, metrics: dict[str, float]) -> None:
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, status)

