"""Where things go: MLflow artifacts beside the tracking store whatever the working
directory, and Tune checkpoints deleted once a trial is finished."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from trainers.contracts import artifact_location
from trainers.tracking import RunWriter, find_or_create_parent


def test_artifacts_land_beside_the_store_not_in_the_working_directory(
        tmp_path, monkeypatch) -> None:
    store = tmp_path / "store"
    store.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    (elsewhere / "model").mkdir()
    (elsewhere / "model" / "weights.txt").write_text("w")
    run = RunWriter(uri, "recscale-train", "train-x", {}, {})
    run.log_artifacts(elsewhere / "model", artifact_path="model")
    run.end()
    _, parent, _ = find_or_create_parent(MlflowClient(uri), "a-search", {}, {})
    MlflowClient(uri).log_dict(parent, {"a": 1}, "search.json")
    root = store / "mlartifacts"
    assert (root / "recscale-train" / run.run_id / "artifacts" / "model" / "weights.txt").exists()
    assert (root / "a-search" / parent / "artifacts" / "search.json").exists()
    assert not (elsewhere / "mlruns").exists()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("recscale-train")
    assert exp.artifact_location.endswith(str(root / "recscale-train"))


def test_a_relative_store_uri_puts_artifacts_beside_the_store(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert artifact_location("sqlite:///runs/mlflow.db", "s") == str(tmp_path / "runs" / "mlartifacts" / "s")
    assert artifact_location("http://127.0.0.1:5000", "s") is None  # the server decides
    assert artifact_location("databricks", "s") is None


def test_train_from_another_directory_keeps_artifacts_with_the_store(tmp_path, monkeypatch,
                                                                      capsys) -> None:
    """`recscale train` run in one directory with the store in another."""
    import yaml

    from recscale.cli import main
    from tests.test_train_cli import CONFIG

    monkeypatch.setenv("RECSCALE_CACHE", str(tmp_path / "cache"))
    store, work = tmp_path / "store", tmp_path / "work"
    store.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    small = {**CONFIG, "data": {"name": "synthetic", "synthetic": {"n_rows": 600, "n_cat_fields": 3,
                                                                   "cardinality": 10}}}
    Path("exp.yaml").write_text(yaml.safe_dump(small))
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert main(["train", "exp.yaml", "--tracking-uri", uri, "--no-progress"]) == 0
    capsys.readouterr()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("recscale-train").experiment_id])
    assert (store / "mlartifacts" / "recscale-train" / run.info.run_id / "artifacts" / "model"
            / "weights.pt").exists()
    assert not (work / "mlruns").exists()


def test_finished_trials_are_pruned_once_a_later_state_is_saved(tmp_path) -> None:
    """A finished trial keeps every checkpoint until an experiment state saved after it
    finished is in the storage (a resume before that restores it from an older one),
    then only its last; at the search's end only the winner keeps its last."""
    from pyarrow.fs import LocalFileSystem

    from search.checkpoints import DropFinishedCheckpoints, prune_finished

    def trial(name: str) -> SimpleNamespace:
        d = tmp_path / name
        for ck in ("checkpoint_000003", "checkpoint_000004"):
            (d / ck).mkdir(parents=True)
            (d / ck / "state.pt").write_bytes(b"x" * 100)
        (d / "result.json").write_text("{}")
        return SimpleNamespace(trial_id=name, status="TERMINATED", storage=SimpleNamespace(
            storage_filesystem=LocalFileSystem(), trial_fs_path=str(d)))

    t0, t1 = trial("t0"), trial("t1")
    cb = DropFinishedCheckpoints(tmp_path, every=0.0)
    cb.on_trial_complete(0, [t0], t0)
    cb.on_step_end(0, [t0])  # no experiment state saved since: nothing goes
    assert sorted(os.listdir(tmp_path / "t0")) == [
        "checkpoint_000003", "checkpoint_000004", "result.json"]
    time.sleep(0.05)
    (tmp_path / "experiment_state-2026.json").write_text("{}")
    cb.on_step_end(1, [t0])
    assert sorted(os.listdir(tmp_path / "t0")) == ["checkpoint_000004", "result.json"]
    assert prune_finished([t0, t1], keep="t1") == 2
    assert sorted(os.listdir(tmp_path / "t0")) == ["result.json"]
    assert sorted(os.listdir(tmp_path / "t1")) == ["checkpoint_000004", "result.json"]
    # an absent trial directory, or a trial without storage, never raises
    gone = SimpleNamespace(trial_id="t2", status="TERMINATED", storage=SimpleNamespace(
        storage_filesystem=LocalFileSystem(), trial_fs_path=str(tmp_path / "absent")))
    assert prune_finished([gone, SimpleNamespace(trial_id="t3", status="TERMINATED")], None) == 0


@pytest.mark.slow
def test_a_search_keeps_only_the_checkpoints_it_may_need(tmp_path) -> None:
    """A real (tiny) search: the only checkpoints left in Tune's storage are the
    winner's last and those of trials the budget was still running when it ended."""
    import tempfile

    import ray

    from search.runner import run_search
    from search.settings import SearchConfig
    from tests.test_export_repro import DATA, SPACE
    from trainers.data import load_dataset

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    ds = load_dataset(DATA, cache_dir=tmp_path / "cache")
    cfg = SearchConfig(name="places", space=str(space), data=DATA, budget_flops=9e8,
                       trial_flops=3e8, eval_max_examples=300, max_concurrent=2, seed=1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rp", dir="/tmp"))
    try:
        out = run_search(cfg, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                         storage=tmp_path / "ray", verbose=0, dataset=ds)
    finally:
        ray.shutdown()
    left = [p for p in (tmp_path / "ray").rglob("checkpoint_*") if p.is_dir()]
    per_trial = {p.parent for p in left}
    # the winner's last, and trials the search's end cut while they ran (Tune never
    # finishes them) keep theirs
    assert len(per_trial) <= cfg.max_concurrent + 1, left
    assert len(per_trial) < len(out.trials), (len(out.trials), left)  # the rest: none
