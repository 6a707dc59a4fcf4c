"""Driver-side memory monitor: the driver must not grow with the number of finished trials."""

from __future__ import annotations

import copy
import ctypes
import sys
from typing import Any

import psutil
from ray import tune
from ray.tune.logger import TBXLoggerCallback

from trainers.contracts import SEARCH_PREFIX, TIME_ATTR

__all__ = ["DriverMemory", "NoTensorBoardEvents", "TrimFinishedTrials", "forget_encoder_log_keys",
           "malloc_info", "release_free_memory", "short_trial_dirname", "trim_finished_trial"]


# glibc's allocator, for the driver's native memory (see ``TrimFinishedTrials``).
class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33): byte counts over all arenas."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _glibc() -> Any:
    """The process's C library if it is glibc with ``malloc_trim`` and ``mallinfo2``,
    else ``None`` (macOS, musl, an older glibc: the callers then do nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def release_free_memory() -> bool:
    """Hand the pages glibc's ``malloc`` holds free back to the OS (``malloc_trim(0)``:
    every arena, not only the top of the main heap). Returns whether any were released;
    ``False`` where the C library is not glibc."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


def malloc_info() -> dict[str, float] | None:
    """What glibc's ``malloc`` holds, in MB, over all its arenas (``mallinfo2``):
    ``in_use`` (allocated and not freed, ``uordblks + hblkhd``), ``free`` (freed and kept
    in the arenas, ``fordblks``), ``arena`` (the arenas' size, ``arena``) and ``mmapped``
    (blocks mapped on their own, ``hblkhd``). ``None`` where the C library is not glibc.
    Not counted: Python's small-object arenas (pymalloc maps its own) and memory any
    library maps itself."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    mb = 2.0 ** 20
    return {"in_use": (info.uordblks + info.hblkhd) / mb, "free": info.fordblks / mb,
            "arena": info.arena / mb, "mmapped": info.hblkhd / mb}


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


# What Tune 2.60 keeps of every trial for the whole search, in the driver, and what a
# finished (TERMINATED) trial still needs of it:
#
# * ``trial.run_metadata.last_result``: its last report. Kept: it is the trial's result
#   (``search.runner.collect_outcome`` reads it back from the saved experiment state;
#   the budget stopper and the status callback read ``train_flops``/``trial_status``).
# * ``trial.run_metadata.checkpoint_manager``: with ``CheckpointConfig(num_to_keep=None)``
#   (the runner's, for exact resume) a ``_TrainingResult`` (checkpoint + the whole
#   report) per report. A finished trial is never restored, and
#   ``search.checkpoints.DropFinishedCheckpoints`` deletes every checkpoint directory
#   of it but the last: only ``latest_checkpoint_result`` is kept (``trial.checkpoint``,
#   the winner's weights for the paired lift in ``search.references``), and of the report
#   it carries (a copy of the whole result, pickled into the JSON) only the keys that
#   say which report it is (:data:`CHECKPOINT_KEYS`); the result itself is last_result.
# * ``trial.run_metadata.metric_analysis``/``metric_n_steps``: min/max/mean and two
#   ``deque`` windows per numeric metric, read only by
#   ``ExperimentAnalysis.get_best_trial(scope=...)``, which recscale never calls
#   (the outcome is the last report). Emptied.
# * the trial's two JSON caches (``Trial._state_json``, ``run_metadata._cached_json``,
#   indented JSON, also held by ``TuneController._trial_metadata`` and written into every
#   experiment state): invalidated after the trim, so Tune rebuilds them once, small
#   (the controller marks the trial for its next save right after this callback, when it
#   stops the trial's actor).
# * one entry per report and numeric metric in ``ray.util.debug._logged``, the set behind
#   ``log_once``: Tune's JSON encoder (``TuneFunctionEncoder.default``) falls back to
#   cloudpickle for the ``deque`` windows and the checkpoint manager and calls
#   ``log_once(f"tune_func_encode:{obj}")`` with the object's text, new at every report
#   (``deque([0.61, 0.6], maxlen=5)``), only to log a DEBUG line once. Those keys are
#   forgotten (:func:`forget_encoder_log_keys`); the other ``log_once`` keys stay.
#
# * ``trial.run_metadata.last_result`` itself: the trial's own report plus what Tune adds
#   to every result (:data:`TUNE_RESULT_EXTRAS`: another copy of the config, the
#   experiment tag, host, pid, dates, per-iteration timers). The extras are dropped; the
#   report's own keys stay (``search.runner`` reads ``_RESULT_COLUMNS`` and
#   ``training_iteration``/``done`` from it, ``bench/overhead.py`` the trial's timers).
# * ``trial._default_result_or_future``: the trainable's auto-filled result, fetched once
#   by ``Trial.last_result`` for a trial that has not reported yet (the budget stopper
#   reads every trial's last result at each step) and kept for ever. A trial with a
#   report of its own never reads it again. Dropped.
# * ``trial.evaluated_params`` and the unresolved config: two more dicts equal to
#   ``trial.config`` (recscale's configs are flat and hold no placeholders). Made the same
#   object, which the JSON still writes three times but the driver holds once.
# * ``trial.experiment_tag``: ``<n>_<every sampled value>`` (~0.5 KB), written into the
#   JSON and read back only for display: cut to ``<n>``. With the short trial folder names
#   the runner gives Tune (:func:`short_trial_dirname`) the pickled storage context in
#   the JSON is ~0.3 KB smaller too.
#
# Trials that errored keep everything: a resumed search retries them from their
# checkpoints (``resume_errored=True``).


#: what Tune adds to every result (``ray.tune.result`` auto-filled keys and the config),
#: dropped from a finished trial's ``last_result``
TUNE_RESULT_EXTRAS = ("config", "experiment_tag", "hostname", "node_ip", "pid", "date",
                      "timestamp", "time_this_iter_s", "time_since_restore",
                      "iterations_since_restore", "timesteps_since_restore", "should_checkpoint",
                      "checkpoint_dir_name", "timesteps_total", "episodes_total")


def short_trial_dirname(trial: Any) -> str:
    """The folder name of a trial's results: ``<trainable>_<trial id>``. Tune's default
    appends every sampled value and a date (~150 characters), which its state then
    carries twice per trial; the trial id is unique within a search."""
    return f"{trial.trainable_name}_{trial.trial_id}"


#: what a finished trial's last checkpoint keeps of the report it was saved with
CHECKPOINT_KEYS = (TIME_ATTR, "training_iteration")  # training_iteration: Tune's report count


def trim_finished_trial(trial: Any) -> None:
    """Drop what Tune keeps of a finished trial that neither the search nor a resume
    reads again (see the notes above); the trial's last result and last checkpoint stay.

    Private attributes, for want of a public API (ray 2.60.0;
    ``tests/test_driver_memory.py`` checks they exist):
    ``_CheckpointManager._checkpoint_results`` and ``_latest_checkpoint_result``.
    """
    meta = getattr(trial, "run_metadata", None)
    if meta is None:
        return
    meta.metric_analysis = {}
    meta.metric_n_steps = {}
    result = meta.last_result or {}
    if any(k != "trial_id" for k in result):  # a report of its own
        meta.last_result = {k: v for k, v in result.items() if k not in TUNE_RESULT_EXTRAS}
        trial._default_result_or_future = None
    config = getattr(trial, "config", None)
    if config is not None:
        if trial.evaluated_params == config:
            trial.evaluated_params = config
        if getattr(trial, "_Trial__unresolved_config", None) == config:
            trial._Trial__unresolved_config = config
    tag = getattr(trial, "experiment_tag", "") or ""
    trial.experiment_tag = tag.split("_", 1)[0]
    manager = getattr(meta, "checkpoint_manager", None)
    if manager is not None:
        latest = manager._latest_checkpoint_result
        if latest is not None:  # a copy: the report it came with may be last_result itself
            latest = copy.copy(latest)
            latest.metrics = {k: latest.metrics[k] for k in CHECKPOINT_KEYS
                              if k in latest.metrics}
            manager._latest_checkpoint_result = latest
        manager._checkpoint_results = [latest] if latest is not None else []
    meta.invalidate_cache()
    trial.invalidate_json_state()


_ENCODER_LOG_KEY = "tune_func_encode:"


def forget_encoder_log_keys() -> int:
    """Forget the ``log_once`` keys Tune's JSON encoder adds at each report (see the notes
    above); returns how many. Private: ``ray.util.debug._logged`` (ray 2.60.0)."""
    from ray.util import debug

    logged = getattr(debug, "_logged", None)
    if not isinstance(logged, set):
        return 0
    stale = [key for key in list(logged) if key.startswith(_ENCODER_LOG_KEY)]
    logged.difference_update(stale)
    return len(stale)


class TrimFinishedTrials(tune.Callback):
    """Trims each trial that finishes (:func:`trim_finished_trial`), so the driver's
    memory, and the experiment state Tune writes every few seconds, do not grow with the
    reports of finished trials. Stateless: nothing to save or restore."""

    #: also hand the pages ``malloc`` holds free back to the OS (:func:`release_free_memory`)
    release_memory = True

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        trim_finished_trial(trial)
        forget_encoder_log_keys()
        if self.release_memory:
            release_free_memory()


class NoTensorBoardEvents(TBXLoggerCallback):
    """Takes the place of the TensorBoard logger Tune 2.60 adds to every search unless
    one is given (``ray.tune.utils.callback._create_default_callbacks``), and writes
    nothing.

    recscale's record of a trial is its MLflow run; nothing reads Tune's TensorBoard
    event files. And each trial's ``tensorboardX.FileWriter`` (2.6.5) registers an
    ``atexit`` closure that holds the writer, its event queue and its thread until the
    driver exits: a few KB per finished trial that never return. (Tune's CSV and JSON
    loggers, which ``ExperimentAnalysis`` reads, are still added.)
    """

    def __init__(self) -> None:  # no SummaryWriter: nothing is written
        self._trial_writer = {}
        self._trial_result = {}

    def log_trial_start(self, trial: Any) -> None:
        return None

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        return None

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        return None
