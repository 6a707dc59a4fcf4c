"""The search on the real stack: local Ray, MLflow in SQLite, synthetic teacher data.

One Ray session (2 CPUs, 2 declared GPUs) is shared by the tests of this module, so GPU
placement is checked on a machine that has none.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from search.resources import gpu_fraction
from search.runner import run_search
from search.settings import ResourceConfig, SearchConfig, asha_milestones
from trainers.data import DataConfig, SyntheticConfig, load_dataset

pytestmark = pytest.mark.slow

DATA = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=6_000, n_cat_fields=6,
                                                              cardinality=20, seed=1))
CAP = 4e5


@pytest.fixture(scope="module")
def ray_session():
    import ray

    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=tmp,
             logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(DATA, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def unified(ray_session, dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unified")
    cfg = SearchConfig(name="unified-test", space="unified", data=DATA, budget_flops=3e10,
                       trial_flops=6e9, grace_flops=6e9 / 9, max_flops_per_example=CAP,
                       eval_max_examples=500, max_concurrent=2, seed=0,
                       resources=ResourceConfig(gpus="on", gpu_full_at_flops=2e5,
                                                gpu_min_fraction=0.25))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    outcome = run_search(cfg, tracking_uri=uri, storage=tmp / "ray", verbose=0, dataset=dataset)
    return cfg, outcome


def test_budget_is_held(unified) -> None:
    cfg, out = unified
    interval = cfg.grace / cfg.reports_per_grace
    assert 0 < out.spent_flops <= cfg.budget_flops + cfg.max_concurrent * interval
    # the reference models (search.references) are trained first and charged too
    assert out.spent_flops == pytest.approx(out.trials["train_flops"].sum()
                                            + out.references["train_flops"].sum())
    # the search ended by itself with less than a grace period left to spend
    assert cfg.budget_flops - out.spent_flops < cfg.grace + cfg.max_concurrent * interval


def test_trial_folders_are_short_and_finished_results_trimmed(unified) -> None:
    """Tune's folder per trial is ``run_trial_<id>`` (``search.monitor.short_trial_dirname``),
    and what Tune saved of a finished trial is its report without Tune's extras, which
    the outcome's table does not need."""
    from ray.tune import ExperimentAnalysis

    cfg, out = unified
    folders = {p.name for p in Path(out.storage_path).iterdir() if p.is_dir()}
    assert {f"run_trial_{t}" for t in out.trials["trial_id"]} <= folders
    finished = [t for t in ExperimentAnalysis(out.storage_path).trials if t.status == "TERMINATED"]
    reported = [t for t in finished if set(t.last_result) - {"trial_id"}]  # some never did
    assert reported
    for trial in reported:
        assert "train_flops" in trial.last_result and "val_logloss" in trial.last_result
    # Tune ends the trials still running when the budget stops the experiment without
    # calling on_trial_complete (ray 2.60 ``_stop_experiment_if_needed``): at most
    # max_concurrent of them keep Tune's extras
    untrimmed = [t for t in reported if "config" in t.last_result or "hostname" in t.last_result]
    assert len(untrimmed) <= cfg.max_concurrent < len(reported)


def test_no_trained_config_over_the_cap(unified) -> None:
    _, out = unified
    assert (out.trials["flops_per_example"] <= CAP).all()
    assert (out.trials["train_flops"] <= 6e9 * (1 + 1e-9)).all()


def test_asha_stops_trials_at_flops_milestones(unified) -> None:
    cfg, out = unified
    rungs = asha_milestones(cfg.grace, cfg.reduction_factor, cfg.trial_budget)
    stopped = out.trials[out.trials["trial_status"] == "stopped"]  # ended early by ASHA/budget
    assert "running" not in set(out.trials["trial_status"])
    assert len(stopped) >= 1, out.trials[["trial_status", "train_flops"]]
    at_a_rung = 0
    for _, row in stopped.iterrows():
        # every point in whole batches: milestones rounded up, report points to the nearest
        batch = int(row["train.batch_size"])
        per_batch = 3 * row["flops_per_example"] * batch
        seen = int(row["examples_seen"])
        rung_points = {batch * math.ceil(m / per_batch) for m in rungs}
        every = batch * max(1, round(cfg.grace / cfg.reports_per_grace / per_batch))
        # ASHA stops a trial at a rung; the global budget stops it at a report point
        assert seen in rung_points or seen % every == 0, row
        at_a_rung += seen in rung_points
    assert at_a_rung >= 1


