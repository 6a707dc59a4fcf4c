"""Driver-side memory monitor: the driver must not grow with the number of finished trials."""

from __future__ import annotations

from typing import Any

import psutil
from ray import tune

from trainers.contracts import SEARCH_PREFIX

__all__ = ["DriverMemory"]


class DriverMemory(tune.Callback):
    """Samples the driver's resident memory each time a trial finishes.

    ``samples`` is a list of ``(finished_trials, rss_mb)``, kept in the callback's state
    (so a resumed search continues the series) and logged to the parent MLflow run as
    the metric ``driver_rss_mb`` with ``step = finished_trials`` when the experiment ends.
    """

    METRIC = f"{SEARCH_PREFIX}driver_rss_mb"

    def __init__(self, tracking_uri: str | None = None, parent_run_id: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.samples: list[tuple[int, float]] = []

    def _sample(self, trials: list[Any]) -> None:
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        rss = psutil.Process().memory_info().rss / 2**20
        self.samples.append((max(finished, len(self.samples) + 1), rss))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._sample(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._sample(trials)

    def get_state(self) -> dict[str, Any] | None:
        return {"samples": list(self.samples)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.samples = [(int(n), float(v)) for n, v in state.get("samples", [])]

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """Log the samples MLflow does not have yet (a resumed search logs only its own)."""
        if not (self.tracking_uri and self.parent_run_id and self.samples):
            return
        from mlflow.tracking import MlflowClient

        from trainers.tracking import log_metric_series

        client = MlflowClient(self.tracking_uri)
        logged = {int(m.step) for m in client.get_metric_history(self.parent_run_id, self.METRIC)}
        new = [(n, v) for n, v in self.samples if n not in logged]
        if new:
            log_metric_series(client, self.parent_run_id, self.METRIC, new)
