"""A trial's overhead cut where it is paid (issue 15): one validation pass per report,
checkpoints only where resume or ASHA needs them, written atomically, logging flushed.

The trial function runs here outside Tune, with Tune's calls replaced by a recorder, so
what it reports and when it checkpoints is seen report by report.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import search.trainable as trainable
import trainers.loop as loop
from search.trainable import STATE_FILE, TrialContext, load_state, run_trial, save_state
from spaces import build_model
from tests.test_model import planted_pairwise
from trainers.contracts import VAL_SE
from trainers.data import DataConfig, SyntheticConfig
from trainers.experiment import experiment_from_flat

CONFIG = {"model.block": "tokenmixer", "model.d_model": 16, "model.n_tokens": 4,
          "model.n_layers": 1, "model.embed_dim": 8, "model.head_hidden": (16,),
          "train.batch_size": 100}


class _Tune:
    """Stands in for ``ray.tune`` in ``search.trainable``: records each report, and
    reads the state a checkpoint carries while its folder still exists."""

    class Checkpoint:
        def __init__(self, path: str) -> None:
            self.path = path

        @classmethod
        def from_directory(cls, path: str) -> _Tune.Checkpoint:
            return cls(path)

    class _Context:
        def get_trial_id(self) -> str:
            return "t0"

        def get_trial_resources(self) -> Any:
            raise RuntimeError("outside Tune")

    def __init__(self) -> None:
        self.reports: list[tuple[dict[str, Any], dict[str, Any] | None]] = []

    def get_context(self) -> _Tune._Context:
        return self._Context()

    def get_checkpoint(self) -> None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        state = None
        if checkpoint is not None:
            assert sorted(os.listdir(checkpoint.path)) == [STATE_FILE]  # no temporary left
            state = torch.load(Path(checkpoint.path) / STATE_FILE, weights_only=True)
        self.reports.append((dict(metrics), state))


class _Ray:
    class _Runtime:
        def get_node_id(self) -> str:
            return "node"

    def get_runtime_context(self) -> _Ray._Runtime:
        return self._Runtime()

    def get_gpu_ids(self) -> list[int]:
        return []


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    spec, tr = planted_pairwise(3000, seed=0)
    _, va = planted_pairwise(1000, seed=1)
    shared: dict[str, Any] = {"spec": spec}
    for name, split in (("train", tr), ("val", va)):
        shared[name] = {k: getattr(split, k).numpy() for k in ("cat", "num", "label")}
    return shared


def _run(monkeypatch: pytest.MonkeyPatch, data: dict[str, Any], every_s: float,
         fake: _Tune | None = None, **tracking: Any) -> tuple[_Tune, TrialContext]:
    """One trial of ``CONFIG``: 4000 examples' worth of FLOPs, a report every 500
    examples, ASHA's milestones at 1000 and 2000 examples and the end. ``fake``: the
    stand-in for ``ray.tune`` (one that restores a checkpoint)."""
    import ray

    fake = fake or _Tune()
    monkeypatch.setattr(trainable, "tune", fake)
    monkeypatch.setattr(ray, "get_runtime_context", _Ray().get_runtime_context)
    monkeypatch.setattr(ray, "get_gpu_ids", _Ray().get_gpu_ids)
    from spaces import model_cost

    data_cfg = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=4000))
    fpe = model_cost(experiment_from_flat(CONFIG, data_cfg).model, data["spec"]).flops_per_example
    per_example = 3 * fpe
    near = 1 - 1e-9  # whole batches whatever the rounding of the FLOPs
    context = TrialContext(search="s", data=data_cfg, trial_flops=4000.5 * per_example,
                           milestones=(1000 * near * per_example, 2000 * near * per_example,
                                       4000 * near * per_example),
                           report_every_flops=500 * per_example, eval_max_examples=600,
                           **{"tracking_uri": None, "experiment_id": None,
                              "parent_run_id": None, **tracking},
                           checkpoint_every_s=every_s)
    run_trial(dict(CONFIG), context, data)
    return fake, context


def test_checkpoints_only_at_milestones_and_the_end(monkeypatch, data) -> None:
    fake, _ = _run(monkeypatch, data, every_s=1e9)
    seen = [int(m["examples_seen"]) for m, _ in fake.reports]
    assert seen == list(range(500, 4001, 500))
    with_state = [int(m["examples_seen"]) for m, s in fake.reports if s is not None]
    assert with_state == [1000, 2000, 4000]
    assert [m["checkpoints"] for m, _ in fake.reports] == [0, 1, 1, 2, 2, 2, 2, 3]
    for metrics, state in fake.reports:
        if state is not None:  # the state is the report's: what a resume continues from
            assert state["examples_seen"] == metrics["examples_seen"]
    assert fake.reports[-1][0]["trial_status"] == "completed"


def test_a_short_interval_checkpoints_every_report(monkeypatch, data) -> None:
    """The time bound on what a fault can cost: with it at 0 (the default: a resume
    then redoes at most one report interval, as the budget's bound assumes) every report
    carries one."""
    assert TrialContext.__dataclass_fields__["checkpoint_every_s"].default == 0.0
    fake, _ = _run(monkeypatch, data, every_s=0.0)
    assert all(state is not None for _, state in fake.reports)
    assert fake.reports[-1][0]["checkpoints"] == len(fake.reports)


def test_one_validation_pass_per_report_and_its_standard_error(monkeypatch, data) -> None:
    """The SE and the milestone losses come from the loop's own evaluation, not a
    second pass over the validation set; the SE is that of those very losses."""
    calls: list[int] = []
    predict = loop.predict_logits

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return predict(*args, **kwargs)

    monkeypatch.setattr(loop, "predict_logits", counted)
    monkeypatch.setattr(trainable, "predict_logits", counted)
    fake, _ = _run(monkeypatch, data, every_s=1e9)
    assert len(calls) == len(fake.reports) == 8
    metrics, state = fake.reports[-1]
    assert state is not None
    model = build_model(experiment_from_flat(CONFIG).model, data["spec"])
    model.load_state_dict(state["model"])
    va = trainable._view(data["val"])
    losses = trainable.val_losses(model, va, 600)
    assert metrics[VAL_SE] == pytest.approx(float(losses.std()) / math.sqrt(600), rel=1e-5)
    assert metrics["val_logloss"] == pytest.approx(float(losses.mean()), rel=1e-6)


def test_evaluate_losses_average_to_the_reported_loss(data) -> None:
    spec = data["spec"]
    va = trainable._view(data["val"])
    model = build_model(experiment_from_flat(CONFIG).model, spec)
    metrics, losses = loop.evaluate_losses(model, va, 0.5, limit=300)
    assert losses.shape == (300,)
    assert metrics["val_logloss"] == float(losses.mean())
    assert metrics == loop.evaluate(model, va, 0.5, limit=300)


def test_a_state_write_cut_short_leaves_the_previous_checkpoint(monkeypatch, tmp_path) -> None:
    """``save_state`` writes a temporary file and renames it: a write that dies half-way
    leaves no cut ``state.pt`` (nor the temporary), so the trial resumes from the whole
    checkpoint before."""
    old, new = tmp_path / "checkpoint_000001", tmp_path / "checkpoint_000002"
    old.mkdir()
    new.mkdir()
    save_state({"examples_seen": 1, "w": torch.ones(4)}, old)
    real_save = torch.save

    def dies_half_way(obj: Any, path: Any) -> None:
        real_save(obj, path)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError("killed during the write")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="killed"):
        save_state({"examples_seen": 2, "w": torch.full((4,), 2.0)}, new)
    assert list(new.iterdir()) == []
    state = load_state(str(new))
    assert state is not None and state["examples_seen"] == 1
    monkeypatch.setattr(torch, "save", real_save)
    save_state({"examples_seen": 2, "w": torch.full((4,), 2.0)}, new)
    assert load_state(str(new))["examples_seen"] == 2  # type: ignore[index]
    assert [p.name for p in new.iterdir()] == [STATE_FILE]


def test_the_tracker_writes_everything_by_its_flush(tmp_path) -> None:
    """Metrics (MLflow's asynchronous batches) and val-loss artifacts (the tracker's own
    thread) are all in the store once ``flush`` returns; its thread is gone."""
    import threading

    import numpy as np
    from mlflow.tracking import MlflowClient

    from trainers.tracking import TrialTracker, find_or_create_parent

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    tracker = TrialTracker(uri, exp_id, parent, "t1", "wukong", {}, "s")
    steps = list(range(100, 2100, 100))
    for step in steps:
        tracker.log({"val_logloss": 0.6 - step / 1e5, "train_flops": float(step)})
        if step % 500 == 0:
            tracker.log_val_losses(step, np.full(64, step / 1e4))
    tracker.flush()
    assert not any(t.name.startswith("mlflow-files") for t in threading.enumerate())
    history = client.get_metric_history(tracker.run_id, "val_logloss")
    assert sorted(int(m.step) for m in history) == steps
    files = sorted(f.path for f in client.list_artifacts(tracker.run_id, "val_losses"))
    assert files == [f"val_losses/{s}.npy" for s in (1000, 1500, 2000, 500)]
    got = np.load(client.download_artifacts(tracker.run_id, "val_losses/1500.npy",
                                            str(tmp_path)))
    assert got.dtype == np.float16 and float(got[0]) == pytest.approx(0.15, rel=1e-3)


def test_a_failed_write_is_raised_by_flush_after_the_others(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from trainers.tracking import TrialTracker, find_or_create_parent

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp_id, parent, _ = find_or_create_parent(MlflowClient(uri), "s", {}, tags={})
    tracker = TrialTracker(uri, exp_id, parent, "t1", "wukong", {}, "s")
    written: list[int] = []

    def write(train_flops: int, losses: Any) -> None:
        if train_flops == 100:
            raise OSError("store down")
        written.append(train_flops)

    monkeypatch.setattr(tracker, "_write_losses", write)
    for step in (100, 200, 300):
        tracker.log_val_losses(step, [0.5])
    with pytest.raises(OSError, match="store down"):
        tracker.flush()
    assert written == [200, 300]
    tracker.log_val_losses(400, [0.5])
    tracker.flush(raise_errors=True)  # nothing left over from before
    assert written == [200, 300, 400]


def test_a_report_lost_in_an_outage_is_sent_again_at_flush_in_its_place(tmp_path) -> None:
    """The store was down when report 200 was sent (MLflow's asynchronous write failed)
    and is back at the trial's end: flush sends that batch again with its first time
    stamps, so the series has no gap and does not go backwards in time (what the audit
    checks; a trial that failed here instead would be retried past it, leaving a gap)."""
    import time

    from mlflow.tracking import MlflowClient

    from trainers.tracking import TrialTracker, find_or_create_parent

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    tracker = TrialTracker(uri, exp_id, parent, "t1", "wukong", {}, "s")
    real = tracker.client.log_batch

    class Failed:
        def wait(self) -> None:
            raise ConnectionError("store down")

    def log_batch(run_id: str, metrics: Any, synchronous: bool = True) -> Any:
        if not synchronous and metrics[0].step == 200:
            return Failed()
        return real(run_id, metrics=metrics, synchronous=synchronous)

    tracker.client.log_batch = log_batch  # type: ignore[method-assign]
    for step in (100, 200, 300):
        tracker.log({"val_logloss": 0.6 - step / 1e4, "train_flops": float(step)})
        time.sleep(0.01)  # distinct time stamps
    tracker.flush()  # no error: the second try went through
    history = sorted(client.get_metric_history(tracker.run_id, "val_logloss"),
                     key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in history] == [100, 200, 300]


def test_a_failing_trial_flushes_what_it_logged(monkeypatch, data, tmp_path) -> None:
    """A trial that fails after two reports: both are in MLflow when the error leaves
    the trial function (a retry will not log them again)."""
    from mlflow.tracking import MlflowClient

    from trainers.tracking import find_or_create_parent

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    real_train = trainable.train

    def fails_after_two(*args: Any, report: Any, **kwargs: Any) -> Any:
        count = {"n": 0}

        def counting(metrics: Any, state: Any) -> bool:
            if count["n"] == 2:
                raise RuntimeError("worker lost")
            count["n"] += 1
            return bool(report(metrics, state))

        return real_train(*args, report=counting, **kwargs)

    from trainers.tracking import TrialTracker

    flushes: list[bool] = []
    real_flush = TrialTracker.flush

    def spied(self: TrialTracker, raise_errors: bool = True) -> None:
        flushes.append(raise_errors)
        real_flush(self, raise_errors)

    monkeypatch.setattr(TrialTracker, "flush", spied)
    monkeypatch.setattr(trainable, "train", fails_after_two)
    with pytest.raises(RuntimeError, match="worker lost"):
        _run(monkeypatch, data, every_s=1e9, tracking_uri=uri, experiment_id=exp_id,
             parent_run_id=parent)
    assert flushes == [False]  # flushed as it failed, its own error kept
    (run,) = client.search_runs([exp_id], "tags.trial_id = 't0'")
    steps = [int(m.step) for m in client.get_metric_history(run.info.run_id, "val_logloss")]
    assert len(steps) == 2 and steps == sorted(steps)
    files = [f.path for f in client.list_artifacts(run.info.run_id, "val_losses")]
    assert files == [f"val_losses/{steps[1]}.npy"]  # the first milestone, at 1000 examples


def test_a_restored_trial_reports_the_segment_it_trains_again_as_work(
        tmp_path, monkeypatch, data) -> None:
    """Killed after its last report (4000 examples, all logged), restored from its
    checkpoint at 1000: it trains 1000..4000 again. Its ``train_flops`` repeat the first
    run's (MLflow is not written twice) while its ``work_flops``, what the budget
    counts, go on from what it had cost: 4000 + (p - 1000) examples' worth at each
    report p; every report of the first run had work equal to ``train_flops``."""
    import pyarrow.fs
    from mlflow.tracking import MlflowClient

    from trainers.contracts import TAG_STATUS, WORK_ATTR
    from trainers.tracking import find_or_create_parent

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    tracking = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent}
    first, _ = _run(monkeypatch, data, every_s=0.0, **tracking)
    assert all(m[WORK_ATTR] == m["train_flops"] for m, _ in first.reports)
    per_example = first.reports[0][0]["train_flops"] / first.reports[0][0]["examples_seen"]
    (run,) = client.search_runs([exp_id], "tags.trial_id = 't0'")
    client.set_tag(run.info.run_id, TAG_STATUS, "RUNNING")  # killed, not finished
    history = client.get_metric_history(run.info.run_id, "val_logloss")

    at = next(state for m, state in first.reports if m["examples_seen"] == 1000)
    (tmp_path / "ckpt").mkdir()
    save_state(at, tmp_path / "ckpt")

    class Restored(_Tune):
        def get_checkpoint(self) -> Any:
            from types import SimpleNamespace

            return SimpleNamespace(path=str(tmp_path / "ckpt"),
                                   filesystem=pyarrow.fs.LocalFileSystem())

    restored, _ = _run(monkeypatch, data, every_s=0.0, fake=Restored(), **tracking)
    seen = [m["examples_seen"] for m, _ in restored.reports]
    assert seen == [1500.0, 2000.0, 2500.0, 3000.0, 3500.0, 4000.0]
    for m, _ in restored.reports:
        assert m[WORK_ATTR] == pytest.approx((4000 + m["examples_seen"] - 1000) * per_example)
    assert len(client.get_metric_history(run.info.run_id, "val_logloss")) == len(history)


def test_a_resume_floors_restored_trials_at_their_logged_work_and_charges_nothing_ahead(
        tmp_path, monkeypatch) -> None:
    """Tune saved its state with a trial at 300 (its checkpoint) while its run had
    logged up to 900: the trial's floor is 900, and nothing is charged for the re-run
    segment before it is trained (the trial's work counts it). A run Tune does not know
    is LOST, its work untracked spend."""
    from types import SimpleNamespace

    import ray.tune
    from mlflow.tracking import MlflowClient

    from search.runner import Tracking, reconcile_resumed
    from trainers.tracking import TrialTracker, find_or_create_parent

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "s", {}, tags={})
    for trial_id, steps in (("t1", (300, 600, 900)), ("gone", (200, 400))):
        tracker = TrialTracker(uri, exp_id, parent, trial_id, "wukong", {}, "s")
        for step in steps:
            work = step * 1.5 if trial_id == "gone" else step  # "gone" had re-run 200
            tracker.log({"val_logloss": 0.5, "train_flops": float(step), "work_flops": work})
        tracker.flush()
    trial = SimpleNamespace(trial_id="t1", status="RUNNING", last_result={"train_flops": 300.0},
                            latest_checkpoint_result=SimpleNamespace(
                                metrics={"train_flops": 300.0}))
    monkeypatch.setattr(ray.tune, "ExperimentAnalysis",
                        lambda path: SimpleNamespace(trials=[trial]))
    plan = SimpleNamespace(restoring=True, exp_path=tmp_path)
    tracking = Tracking(uri, exp_id, parent)
    assert reconcile_resumed(plan, tracking) == (600.0, {"t1": 900.0})  # type: ignore[arg-type]
    # a second resume: "gone" stays counted once, "t1" is floored again
    assert reconcile_resumed(plan, tracking) == (600.0, {"t1": 900.0})  # type: ignore[arg-type]
