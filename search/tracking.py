"""Tune callbacks that write a search's MLflow runs through :mod:`trainers.tracking`,
and the driver's last pass over the trial runs once Tune has ended.

The driver only writes the parent run and each trial's final status, from a background
thread; trials write their own child runs (``trainers.tracking.TrialTracker``). A
trial's writes are asynchronous, and Tune ends a search by killing the trials' actors
(``ray.kill``, without waiting for their threads): :func:`settle_trial_runs` waits for
this node's trial processes to be gone, then writes into each trial run the reports Tune
received (the trial's ``result.json``) that the run lacks, so that MLflow and Tune hold
the same result for every trial.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from trainers.contracts import (
    CONSTANT_METRICS,
    METRICS,
    OBJECTIVE,
    STEP_AXIS,
    TAG_TRIAL_ID,
    VAL_SE,
    WORK_ATTR,
)
from trainers.tracking import (
    logged_steps,
    metric_batch,
    set_trial_status,
    stamp_in_place,
    trial_runs,
)

__all__ = ["TrialStatusCallback", "settle_trial_runs", "tune_reports"]

log = logging.getLogger(__name__)

#: the longest the driver waits for this node's killed trial processes to be gone
SETTLE_TIMEOUT_S = 10.0


class TrialStatusCallback(tune.Callback):
    """Writes each finished trial's final status tag and run status, off the hot path.

    ``COMPLETED`` (the trial ran its planned length: its ``trial_flops``, or
    ``train.max_epochs`` passes if fewer), ``DIVERGED`` (NaN/inf loss),
    ``STOPPED`` (ASHA, the budget or its own early stopping, ``trial_patience``, ended it
    early) or ``ERROR``.
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
        self._done.add(trial.trial_id)  # the ids only: on_experiment_end skips them
        # writes that went through are forgotten (the driver must not grow with finished
        # trials); one that failed is kept, so on_experiment_end still raises its error
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-status")
        self._futures.append(self._pool.submit(self._write, trial.trial_id, status))

    def _write(self, trial_id: str, status: str) -> None:
        set_trial_status(MlflowClient(self.tracking_uri), self.experiment_id,
                         self.parent_run_id, trial_id, status)

    @staticmethod
    def final_status(trial: Any) -> str:
        """The status a finished trial's run gets, from its last report."""
        result = trial.last_result or {}
        reported = str(result.get("trial_status", "")).upper()
        if reported in ("COMPLETED", "DIVERGED"):
            return reported
        return "STOPPED"  # ended early by ASHA, the global budget or its patience

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._submit(trial, self.final_status(trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._submit(trial, "ERROR")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Tune calls this on every exit: the end, but also Ctrl-C and a crash (ray 2.60
        # ``tune.run``: ``runner.cleanup()``). Only trials Tune has finished get a final
        # status here; one still RUNNING or PENDING was interrupted and resumes with the
        # search, so its run must stay open (a STOPPED run would end it on resume). The
        # trials the budget stopped with the experiment are closed by the driver once
        # the search has really ended (``search.runner.close_stopped_runs``).
        for trial in trials:
            if trial.trial_id not in self._done and trial.last_result and \
                    trial.status in ("TERMINATED", "ERROR"):
                self._submit(trial, "ERROR" if trial.status == "ERROR" else self.final_status(trial))
        for fut in self._futures:
            fut.result()
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def tune_reports(trial: Any) -> list[dict[str, Any]]:
    """Every report Tune received from ``trial``, oldest first (its ``result.json`` in the
    search's storage); a line cut short by a kill is skipped; [] when there is none."""
    try:
        fs, path = trial.storage.storage_filesystem, str(trial.storage.trial_fs_path)
        with fs.open_input_stream(f"{path}/result.json") as stream:
            text = stream.read().decode("utf-8", errors="replace")
    except (AttributeError, OSError):
        return []
    out = []
    for line in text.splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict):
            out.append(report)
    return out


def _wait_for_processes(pids: set[int], timeout: float) -> int:
    """Wait (at most ``timeout`` s) for the Ray worker processes among ``pids`` to exit;
    returns how many were still alive when the wait ended."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.name().startswith("ray::"):  # not a pid reused since
                procs.append(proc)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return len(alive)


def settle_trial_runs(client: MlflowClient, exp_id: str, parent_run_id: str,
                      trials: list[Any]) -> list[Any]:
    """After Tune has ended: wait for this node's trial processes (the ``pid`` of each
    trial's last report from this node, by its ``node_id``) to exit, so no write of theirs lands
    after this, then log into each trial run every report Tune received that the run
    lacks (a worker killed while its write was queued or retrying), stamped in place
    (:func:`trainers.tracking.stamp_in_place`). Returns the trial runs
    (:func:`trainers.tracking.trial_runs`) as they then are.

    Only the report's metrics (those the run has, the contract's report metrics) are
    written, so a filled report looks like the trial's own. Trials on other nodes are not waited for: a write of theirs may still
    land after this (and then carries a later report than Tune's, which
    ``search.runner`` takes as the trial's result).
    """
    import ray

    reports = {t.trial_id: tune_reports(t) for t in trials}
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    pids = {int(r[-1]["pid"]) for r in reports.values()
            if r and "pid" in r[-1] and r[-1].get("node_id") == here}
    if pids:
        started = time.perf_counter()
        alive = _wait_for_processes(pids, SETTLE_TIMEOUT_S)
        log.debug("waited %.1f s for %d trial process(es); %d still alive",
                  time.perf_counter() - started, len(pids), alive)
    runs = trial_runs(client, exp_id, parent_run_id)  # read once nothing else writes
    filled = 0
    for run in runs:
        received = reports.get(str(run.data.tags.get(TAG_TRIAL_ID)), [])
        by_step = {int(r[STEP_AXIS]): r for r in received
                   if STEP_AXIS in r and OBJECTIVE in r}  # a repeated step: the later report
        if not by_step:
            continue
        held = logged_steps(client, run.info.run_id)
        missing = sorted(set(by_step) - set(held))
        if not missing:
            continue
        # the report's metrics as the trial logs them (TrialTracker.log)
        keys = (set(run.data.metrics) | {*METRICS, VAL_SE, WORK_ATTR}) - set(CONSTANT_METRICS)
        for step in missing:
            report = {k: v for k, v in by_step[step].items() if k in keys}
            batch = metric_batch(report, step, stamp_in_place(held, step))
            if not batch:
                continue
            client.log_batch(run.info.run_id, metrics=batch)
            held[step] = batch[0].timestamp
            filled += 1
    if filled:
        log.info("%d report(s) Tune received were missing from their MLflow runs; written now",
                 filled)
        runs = trial_runs(client, exp_id, parent_run_id)
    return runs
