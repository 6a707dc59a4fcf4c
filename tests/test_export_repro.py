"""The exported model is the measured one: a tiny real search (local Ray, MLflow in
SQLite), its best trial exported, trained by ``recscale train``'s ``train_full``; the
validation loss where training stops equals the search's record (same data, seeds,
schedule, length and validation subset), and a trial ASHA stopped early is reproduced
too. Also: exports that train from any directory."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.export import export_config, reproduce_trial
from analysis.runs import load_search, runs_from_frames
from search.references import is_reference_id
from search.runner import run_search
from search.settings import SearchConfig
from trainers.contracts import OBJECTIVE, VAL_SE
from trainers.data import DataConfig, SyntheticConfig, dataset_fingerprint, load_dataset
from trainers.experiment import experiment_from_flat, load_experiment
from trainers.full import train_full
from trainers.loop import train

DATA = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=4_000, n_cat_fields=5,
                                                              cardinality=20, seed=2))
SPACE = """
name: repro
families: [tokenmixer]
model:
  n_layers: {int: [1, 2]}
  d_model: {choice: [16, 32]}
  n_tokens: 4
  embed_dim: 8
  head_hidden: [32]
blocks:
  tokenmixer:
    ffn_mult: {choice: [1, 2]}
train:
  lr: {float: [1.0e-3, 3.0e-2], log: true}
  batch_size: 128
  schedule: cosine
  seed: {int: [0, 9]}
  max_epochs: 1
"""
#: where a trial that ran its whole length ends: one pass over the 3,200 training rows, in
#: whole batches of 128, before its FLOPs share (``max_epochs``)
ONE_PASS = 3_200 // 128 * 128


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("repro")
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    ds = load_dataset(DATA, cache_dir=tmp / "cache")
    cfg = SearchConfig(name="repro", space=str(space), data=DATA, budget_flops=1.5e9,
                       trial_flops=3e8, eval_max_examples=300, max_concurrent=2, seed=1)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rx", dir="/tmp"))
    try:
        outcome = run_search(cfg, tracking_uri=uri, storage=tmp / "ray", verbose=0, dataset=ds)
    finally:
        ray.shutdown()
    return cfg, outcome, ds, tmp


@pytest.mark.slow
def test_export_then_train_reproduces_the_search_record(search, monkeypatch) -> None:
    cfg, outcome, ds, tmp = search
    monkeypatch.setenv("RECSCALE_CACHE", str(tmp / "cache"))
    runs = load_search(cfg.name, outcome.tracking_uri)
    exp = export_config(runs, tmp / "best.yaml")
    record = exp.provenance
    assert record[OBJECTIVE] == pytest.approx(float(outcome.winner()[OBJECTIVE]))
    assert record[VAL_SE] > 0 and record["examples_seen"] > 0
    assert exp.train.eval_max_examples == cfg.eval_max_examples  # the same validation subset
    assert exp.train.schedule == "cosine"
    loaded = load_experiment(tmp / "best.yaml")
    assert loaded == exp
    res = train_full(loaded, tmp / "train", tracking_uri=outcome.tracking_uri, progress=False,
                     dataset=ds)
    print(f"record {record[OBJECTIVE]!r} ± {record[VAL_SE]:.3g} at {record['examples_seen']:.0f} "
          f"examples ({record.get('trial_status')}); train_full stops at {res.last[OBJECTIVE]!r}, "
          f"best {res.val[OBJECTIVE]!r} at {res.best_at['examples_seen']:.0f}")
    assert res.status == "completed"
    assert res.stopped_at["examples_seen"] == record["examples_seen"]
    # where training stops it is the recorded model: equal up to float noise, far inside 1 SE
    assert abs(res.last[OBJECTIVE] - record[OBJECTIVE]) <= 1e-5 + 1e-3 * record[VAL_SE]
    assert abs(res.last[OBJECTIVE] - record[OBJECTIVE]) <= record[VAL_SE]
    # the saved model is the best evaluation's: never worse than the record
    assert res.val[OBJECTIVE] <= res.last[OBJECTIVE] + 1e-12
    assert res.best_at["examples_seen"] <= res.stopped_at["examples_seen"]


@pytest.mark.slow
def test_a_trial_asha_stopped_is_reproduced_at_its_result(search) -> None:
    """A stopped trial's schedule was planned for its whole share of the search: the
    reproduction keeps that length and ends where the trial's result was reported."""
    cfg, outcome, ds, _ = search
    runs = load_search(cfg.name, outcome.tracking_uri)
    trials = runs.trials
    stopped = trials[trials["status"] == "STOPPED"]
    assert len(stopped), trials[["status", "examples_seen"]]
    row = stopped.sort_values(OBJECTIVE).iloc[0]
    exp = experiment_from_flat(row["config"], DATA)
    tc = reproduce_trial(exp.train, row, SearchConfig(**runs.settings))
    assert tc.stop_after_examples == int(row["examples_seen"]) < int(tc.max_examples or 0)
    res = train(exp.model, tc, ds.spec, ds.train, ds.val)
    print(f"stopped trial: record {row[OBJECTIVE]!r} at {row['examples_seen']:.0f} of "
          f"{tc.max_examples}; reproduced {res.metrics[OBJECTIVE]!r}")
    assert res.metrics["examples_seen"] == row["examples_seen"]
    assert abs(res.metrics[OBJECTIVE] - row[OBJECTIVE]) <= 1e-5 + 1e-3 * row[VAL_SE]
    # the old export, trained for trial_flops/(3·fpe) examples, would have run further
    assert math.floor(cfg.trial_budget / (3 * row["flops_per_example"])) > row["examples_seen"]


