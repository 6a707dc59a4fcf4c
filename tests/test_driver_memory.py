"""Driver memory: the trimming of finished trials (search.monitor) and the slope the
benchmark fits (bench/driver_memory.py). No Ray cluster: Tune's Trial objects are built
as stubs, as Tune itself builds them when it reads an experiment back."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import pytest
from ray.train import Checkpoint
from ray.train._internal.session import _TrainingResult
from ray.tune import CheckpointConfig, PlacementGroupFactory
from ray.tune.experiment import Trial

from search.monitor import (
    TUNE_RESULT_EXTRAS,
    TrimFinishedTrials,
    malloc_info,
    short_trial_dirname,
    trim_finished_trial,
)
from search.tracking import TrialStatusCallback
from tests.bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_bench("driver_memory")


def _report(i: int) -> dict[str, Any]:
    metrics = {f"metric_{k}": 0.5 + 0.01 * i + k for k in range(30)}
    return {**metrics, "val_logloss": 0.7 - 0.01 * i, "train_flops": 1e6 * (i + 1),
            "trial_status": "completed" if i == 4 else "running",
            "training_iteration": i + 1, "config": {"model.block": "wukong"}}


def _finished_trial(tmp_path: Path, reports: int = 5) -> Trial:
    """A stub trial as Tune holds one that reported ``reports`` times with a checkpoint
    at each report and then finished."""
    trial = Trial("fake_trainable", stub=True, trial_id="t0001",
                  config={"model.block": "wukong", "model.d_model": 16},
                  checkpoint_config=CheckpointConfig(num_to_keep=None))
    trial.placement_group_factory = PlacementGroupFactory([{"CPU": 1}])  # set when it ran
    manager = trial.run_metadata.checkpoint_manager
    for i in range(reports):
        result = _report(i)
        trial.update_last_result(result)
        folder = tmp_path / f"checkpoint_{i:06d}"
        folder.mkdir()
        manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(folder)),
                                                    dict(result)))
    trial.status = Trial.TERMINATED
    return trial


def _json_size(trial: Trial) -> int:
    state, meta = trial.get_json_state()
    return len(state) + len(meta)


def test_trim_keeps_the_result_and_the_last_checkpoint(tmp_path: Path) -> None:
    trial = _finished_trial(tmp_path)
    last = dict(trial.last_result)
    assert len(trial.run_metadata.checkpoint_manager._checkpoint_results) == 5
    assert trial.metric_analysis  # what Tune 2.60 keeps per metric
    before = _json_size(trial)  # fills Tune's JSON caches, as its state saves do

    TrimFinishedTrials().on_trial_complete(iteration=1, trials=[trial], trial=trial)

    # the report's own keys stay; what Tune adds to every result (another config) goes
    assert "config" in last and "config" not in trial.last_result
    assert trial.last_result == {k: v for k, v in last.items() if k not in TUNE_RESULT_EXTRAS}
    assert trial.checkpoint is not None and trial.checkpoint.path.endswith("checkpoint_000004")
    manager = trial.run_metadata.checkpoint_manager
    assert manager._checkpoint_results == [manager._latest_checkpoint_result]
    # the checkpoint says which report it is; the report itself is last_result
    assert manager._latest_checkpoint_result.metrics == {"train_flops": 5e6,
                                                         "training_iteration": 5}
    assert trial.metric_analysis == {} and trial.metric_n_steps == {}
    after = _json_size(trial)  # the caches were rebuilt, not served stale
    assert after < before / 2, (before, after)


def test_trim_drops_the_copies_tune_keeps_besides_the_result(tmp_path: Path) -> None:
    """The auto-filled default result, the config's equal copies and the long experiment
    tag: what a finished trial with reports of its own never reads again."""
    trial = _finished_trial(tmp_path)
    trial._default_result_or_future = {"trial_id": "t0001", "pid": 1, "hostname": "h"}
    trial.evaluated_params = dict(trial.config)
    trial.experiment_tag = "7_model.block=wukong,model.d_model=16"
    config = trial.config
    trim_finished_trial(trial)
    assert trial._default_result_or_future is None
    assert trial.evaluated_params is config and trial._Trial__unresolved_config is config
    assert trial.config == {"model.block": "wukong", "model.d_model": 16}
    assert trial.experiment_tag == "7"
    # a copy that differs (a scheduler that mutates configs) is left alone
    (tmp_path / "other").mkdir()
    other = _finished_trial(tmp_path / "other")
    other.evaluated_params = {"model.block": "wukong"}
    trim_finished_trial(other)
    assert other.evaluated_params == {"model.block": "wukong"}


def test_a_trial_that_never_reported_keeps_its_default_result(tmp_path: Path) -> None:
    """Without a report of its own, ``last_result`` is the default result: kept."""
    trial = Trial("fake_trainable", stub=True, trial_id="t0004", config={"a": 1})
    trial._default_result_or_future = {"trial_id": "t0004", "pid": 1}
    trial.status = Trial.TERMINATED
    trim_finished_trial(trial)
    assert trial.last_result == {"trial_id": "t0004", "pid": 1}


def test_trial_folders_are_named_by_trainable_and_id() -> None:
    trial = Trial("run_trial", stub=True, trial_id="ab12cd34",
                  config={"model.block": "wukong", "train.lr": 0.001})
    assert short_trial_dirname(trial) == "run_trial_ab12cd34"


def test_a_trimmed_trial_restores_from_its_saved_state(tmp_path: Path) -> None:
    """What Tune writes into the experiment state for a trimmed trial reads back with its
    config, status, result and checkpoint (what a resume and collect_outcome read)."""
    trial = _finished_trial(tmp_path)
    trim_finished_trial(trial)
    state, meta = trial.get_json_state()
    back = Trial.from_json_state(state, stub=True)
    back.restore_run_metadata(meta)
    assert back.trial_id == "t0001" and back.status == Trial.TERMINATED
    assert back.config == {"model.block": "wukong", "model.d_model": 16}
    assert back.last_result["val_logloss"] == pytest.approx(0.66)
    assert back.last_result["trial_status"] == "completed"
    assert back.checkpoint is not None and back.checkpoint.path.endswith("checkpoint_000004")


def test_an_errored_trial_keeps_its_history(tmp_path: Path) -> None:
    """A trial that errored is retried on resume from its checkpoints: not trimmed."""
    trial = _finished_trial(tmp_path)
    trial.status = Trial.ERROR
    TrimFinishedTrials().on_trial_error(iteration=1, trials=[trial], trial=trial)
    assert len(trial.run_metadata.checkpoint_manager._checkpoint_results) == 5
    assert trial.metric_analysis


def test_a_trial_without_checkpoints_or_metadata_is_left_alone(tmp_path: Path) -> None:
    trial = Trial("fake_trainable", stub=True, trial_id="t0002")
    trim_finished_trial(trial)
    assert trial.checkpoint is None
    assert trial.run_metadata.checkpoint_manager._checkpoint_results == []
    trim_finished_trial(SimpleNamespace(trial_id="t0003"))  # no run_metadata: no error


def test_status_callback_does_not_keep_finished_writes() -> None:
    written: list[tuple[str, str]] = []

    class Recording(TrialStatusCallback):
        def _write(self, trial_id: str, status: str) -> None:
            written.append((trial_id, status))

    cb = Recording("sqlite:///unused.db", "1", "parent")
    for i in range(50):
        trial = SimpleNamespace(trial_id=f"t{i}", last_result={"trial_status": "completed"},
                                status="TERMINATED")
        cb.on_trial_complete(iteration=i, trials=[], trial=trial)
        cb._futures[-1].result()  # this write went through: the next submit forgets it
    assert len(cb._futures) == 1
    cb.on_experiment_end(trials=[])
    assert len(written) == 50 and all(s == "COMPLETED" for _, s in written)


def test_status_callback_still_raises_a_failed_write() -> None:
    class Failing(TrialStatusCallback):
        def _write(self, trial_id: str, status: str) -> None:
            raise RuntimeError("store down")

    cb = Failing("sqlite:///unused.db", "1", "parent")
    for i in range(5):
        cb.on_trial_complete(iteration=i, trials=[], trial=SimpleNamespace(
            trial_id=f"t{i}", last_result={}, status="TERMINATED"))
    with pytest.raises(RuntimeError, match="store down"):
        cb.on_experiment_end(trials=[])


def test_slope_fit_recovers_a_known_slope_after_warm_up() -> None:
    bench = _bench()
    rng = np.random.default_rng(0)
    x = np.arange(1, 241)
    # a warm-up jump over the first trials, then 0.02 MB per trial plus noise
    y = 500 + 30 * (1 - np.exp(-x / 15)) + 0.02 * x + rng.normal(0, 0.3, len(x))
    fit = bench.fit_slope(list(zip(x, y, strict=True)))
    assert fit["n"] == 120 and fit["x_from"] == 121 and fit["x_to"] == 240
    assert fit["lo"] < 0.02 < fit["hi"]
    assert abs(fit["slope"] - 0.02) < 3 * fit["se"]
    assert fit["hi"] - fit["lo"] < 0.02
    whole = bench.fit_slope(list(zip(x, y, strict=True)), skip_fraction=0.0)
    assert whole["slope"] > fit["slope"] + 0.02  # the warm-up biases a fit over everything


def test_slope_fit_of_a_flat_series_is_zero_within_its_interval() -> None:
    bench = _bench()
    samples = [(n, 600.0 + (0.5 if n % 2 else -0.5)) for n in range(1, 201)]
    fit = bench.fit_slope(samples)
    assert fit["lo"] <= 0.0 <= fit["hi"] and fit["hi"] < bench.TARGET_MB_PER_TRIAL


def test_slope_fit_needs_enough_samples() -> None:
    bench = _bench()
    with pytest.raises(ValueError, match="at least 3"):
        bench.fit_slope([(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)])
    with pytest.raises(ValueError, match="same number"):
        bench.fit_slope([(5, 1.0)] * 10)


def test_results_file_holds_both_runs_over_200_trials() -> None:
    """The recorded benchmark: before and after over >= 200 finished trials."""
    record = json.loads((ROOT / "bench" / "results" / "driver_memory.json").read_text())
    runs = record["runs"]
    assert {"trimmed", "untrimmed"} <= set(runs)
    for row in runs.values():
        assert row["finished_trials"] >= 200
        assert len(row["driver_rss_mb"]) >= 150
        fit = _bench().fit_slope([tuple(p) for p in row["driver_rss_mb"]])
        assert fit["slope"] == pytest.approx(row["slope_mb_per_trial"])


def _searcher() -> Any:
    from tests.searchers import small_searcher

    return small_searcher()


def test_searcher_forgets_a_finished_trials_handle_but_the_study_keeps_it() -> None:
    search = _searcher()
    for i in range(3):
        assert search.suggest(f"t{i}") is not None
    search.on_trial_result("t0", {"train_flops": 1e6, "loss": 0.5, "training_iteration": 1})
    search.on_trial_complete("t0", {"train_flops": 2e6, "loss": 0.4})
    search.on_trial_complete("t1", error=True)
    assert set(search._ot_trials) == {"t2"}  # the running trial keeps its handle
    assert "t0" in search._completed_trials  # OptunaSearch's record of told trials (private)
    done = {t.number: t for t in search._ot_study.trials}
    assert done[0].value == 0.4 and done[0].intermediate_values == {1: 0.5}
    assert done[1].state == optuna.trial.TrialState.FAIL
    # a late result or completion of a forgotten trial is ignored, not a KeyError
    search.on_trial_result("t0", {"train_flops": 3e6, "loss": 0.3, "training_iteration": 2})
    search.on_trial_complete("t0", {"train_flops": 3e6, "loss": 0.3})
    assert search._ot_study.trials[0].value == 0.4
    assert search.spent == 3e6  # t0: its latest report; t1, t2: nothing
    search.on_trial_complete("t2", {"train_flops": 1e6, "loss": 0.2})
    assert search._ot_trials == {}


def test_searcher_keeps_handles_when_told_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from search.searcher import BudgetedOptunaSearch

    monkeypatch.setattr(BudgetedOptunaSearch, "forget_finished", False)
    search = _searcher()
    assert search.suggest("t0") is not None
    search.on_trial_complete("t0", {"train_flops": 2e6, "loss": 0.4})
    assert set(search._ot_trials) == {"t0"}


def test_tune_adds_no_tensorboard_writer_when_given_the_stand_in(tmp_path: Path) -> None:
    """Tune 2.60 adds a TensorBoard logger unless one is given (private helper
    ``_create_default_callbacks``); the stand-in takes its place and writes nothing,
    while the CSV and JSON loggers ExperimentAnalysis reads are still added."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    from search.monitor import NoTensorBoardEvents

    callbacks = _create_default_callbacks([NoTensorBoardEvents()])
    tbx = [c for c in callbacks if isinstance(c, TBXLoggerCallback)]
    assert len(tbx) == 1 and type(tbx[0]) is NoTensorBoardEvents
    assert any(isinstance(c, CSVLoggerCallback) for c in callbacks)
    assert any(isinstance(c, JsonLoggerCallback) for c in callbacks)
    trial = _finished_trial(tmp_path)  # no storage: Tune's own logger could not start it
    for hook in (lambda: tbx[0].on_trial_start(iteration=1, trials=[trial], trial=trial),
                 lambda: tbx[0].on_trial_result(iteration=1, trials=[trial], trial=trial,
                                                result=_report(0)),
                 lambda: tbx[0].on_trial_complete(iteration=1, trials=[trial], trial=trial)):
        hook()
    assert tbx[0]._trial_writer == {} and not list(tmp_path.rglob("events.out.tfevents*"))