def test_every_family_is_sampled(unified) -> None:
    _, out = unified
    assert set(out.trials["model.block"]) == {"attention", "tokenmixer", "wukong",
                                              "unimixing", "unimixing_lite", "fm"}


def test_a_trial_that_stops_improving_ends_itself(ray_session, tmp_path) -> None:
    """``trial_patience``: on labels that are pure noise the validation loss soon stops
    falling, and each trial ends ``patience`` evaluations after its lowest one, short
    of its ``trial_flops``, as STOPPED; the FLOPs it leaves go to further trials."""
    noise = DataConfig(name="synthetic", synthetic=SyntheticConfig(
        n_rows=6_000, n_cat_fields=6, cardinality=20, noise=1.0, seed=1))
    patience = 2
    cfg = SearchConfig(name="patience-test", space="tokenmixer", data=noise, budget_flops=3e10,
                       trial_flops=1e10, scheduler="fifo", trial_patience=patience,
                       max_flops_per_example=CAP,
                       eval_max_examples=500, max_concurrent=2, seed=0,
                       resources=ResourceConfig(gpus="off"))
    out = run_search(cfg, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", storage=tmp_path / "ray",
                     verbose=0)
    client = MlflowClient(out.tracking_uri)
    ended_itself = 0
    for _, row in out.trials.iterrows():
        assert row["train_flops"] < cfg.trial_budget, row  # none spent its whole share
        losses = [m.value for m in sorted(client.get_metric_history(row["mlflow_run_id"],
                                                                    "val_logloss"),
                                          key=lambda m: m.step)]
        after_best = len(losses) - 1 - losses.index(min(losses))
        if after_best == patience:  # else the budget's end stopped it (at most 2)
            ended_itself += 1
            assert row["trial_status"] == "stopped"
            assert row["val_logloss"] == losses[-1]  # its result: the last report
    assert ended_itself >= len(out.trials) - cfg.max_concurrent >= 2, out.trials


