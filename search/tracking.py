"""Tune callbacks that write a search's MLflow runs through :mod:`trainers.tracking`.

The driver only writes the parent run and each trial's final status, from a background
thread; trials write their own child runs (``trainers.tracking.TrialTracker``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from trainers.tracking import set_trial_status

__all__ = ["TrialStatusCallback"]


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
