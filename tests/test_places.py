"""Where things go: MLflow artifacts beside the tracking store whatever the working
directory, and Tune checkpoints deleted once a trial is finished."""

from __future__ import annotations

import os
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


def test_finished_trials_lose_their_checkpoints(tmp_path) -> None:
    """DropFinishedCheckpoints deletes a completed trial's checkpoint directories and
    nothing else."""
    from pyarrow.fs import LocalFileSystem

    from search.checkpoints import DropFinishedCheckpoints

    trial_dir = tmp_path / "trial_0"
    for name in ("checkpoint_000003", "checkpoint_000004"):
        (trial_dir / name).mkdir(parents=True)
        (trial_dir / name / "state.pt").write_bytes(b"x" * 100)
    (trial_dir / "result.json").write_text("{}")
    trial = SimpleNamespace(trial_id="t0", storage=SimpleNamespace(
        storage_filesystem=LocalFileSystem(), trial_fs_path=str(trial_dir)))
    DropFinishedCheckpoints().on_trial_complete(0, [trial], trial)
    assert sorted(os.listdir(trial_dir)) == ["result.json"]
    # an absent trial directory or another failure never raises
    gone = SimpleNamespace(trial_id="t1", storage=SimpleNamespace(
        storage_filesystem=LocalFileSystem(), trial_fs_path=str(tmp_path / "absent")))
    DropFinishedCheckpoints().on_trial_complete(0, [gone], gone)
    DropFinishedCheckpoints().on_trial_complete(0, [], SimpleNamespace(trial_id="t2"))


@pytest.mark.slow
def test_a_search_keeps_no_checkpoint_of_a_finished_trial(tmp_path) -> None:
    """A real (tiny) search: the checkpoints left in Tune's storage are those of trials
    the budget was still running when it ended the search."""
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
    # only trials the search's end cut while they ran (Tune never finishes them) keep theirs
    assert len(per_trial) <= cfg.max_concurrent, left
    assert len(out.trials) >= len(per_trial) + 3, (len(out.trials), left)