def test_encoder_log_keys_are_forgotten_and_others_kept(tmp_path: Path) -> None:
    """Each save of a running trial's state adds log_once keys (``ray.util.debug._logged``,
    private) for its deque windows; the trim forgets those, not the others."""
    from ray.util import debug
    from ray.util.debug import log_once

    from search.monitor import forget_encoder_log_keys

    log_once("recscale-test-key")
    forget_encoder_log_keys()
    trial = _finished_trial(tmp_path, reports=1)
    for i in range(1, 4):  # three more reports, each saved
        trial.update_last_result(_report(i))
        trial.get_json_state()
    added = [k for k in debug._logged if k.startswith("tune_func_encode:")]
    assert len(added) > 3 * 30  # two windows per numeric metric per report
    assert forget_encoder_log_keys() == len(added)
    assert not [k for k in debug._logged if k.startswith("tune_func_encode:")]
    assert "recscale-test-key" in debug._logged


def test_trim_hands_free_pages_back_to_the_os(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Each finished trial also releases what malloc holds free (unless switched off)."""
    import search.monitor as monitor

    calls: list[int] = []
    monkeypatch.setattr(monitor, "release_free_memory", lambda: calls.append(1) or True)
    trial = _finished_trial(tmp_path)
    TrimFinishedTrials().on_trial_complete(iteration=1, trials=[trial], trial=trial)
    assert calls == [1]
    monkeypatch.setattr(TrimFinishedTrials, "release_memory", False)
    TrimFinishedTrials().on_trial_complete(iteration=2, trials=[trial], trial=trial)
    assert calls == [1]


_HOLES = """
import psutil
from search.monitor import malloc_info, release_free_memory

def rss_mb():
    return float(psutil.Process().memory_info().rss) / 2**20

release_free_memory()
before = malloc_info()
assert before is not None and set(before) == {"in_use", "free", "arena", "mmapped"}
chunks = [bytearray(64 * 1024) for _ in range(1280)]  # 80 MB in malloc's heap, touched
held = malloc_info()
assert held is not None and held["in_use"] > before["in_use"] + 75, (before, held)
del chunks[::2]  # 40 MB of 64 KB holes, each between two live blocks
freed = malloc_info()
assert freed is not None and freed["free"] > before["free"] + 35, (before, freed)
resident = rss_mb()
assert release_free_memory()
assert rss_mb() < resident - 30
after = malloc_info()  # still malloc's, no longer resident
assert after is not None and after["free"] > before["free"] + 35, (before, after)
"""


@pytest.mark.skipif(malloc_info() is None, reason="needs glibc's malloc_trim and mallinfo2")
def test_release_free_memory_returns_freed_pages_in_the_middle_of_the_heap() -> None:
    """Memory freed between live blocks stays resident (glibc's free() trims only the
    top of a heap) until release_free_memory hands its whole pages back. In a fresh
    interpreter: a long test session's heap already holds free lists that would serve
    the new blocks and blur the counts."""
    import os
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    res = subprocess.run([sys.executable, "-c", _HOLES], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert res.returncode == 0, res.stderr[-2000:]


def _tpe_searcher(seed: int = 0) -> Any:
    """A TPE searcher (the product's sampler) over a small conditional space."""
    from search.budget import BudgetPolicy
    from search.searcher import BudgetedOptunaSearch, create_sampler

    def space(trial: optuna.Trial) -> dict[str, Any]:
        block = trial.suggest_categorical("model.block", ["wukong", "tokenmixer"])
        trial.suggest_int(f"model.{block}.layers", 1, 4)
        trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
        return {}

    return BudgetedOptunaSearch(space=space, feasibility=lambda flat: (True, -1.0, "ok"),
                                policy=BudgetPolicy(1e12, 1e6, (1e6, 1e7)),
                                metric="loss", mode="min", sampler=create_sampler("tpe", seed))


def _drive(search: Any, trials: int) -> list[dict[str, Any]]:
    configs = []
    for i in range(trials):
        config = search.suggest(f"t{i}")
        configs.append(config)
        loss = config["train.lr"] + (0.1 if config["model.block"] == "wukong" else 0.0)
        search.on_trial_result(f"t{i}", {"train_flops": 1e6, "loss": loss + 0.05,
                                         "training_iteration": 1})
        search.on_trial_complete(f"t{i}", {"train_flops": 2e6, "loss": loss})
    return configs


def test_compacted_study_samples_exactly_what_the_full_one_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The compaction of finished Optuna trials changes nothing TPE reads: the same seed
    suggests the same configs with and without it; finished trials then share their
    distribution objects and keep no relative-sample attributes."""
    from search.searcher import BudgetedOptunaSearch

    compacted = _tpe_searcher()
    configs = _drive(compacted, 24)
    monkeypatch.setattr(BudgetedOptunaSearch, "forget_finished", False)
    full = _tpe_searcher()
    assert _drive(full, 24) == configs

    def relative(study: optuna.Study) -> int:
        return sum(key.startswith("tpe:relative_params") for t in study.trials
                   for key in t.system_attrs)

    assert relative(full._ot_study) > 0  # TPE (multivariate) shared its relative samples
    assert relative(compacted._ot_study) == 0
    stored = compacted._ot_study._storage._studies[0].trials  # the storage's own objects
    lrs = {id(t.distributions["train.lr"]) for t in stored}
    assert len(lrs) == 1
    assert [t.params for t in stored] == [t.params for t in full._ot_study.trials]
    assert [t.values for t in stored] == [t.values for t in full._ot_study.trials]


def test_compaction_leaves_a_running_trial_alone() -> None:
    from search.searcher import compact_finished_trial

    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study._storage.set_trial_system_attr(trial._trial_id, "tpe:relative_params:0", "{}")
    compact_finished_trial(study, trial._trial_id, {})
    assert "tpe:relative_params:0" in study._storage.get_trial(trial._trial_id).system_attrs
    study.tell(trial, 0.5)
    compact_finished_trial(study, trial._trial_id, {})
    assert study.trials[0].system_attrs == {} and study.trials[0].params == trial.params


def test_slow_space_warning_adds_no_registry_key_per_trial() -> None:
    """OptunaSearch's "define-by-run took N seconds" warning, a new text (and a new
    warnings-registry key) at every slow suggestion, is ignored once a searcher exists."""
    import warnings

    import ray.tune.search.optuna.optuna_search as optuna_search

    _searcher()
    registry: dict[Any, Any] = {}
    for i in range(20):
        warnings.warn_explicit(
            f"Define-by-run function passed in the `space` argument took {1 + i / 7} seconds "
            "to run.", UserWarning, optuna_search.__file__, 472, registry=registry)
    assert [k for k in registry if k != "version"] == []