def test_mlflow_layout(unified) -> None:
    """Issue 12's layout: trials read like trials, the parent carries the search and its
    winner, the experiment opens in MLflow's machine-learning mode."""
    import json

    cfg, out = unified
    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment(out.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.recscale"])
    assert "metrics.`val_logloss`" in view["selectedColumns"]
    runs = client.search_runs([out.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("recscale.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("recscale.kind") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["search.budget_flops"] == str(cfg.budget_flops)
    # the search's numbers carry the search. prefix: no trial metric shares a name
    assert parent.data.metrics and all(k.startswith("search.") for k in parent.data.metrics)
    assert parent.data.metrics["search.spent_flops"] == pytest.approx(out.spent_flops)
    winner = out.winner()
    assert parent.data.tags["recscale.best_run_id"] == winner["mlflow_run_id"]
    assert parent.data.tags["recscale.best_trial_id"] == winner["trial_id"]
    assert parent.data.tags["recscale.best_block"] == winner["model.block"]
    note = parent.data.tags["mlflow.note.content"]
    assert winner["trial_id"] in note and f"{out.spent_flops:.3g} of {cfg.budget_flops:.3g}" in note
    every = pd.concat([out.trials, out.references])  # the references are trial runs too
    assert len(children) == len(every) == len(out.trials) + 2
    assert {r.data.tags["trial_id"] for r in children} == set(every["trial_id"])
    assert set(every["mlflow_run_id"]) == {r.info.run_id for r in children}
    trained = dict(zip(every["trial_id"], every["train_flops"], strict=True))
    for r in children:
        tags, params = r.data.tags, r.data.params
        assert tags["mlflow.parentRunId"] == out.parent_run_id
        assert tags["trial_status"] in {"COMPLETED", "STOPPED", "DIVERGED"}
        assert "status" not in tags and "recscale.config" not in tags  # one status; no 1 kB tag
        assert tags["block"] == params["model.block"]
        assert not any(k.startswith("search.") for k in r.data.metrics)
        # params: this trial's model and training knobs only (its family's section)
        assert not any(k.startswith("data.") for k in params)
        sections = {k.split(".")[1] for k in params if k.count(".") >= 2 and k.startswith("model.")}
        assert sections <= {tags["block"]}, sections
        config = json.loads(Path(client.download_artifacts(r.info.run_id, "config.json",
                                                           tempfile.mkdtemp())).read_text())
        assert config["model"]["block"] == tags["block"] and "data" in config
        hist = client.get_metric_history(r.info.run_id, "val_logloss")
        steps = [m.step for m in hist]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)
        # only a trial the budget stopped before its first report has no metrics
        reported = trained.get(tags["trial_id"], 0) > 0
        assert bool(steps) == reported, tags["trial_id"]
        # step = train_flops; every report after whole batches; constants logged once
        flops = client.get_metric_history(r.info.run_id, "train_flops")
        assert [m.step for m in flops] == [int(m.value) for m in flops] == steps
        batch = int(params["train.batch_size"])
        seen = client.get_metric_history(r.info.run_id, "examples_seen")
        assert all(int(m.value) % batch == 0 for m in seen), [m.value for m in seen]
        if reported:
            for key in ("flops_per_example", "params_dense", "params_embedding"):
                points = client.get_metric_history(r.info.run_id, key)
                assert [m.step for m in points] == [0], key


def test_rerun_of_a_finished_search_reports_the_whole_search(unified, dataset) -> None:
    """Resuming restores Tune's pickled searcher and callbacks: what the outcome and the
    parent run report must come from them (or MLflow), not from objects built afresh."""
    cfg, out = unified
    # what the searcher Tune saved holds (how many draws the cap rejected depends on
    # what TPE sampled: none is possible)
    assert out.rejected_samples == _saved_rejections(Path(out.storage_path))
    assert [n for n, _ in out.driver_rss_mb] == sorted({n for n, _ in out.driver_rss_mb})
    assert len(out.driver_rss_mb) >= 1
    again = run_search(cfg, tracking_uri=out.tracking_uri, storage=Path(out.storage_path).parent,
                       resume="always", verbose=0, dataset=dataset)
    assert again.parent_run_id == out.parent_run_id
    assert again.rejected_samples == out.rejected_samples
    assert again.driver_rss_mb == out.driver_rss_mb  # the same series, nothing logged twice
    assert set(again.trials["trial_id"]) == set(out.trials["trial_id"])
    assert again.spent_flops == pytest.approx(out.spent_flops)
    parent = MlflowClient(out.tracking_uri).get_run(out.parent_run_id)
    assert parent.data.metrics["search.rejected_samples"] == out.rejected_samples
    assert parent.data.metrics["search.wall_seconds"] >= out.wall_seconds


def test_gpu_share_grows_with_flops(unified) -> None:
    cfg, out = unified
    # placement is reported with Tune's results; a trial the budget ended between its
    # MLflow report and Tune's result has its numbers from MLflow and no placement
    t = out.trials[(out.trials["train_flops"] > 0) & out.trials["gpu_share"].notna()]
    assert len(t) >= len(out.trials) - cfg.max_concurrent
    expected = [gpu_fraction(f, cfg.resources) for f in t["flops_per_example"]]
    assert list(t["gpu_share"]) == expected
    assert (t["gpu_ids"] >= 1).all()
    assert t["gpu_share"].nunique() >= 2, t[["flops_per_example", "gpu_share"]]


def test_bad_input_exits_2_with_one_line(tmp_path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("families: [tokenmixer\nmodel: {")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("families: [tokenmixer, hyperformer]\n")
    base = [sys.executable, "-m", "recscale", "search", "--data", "synthetic",
            "--max-rows", "2000", "--name", "bad", "--storage", str(tmp_path / "ray"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    cases = {
        "malformed YAML": [*base, "--space", str(bad_yaml), "--budget-flops", "1e12"],
        "hyperformer": [*base, "--space", str(unknown), "--budget-flops", "1e12"],
        "no config in space": [*base, "--budget-flops", "1e12", "--max-flops-per-example", "10"],
    }
    procs = {needle: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, "RAY_ADDRESS": ""})
             for needle, cmd in cases.items()}  # the three start-ups at once
    for needle, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, (needle, stderr[-2000:])
        assert lines[-1].startswith("recscale: error:") and needle in lines[-1], lines
        assert "Traceback" not in stderr


def _saved_rejections(exp_dir: Path, saved: bool = True) -> int:
    """The rejections in the searcher state Tune saved last (this test's own search wrote
    it: ``OptunaSearch.save`` pickles the searcher's ``__dict__``); 0 when none was
    saved, which only a driver killed early (``saved=False``) may leave."""
    files = sorted(exp_dir.glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime)
    assert files or not saved, f"no searcher state in {exp_dir}"
    if not files:
        return 0
    with files[-1].open("rb") as f:
        return len(pickle.load(f)["rejected"])


def test_analyze_export_then_train_round_trips(unified, tmp_path) -> None:
    """The report of a real search, its exported best config, and `recscale train` on it."""
    from analysis.pipeline import export_best, write_report
    from trainers.experiment import load_experiment
    from trainers.full import load_model, train_full

    cfg, out = unified
    report = write_report(cfg.name, out.tracking_uri, tmp_path / "report",
                          max_flops_per_example=CAP, budget_flops=cfg.budget_flops * 4)
    assert (report / "report.html").exists() and (report / "summary.json").exists()
    client = MlflowClient(out.tracking_uri)
    logged = {a.path for a in client.list_artifacts(out.parent_run_id, "report")}
    assert "report/summary.json" in logged
    path = export_best(cfg.name, out.tracking_uri, tmp_path / "best.yaml", max_flops_per_example=CAP)
    exp = load_experiment(path)
    best = out.trials.loc[out.trials["val_logloss"].idxmin()]
    assert exp.provenance["search"] == cfg.name
    assert exp.provenance["flops_per_example"] <= CAP
    assert exp.model.block in set(out.trials["model.block"])
    assert exp.provenance["val_logloss"] <= best["val_logloss"] + 1e-9
    res = train_full(exp, tmp_path / "train", tracking_uri=out.tracking_uri, progress=False)
    assert res.status == "completed" and 0.5 < res.test["test_auc"] <= 1.0
    model = load_model(res.model_dir)
    assert sum(p.numel() for p in model.parameters()) > 0
    # the sized export agrees with the report: a size inside what the search measured is
    # exported, one outside it (more passes over the data, a loss below any observed) refused
    import json

    from analysis.runs import AnalysisError

    summary = json.loads((report / "summary.json").read_text())
    rec = summary["recommendation"]["compute_optimal_under_cap"]
    if rec.get("status") == "ok":
        sized = export_best(cfg.name, out.tracking_uri, tmp_path / "sized.yaml",
                            max_flops_per_example=CAP, budget_flops=cfg.budget_flops * 4)
        big = load_experiment(sized)
        assert big.provenance["exported_flops_per_example"] <= CAP
        assert "compute_optimal_examples" in big.provenance
    else:
        with pytest.raises(AnalysisError, match="cannot size for budget_flops"):
            export_best(cfg.name, out.tracking_uri, tmp_path / "sized.yaml",
                        max_flops_per_example=CAP, budget_flops=cfg.budget_flops * 4)