@pytest.mark.slow
def test_a_trial_ended_by_its_passes_is_reproduced(search) -> None:
    """``max_epochs``: a trial that ran its whole length completed after one pass, short
    of its FLOPs share, with its schedule planned for that pass; the export plans the same
    length and the retrained model ends where the trial's result was reported."""
    cfg, outcome, ds, _ = search
    runs = load_search(cfg.name, outcome.tracking_uri)
    trials = runs.trials
    searched = trials[~trials["trial_id"].map(is_reference_id)]  # the references run apart
    done = searched[searched["status"] == "COMPLETED"]
    assert len(done), trials[["status", "examples_seen"]]
    assert len(ds.train) == 3_200
    for _, row in done.iterrows():
        assert row["examples_seen"] == ONE_PASS < math.floor(
            cfg.trial_budget / (3 * row["flops_per_example"]))
        assert row["train_flops"] < cfg.trial_budget
    row = done.sort_values(OBJECTIVE).iloc[0]
    exp = experiment_from_flat(row["config"], DATA)
    tc = reproduce_trial(exp.train, row, SearchConfig(**runs.settings))
    assert tc.total_examples(len(ds.train)) == ONE_PASS
    res = train(exp.model, tc, ds.spec, ds.train, ds.val)
    assert res.status == "completed" and res.metrics["examples_seen"] == ONE_PASS
    assert abs(res.metrics[OBJECTIVE] - row[OBJECTIVE]) <= 1e-5 + 1e-3 * row[VAL_SE]


# ---- portable exports ----------------------------------------------------------------


def _file_search(tmp: Path) -> tuple[DataConfig, pd.DataFrame, pd.DataFrame]:
    """A file dataset and a one-trial search record of it (frames; no Ray)."""
    data_dir = tmp / "data"
    data_dir.mkdir()
    rows = ["user,item,clicked"] + [f"u{i % 17},i{i % 11},{int(i % 3 == 0)}" for i in range(600)]
    (data_dir / "clicks.csv").write_text("\n".join(rows) + "\n")
    (data_dir / "schema.yaml").write_text("label: clicked\ncategorical: [user, item]\n")
    data = DataConfig(name="file", path="data/clicks.csv", schema_path="data/schema.yaml")
    exp = experiment_from_flat({"model.block": "wukong", "model.d_model": 16,
                                "model.embed_dim": 8, "train.batch_size": 64})
    config = {k: v for k, v in exp.flat().items() if k.startswith(("model.", "train."))}
    trials = pd.DataFrame([{"run_id": "r0", "trial_id": "t0", "block": "wukong",
                            "status": "COMPLETED", "config": config, **config}])
    history = pd.DataFrame([{"run_id": "r0", "step": s * 1e6, "examples_seen": float(s * 64),
                             "flops_per_example": 1e4, OBJECTIVE: 0.6 - s / 100, VAL_SE: 0.01}
                            for s in (1, 2, 3)])
    return data, trials, history


