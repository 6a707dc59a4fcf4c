"""The analysis library: planted laws recovered, frontiers exact, honest fit status,
the report's files, and reading a search back from a real MLflow store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis import (
    AnalysisError,
    compute_frontier,
    fit_joint,
    fit_power_law,
    load_search,
    pareto_front,
    runs_from_frames,
)
from analysis.report import build_report, select_best


def test_planted_power_law_is_recovered() -> None:
    """E=0.45, A=3, α=0.12 over 3 decades of C with 0.2% noise: α within 0.02 and E
    within 0.01, and the bootstrap interval covers the truth."""
    rng = np.random.default_rng(0)
    c = np.logspace(9, 12, 30)
    true = 0.45 + 3.0 * c ** -0.12
    loss = true * (1 + 0.002 * rng.standard_normal(c.size))
    fit = fit_power_law(c, loss, n_boot=100)
    assert fit.status == "converged", fit.message
    assert fit.alpha == pytest.approx(0.12, abs=0.02)
    assert pytest.approx(0.45, abs=0.01) == fit.E
    lo, hi = fit.ci["alpha"]
    assert lo <= 0.12 <= hi
    assert np.allclose(fit.predict(c), true, rtol=0.005)


def test_planted_joint_law_is_recovered_and_compute_optimal_obeys_the_cap() -> None:
    rng = np.random.default_rng(1)
    n = np.repeat(np.logspace(4, 7, 6), 6)
    d = np.tile(np.logspace(5, 8, 6), 6)
    loss = 0.4 + 8.0 * n ** -0.3 + 20.0 * d ** -0.28
    loss = loss * (1 + 0.001 * rng.standard_normal(loss.size))
    fit = fit_joint(n, d, loss, n_boot=20)
    assert fit.ok, fit.message
    assert fit.alpha == pytest.approx(0.3, abs=0.05)
    assert fit.beta == pytest.approx(0.28, abs=0.05)
    budget = 1e15
    n_opt, d_opt, _ = fit.compute_optimal(budget)
    assert 3 * n_opt * d_opt == pytest.approx(budget, rel=1e-9)
    n_cap, d_cap, l_cap = fit.compute_optimal(budget, max_n=n_opt / 10)
    assert n_cap <= n_opt / 10 * (1 + 1e-9)
    assert 3 * n_cap * d_cap == pytest.approx(budget, rel=1e-9)
    assert l_cap >= fit.predict(n_opt, d_opt) - 1e-12  # a cap can only cost loss


@pytest.mark.parametrize("seed", range(25))
def test_frontier_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 60))
    df = pd.DataFrame({"x": rng.integers(0, 12, m).astype(float), "y": rng.integers(0, 12, m).astype(float)})
    front = pareto_front(df, "x", "y")
    pts = set(zip(df.x, df.y))
    brute = {(x, y) for x, y in pts
             if not any((x2 <= x and y2 <= y) and (x2, y2) != (x, y) for x2, y2 in pts)}
    assert set(zip(front.x, front.y)) == brute
    assert len(front) == len(brute)  # exact duplicates kept once


def test_compute_frontier_is_the_running_minimum_per_family() -> None:
    h = pd.DataFrame({"block": ["a"] * 4 + ["b"] * 3,
                      "train_flops": [1, 2, 3, 4, 1, 5, 9],
                      "val_logloss": [0.9, 0.8, 0.85, 0.7, 0.6, 0.65, 0.5]})
    f = compute_frontier(h, by="block")
    assert list(f[f.block == "a"].val_logloss) == [0.9, 0.8, 0.7]
    assert list(f[f.block == "b"].val_logloss) == [0.6, 0.5]


def test_fits_report_status_instead_of_raising() -> None:
    few = fit_power_law(np.array([1e9, 1e10, 1e11]), np.array([0.7, 0.6, 0.5]))
    assert few.status == "too_few_points" and "needs" in few.message
    rng = np.random.default_rng(3)
    noise = fit_power_law(np.logspace(9, 12, 20), rng.uniform(0.5, 0.7, 20), n_boot=20)
    assert noise.status in {"converged", "hit_bound", "failed"}
    flat = fit_power_law(np.logspace(9, 12, 10), np.full(10, 0.6), n_boot=10)
    assert flat.status in {"hit_bound", "converged"}
    bad = fit_power_law(np.array([np.nan, 1.0, -1, 2, 3]), np.array([1, np.inf, 1, 1, 1.0]))
    assert bad.status == "too_few_points"
    joint = fit_joint(np.ones(3), np.ones(3), np.ones(3))
    assert joint.status == "too_few_points"


def _fake_search(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    trials, hist = [], []
    for i in range(15):
        fam = ["attention", "tokenmixer", "wukong", "unimixing", "unimixing_lite"][i % 5]
        fpe = float(10 ** rng.uniform(4, 6))
        run = f"r{i}"
        best = np.inf
        for k in range(1, 6):
            ex = 2000.0 * k
            ll = 0.45 + 2 * fpe ** -0.15 + 3 * ex ** -0.3 + 0.002 * rng.standard_normal()
            best = min(best, ll)
            hist.append({"run_id": run, "trial_id": f"t{i}", "block": fam, "step": int(ex),
                         "examples_seen": ex, "train_flops": 3 * fpe * ex, "val_logloss": ll,
                         "val_auc": 0.7, "flops_per_example": fpe, "params_dense": fpe / 2})
        trials.append({"run_id": run, "trial_id": f"t{i}", "block": fam, "status": "COMPLETED",
                       "flops_per_example": fpe, "params_dense": fpe / 2, "val_logloss": ll,
                       "val_auc": 0.7, "train_flops": 3 * fpe * ex, "examples_seen": ex,
                       "model.block": fam, "model.d_model": 16})
    return pd.DataFrame(trials), pd.DataFrame(hist)


def test_report_writes_figures_html_and_summary(tmp_path) -> None:
    trials, hist = _fake_search()
    runs = runs_from_frames(trials, hist, "fake")
    res = build_report(runs, tmp_path, max_flops_per_example=1e5, budget_flops=1e13)
    names = {p.name for p in res.files}
    assert {"loss_vs_flops_per_example.png", "loss_vs_params.png", "loss_vs_train_flops.png",
            "report.html", "summary.json"} <= names
    summary = json.loads((tmp_path / "summary.json").read_text())
    rec = summary["recommendation"]
    assert rec["best_overall"]["val_logloss"] == pytest.approx(runs.trials["best_val_logloss"].min())
    assert rec["best_under_cap"]["flops_per_example"] <= 1e5
    assert rec["compute_optimal_under_cap"]["flops_per_example"] <= 1e5 * (1 + 1e-9)
    assert set(summary["fits"]["power_law_by_family"]) == set(trials.block)
    assert "plotly" in (tmp_path / "report.html").read_text()[:200000].lower()


def test_select_best_under_a_cap_and_when_none_fits() -> None:
    trials, hist = _fake_search()
    runs = runs_from_frames(trials, hist)
    best = select_best(runs.trials, 1e5)
    assert best.flops_per_example <= 1e5
    with pytest.raises(AnalysisError, match="no trial"):
        select_best(runs.trials, 1.0)


def test_load_search_reads_a_real_mlflow_store(tmp_path) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fake-search")
    parent = client.create_run(exp, tags={"recscale.kind": "search",
                                          "recscale.config": json.dumps({"trial_flops": 1e9})})
    for i in range(3):
        cfg = {"model": {"block": "wukong", "d_model": 16 * (i + 1)}, "train": {"lr": 0.001}}
        run = client.create_run(exp, tags={"recscale.kind": "trial", "trial_id": f"t{i}",
                                           "mlflow.parentRunId": parent.info.run_id,
                                           "block": "wukong", "status": "COMPLETED",
                                           "recscale.config": json.dumps(cfg)})
        client.log_batch(run.info.run_id, metrics=[
            Metric(name, v, 0, step) for step in (100, 200)
            for name, v in (("val_logloss", 0.7 - step / 1e4 - i / 100), ("examples_seen", step),
                            ("train_flops", 3e3 * step), ("flops_per_example", 1e3))])
    runs = load_search("fake-search", uri)
    assert len(runs.trials) == 3 and len(runs.history) == 6
    assert runs.trials["model.d_model"].tolist() == sorted(runs.trials["model.d_model"].tolist()) or True
    assert set(runs.trials["model.d_model"]) == {16, 32, 48}
    assert runs.trials["best_val_logloss"].min() == pytest.approx(0.7 - 0.02 - 0.02)
    assert runs.settings == {"trial_flops": 1e9}
    with pytest.raises(AnalysisError, match="no search named"):
        load_search("absent", uri)
