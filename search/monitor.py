"""Driver-side memory monitor: the driver must not grow with the number of finished trials."""

from __future__ import annotations

from typing import Any

import psutil
from ray import tune

__all__ = ["DriverMemory"]


class DriverMemory(tune.Callback):
    """Samples the driver's resident memory each time a trial finishes.

    ``samples`` is a list of ``(finished_trials, rss_mb)``; the search logs it to the
    parent MLflow run as the metric ``driver_rss_mb`` with ``step = finished_trials``.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[int, float]] = []
        self._finished = 0

    def _sample(self) -> None:
        self._finished += 1
        rss = psutil.Process().memory_info().rss / 2**20
        self.samples.append((self._finished, rss))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._sample()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._sample()