def test_exported_paths_are_relative_to_the_yaml_and_train_from_anywhere(
        tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the search ran here, with paths typed relative to it
    monkeypatch.setenv("RECSCALE_CACHE", str(tmp_path / "cache"))
    data, trials, history = _file_search(tmp_path)
    settings = {"data": data.model_dump(mode="json")}
    runs = runs_from_frames(trials, history, "files", settings)
    fingerprint = dataset_fingerprint(data)
    exp = export_config(runs, tmp_path / "reports" / "files" / "best.yaml")
    raw = yaml.safe_load((tmp_path / "reports" / "files" / "best.yaml").read_text())
    assert raw["data"]["path"] == "../../data/clicks.csv"
    assert raw["data"]["schema_path"] == "../../data/schema.yaml"
    # only the file dataset's keys: no MovieLens label rule, no synthetic teacher
    assert "label" not in raw["data"] and "synthetic" not in raw["data"]
    assert exp.train.max_examples == 3 * 64  # the record's examples_seen
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_experiment(Path("..") / "reports" / "files" / "best.yaml")
    assert loaded.data.path == str(tmp_path / "data" / "clicks.csv")
    assert dataset_fingerprint(loaded.data) == fingerprint
    res = train_full(loaded, "out", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                     progress=False)
    assert res.status == "completed" and 0 <= res.test["test_logloss"] < 5
    # the model directory's config points back at the data, relative to itself
    saved = yaml.safe_load((elsewhere / "out" / "model" / "config.yaml").read_text())
    assert saved["data"]["path"] == "../../../data/clicks.csv"
    monkeypatch.chdir(tmp_path / "data")
    assert load_experiment(elsewhere / "out" / "model" / "config.yaml").data == loaded.data


def test_a_synthetic_export_has_no_file_keys_and_keeps_its_fingerprint(tmp_path) -> None:
    from trainers.experiment import ExperimentConfig, data_dict

    exp = experiment_from_flat({"model.block": "wukong"}, DATA)
    d = data_dict(exp.data)
    assert "path" not in d and "schema_path" not in d and "label" not in d
    assert d["synthetic"]["n_rows"] == 4_000
    ml = data_dict(DataConfig())
    assert ml["label"] == "rating>=4" and "synthetic" not in ml
    exp.to_yaml(tmp_path / "e.yaml")
    back = load_experiment(tmp_path / "e.yaml")
    assert back == exp and dataset_fingerprint(back.data) == dataset_fingerprint(DATA)
    assert isinstance(back, ExperimentConfig)


def test_export_refuses_data_files_it_cannot_find(tmp_path, monkeypatch) -> None:
    from analysis.runs import AnalysisError

    monkeypatch.chdir(tmp_path)
    data, trials, history = _file_search(tmp_path)
    runs = runs_from_frames(trials, history, "files", {"data": data.model_dump(mode="json")})
    monkeypatch.chdir(tmp_path / "data")  # not where the search ran: data/clicks.csv is absent
    with pytest.raises(AnalysisError, match="run export from the directory the search ran in"):
        export_config(runs, tmp_path / "b.yaml")


# ---- recommendations inside what was measured ------------------------------------------

LAW = {"E": 0.3, "A": 1e3, "alpha": 1.0, "B": 1.0, "beta": 0.3}


def _law_search(sizes: tuple[float, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials of several sizes whose reports follow ``LAW`` (plus a little noise)."""
    import numpy as np

    rng = np.random.default_rng(0)
    trials, history = [], []
    exp = experiment_from_flat({"model.block": "wukong", "model.d_model": 16})
    config = {k: v for k, v in exp.flat().items() if k.startswith(("model.", "train."))}
    for i, n in enumerate(sizes):
        trials.append({"run_id": f"r{i}", "trial_id": f"t{i}", "block": "wukong",
                       "status": "COMPLETED", "config": config, **config})
        for d in (1e4, 3e4, 1e5):
            loss = (LAW["E"] + LAW["A"] * n ** -LAW["alpha"] + LAW["B"] * d ** -LAW["beta"]
                    + rng.normal(0, 1e-4))
            history.append({"run_id": f"r{i}", "step": 3 * n * d, "examples_seen": d,
                            "flops_per_example": n, OBJECTIVE: loss, VAL_SE: 0.01})
    return pd.DataFrame(trials), pd.DataFrame(history)


def _fit() -> object:
    from analysis.fits import JointFit

    return JointFit(status="converged", message="", n_points=12, **LAW)


def test_a_size_needing_more_passes_than_measured_is_not_recommended() -> None:
    from analysis.report import recommend_size

    _, history = _law_search((1e3, 3e3, 1e4, 1e5))
    size = recommend_size(_fit(), history, 1.5e12)
    assert size.examples > 1e5 and size.status == "extrapolated" and not size.trusted
    assert "passes over the training split were never measured" in size.message
    assert size.as_dict()["status"] == "extrapolated"


def test_a_predicted_loss_below_the_best_observed_is_not_recommended() -> None:
    from analysis.report import recommend_size

    _, history = _law_search((1e3, 3e3, 1e4))  # the best observed: 0.43, at N = 1e4
    size = recommend_size(_fit(), history, 1.5e10)
    assert size.examples <= 1e5  # inside the data measured, but 10x beyond the sizes
    assert size.predicted_val_logloss < history[OBJECTIVE].min() - 0.05
    assert size.status == "extrapolated" and "below the best observed" in size.message
    # with a trial near that size the same budget's answer is inside what was measured
    _, measured = _law_search((1e3, 3e3, 1e4, 1e5))
    ok = recommend_size(_fit(), measured, 1.5e10)
    assert ok.status == "ok" and ok.trusted and ok.message == ""
    assert ok.predicted_val_logloss >= measured[OBJECTIVE].min() - 0.01


def test_report_and_export_refuse_an_extrapolated_size(tmp_path) -> None:
    from analysis.report import build_report
    from analysis.runs import AnalysisError

    trials, history = _law_search((1e3, 3e3, 1e4, 1e5))
    runs = runs_from_frames(trials, history, "law")
    report = build_report(runs, tmp_path / "rep", budget_flops=1.5e12, n_boot=0)
    rec = report.summary["recommendation"]["compute_optimal"]
    assert rec["status"] == "extrapolated"
    page = report.html.read_text()
    assert "extrapolated: For a budget of 1.5e+12 training FLOPs" in page
    with pytest.raises(AnalysisError, match="cannot size for budget_flops=1.5e\\+12: "
                                            "extrapolated: .*never measured"):
        export_config(runs, tmp_path / "sized.yaml", budget_flops=1.5e12)
    assert not (tmp_path / "sized.yaml").exists()


def test_export_cli_refuses_an_extrapolated_budget_in_one_line(tmp_path, capsys) -> None:
    """`recscale export NAME --budget-flops C` on a size outside the measurements: exit
    2, one line, no file written."""
    import json

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from recscale.cli import main
    from trainers.contracts import KIND_SEARCH, KIND_TRIAL, TAG_CONFIG, TAG_KIND, TAG_PARENT

    trials, history = _law_search((1e3, 3e3, 1e4, 1e5))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("law", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp_id, tags={TAG_KIND: KIND_SEARCH,
                                             TAG_CONFIG: json.dumps({"budget_flops": 1e12})})
    cfg = experiment_from_flat(trials.loc[0, "config"])
    for run_key, points in history.groupby("run_id"):
        run = client.create_run(exp_id, tags={
            TAG_KIND: KIND_TRIAL, TAG_PARENT: parent.info.run_id, "trial_id": str(run_key),
            "block": "wukong", "trial_status": "COMPLETED", TAG_CONFIG: json.dumps(cfg.to_dict())})
        n = float(points["flops_per_example"].iloc[0])
        metrics = [Metric("flops_per_example", n, 0, 0)]
        for _, p in points.iterrows():
            step = int(p["step"])
            metrics += [Metric(k, float(p[k]), 0, step)
                        for k in (OBJECTIVE, "examples_seen", VAL_SE)]
            metrics.append(Metric("train_flops", float(p["step"]), 0, step))
        client.log_batch(run.info.run_id, metrics=metrics)
    out = tmp_path / "sized.yaml"
    capsys.readouterr()  # MLflow's own set-up lines while the store was written
    code = main(["export", "law", "--tracking-uri", uri, "--budget-flops", "1.5e12", "-o", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("recscale: error: cannot size for budget_flops=1.5e+12: extrapolated")
    assert not out.exists()
