"""The analysis library: planted laws recovered, frontiers exact, honest fit status,
the report's files, and reading a search back from a real MLflow store.

Tolerances stated here are the contract of the fits:

* ``L(C) = E + A·C^(−α)``, 40 points over 4 decades, 0.2% multiplicative noise, 10
  seeds: ``|α − 0.12| <= 0.02``, ``|E − 0.45| <= 0.02``, the 95% interval of α covers
  the truth in >= 7 of 10 seeds (8 today); without noise: α and E within 1e-5.
* ``L(N, D) = E + A·N^(−α) + B·D^(−β)``, a 6×6 grid over 3 decades each, 0.1% noise, 5
  seeds: ``|α − 0.30| <= 0.01``, ``|β − 0.28| <= 0.01``, ``|E − 0.40| <= 0.01``;
  without noise: exponents within 1e-4.
* compute-optimal sizes: ``3·N*·D* = C`` to 1e-9, ``N*`` equals the closed form
  ``(αA(C/3)^β / (βB))^(1/(α+β))`` clipped to the cap, to 1e-6.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import least_squares

from analysis import (
    AnalysisError,
    compute_frontier,
    fit_joint,
    fit_power_law,
    load_search,
    pareto_front,
    runs_from_frames,
)
from analysis.export import export_config
from analysis.report import (
    ReportResult,
    build_report,
    log_report_to_mlflow,
    recommend_size,
    select_best,
)
from trainers.contracts import (
    CONFIG_ARTIFACT,
    KIND_SEARCH,
    KIND_TRIAL,
    SEARCH_ARTIFACT,
    TAG_CONFIG,
    TAG_KIND,
    TAG_PARENT,
    TAG_STATUS,
)
from trainers.experiment import experiment_from_flat, load_experiment

FAMILIES = ["attention", "tokenmixer", "wukong", "unimixing", "unimixing_lite"]

# ---- power law ------------------------------------------------------------------------


def _planted_power(seed: int, noise: float = 0.002) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = np.logspace(8, 12, 40)
    loss = (0.45 + 3.0 * c**-0.12) * (1 + noise * rng.standard_normal(c.size))
    return c, loss


def test_planted_power_law_is_recovered_within_tolerance() -> None:
    covered = 0
    for seed in range(10):
        c, loss = _planted_power(seed)
        fit = fit_power_law(c, loss, n_boot=60, seed=seed)
        assert fit.status == "converged", fit.message
        assert fit.alpha == pytest.approx(0.12, abs=0.02)
        assert abs(fit.E - 0.45) <= 0.02
        lo, hi = fit.ci["alpha"]
        covered += lo <= 0.12 <= hi
        assert fit.ci["E"][0] <= fit.E <= fit.ci["E"][1]
    assert covered >= 7  # nominal 95%; percentile intervals under-cover a little at m=40


def test_noise_free_power_law_is_exact_and_predicts() -> None:
    c = np.logspace(8, 12, 40)
    truth = 0.45 + 3.0 * c**-0.12
    fit = fit_power_law(c, truth, n_boot=0)
    assert fit.status == "converged" and fit.ci == {} and fit.n_boot == 0
    assert fit.alpha == pytest.approx(0.12, abs=1e-5)
    assert abs(fit.E - 0.45) <= 1e-5
    assert abs(fit.A / 3.0 - 1) <= 1e-3
    assert np.allclose(fit.predict(c), truth, rtol=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_power_fit_is_the_constrained_least_squares_optimum(seed: int) -> None:
    """Never worse than scipy's least_squares started at the truth, on the same bounds
    (0 <= E <= min L, A >= 0, 1e-3 <= α <= 2): the grid + exact projection is global."""
    rng = np.random.default_rng(100 + seed)
    e, a, alpha = rng.uniform(0.2, 0.6), rng.uniform(0.5, 20), rng.uniform(0.05, 0.8)
    c = np.sort(10 ** rng.uniform(6, 11, 25))
    loss = e + a * c**-alpha + 0.003 * rng.standard_normal(c.size)
    fit = fit_power_law(c, loss, n_boot=0)
    ours = float(np.sum((fit.predict(c) - loss) ** 2))
    ref = float(np.exp(np.mean(np.log(c))))

    def resid(p: np.ndarray) -> np.ndarray:
        return p[0] + p[1] * (c / ref) ** -p[2] - loss

    x0 = np.clip([min(e, loss.min()), a * ref**-alpha, alpha], [0, 0, 1e-3],
                 [loss.min(), np.inf, 2.0])
    theirs = least_squares(resid, x0, bounds=([0, 0, 1e-3], [loss.min(), np.inf, 2.0]))
    assert ours <= 2 * theirs.cost * (1 + 1e-6) + 1e-14


# ---- joint law and compute-optimal sizes ------------------------------------------------


def _planted_joint(seed: int, noise: float = 0.001) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    n = np.repeat(np.logspace(4, 7, 6), 6)
    d = np.tile(np.logspace(5, 8, 6), 6)
    loss = (0.4 + 8.0 * n**-0.3 + 20.0 * d**-0.28) * (1 + noise * rng.standard_normal(n.size))
    return n, d, loss


def test_planted_joint_law_is_recovered_within_tolerance() -> None:
    for seed in range(5):
        fit = fit_joint(*_planted_joint(seed), n_boot=30, seed=seed)
        assert fit.status == "converged", fit.message
        assert fit.alpha == pytest.approx(0.30, abs=0.01)
        assert fit.beta == pytest.approx(0.28, abs=0.01)
        assert abs(fit.E - 0.40) <= 0.01
        assert set(fit.ci) == {"E", "A", "alpha", "B", "beta"}
    exact = fit_joint(*_planted_joint(0, noise=0.0), n_boot=0)
    assert exact.alpha == pytest.approx(0.30, abs=1e-4)
    assert exact.beta == pytest.approx(0.28, abs=1e-4)


def test_joint_bootstrap_by_groups_resamples_whole_trials() -> None:
    n, d, loss = _planted_joint(1, noise=0.003)
    groups = np.repeat(np.arange(6), 6)  # one "trial" per model size
    fit = fit_joint(n, d, loss, n_boot=30, groups=groups)
    assert fit.ok and fit.n_boot > 0
    assert fit.ci["alpha"][0] <= fit.alpha <= fit.ci["alpha"][1]


def _closed_form_n(fit: object, budget: float) -> float:
    e, a, alpha, b, beta = (getattr(fit, k) for k in ("E", "A", "alpha", "B", "beta"))
    del e
    return float((alpha * a * (budget / 3) ** beta / (beta * b)) ** (1 / (alpha + beta)))


@pytest.mark.parametrize("budget", [1e13, 1e15, 1e17])
def test_compute_optimal_obeys_the_budget_identity_and_the_cap(budget: float) -> None:
    fit = fit_joint(*_planted_joint(1), n_boot=0)
    n_opt, d_opt, l_opt = fit.compute_optimal(budget)
    assert 3 * n_opt * d_opt == pytest.approx(budget, rel=1e-9)
    assert n_opt == pytest.approx(_closed_form_n(fit, budget), rel=1e-6)
    assert l_opt == pytest.approx(float(fit.predict(n_opt, d_opt)), rel=1e-12)
    for factor in (0.5, 0.1, 0.01):
        cap = n_opt * factor
        n_cap, d_cap, l_cap = fit.compute_optimal(budget, max_n=cap)
        assert n_cap <= cap * (1 + 1e-12)
        assert n_cap == pytest.approx(cap, rel=1e-6)  # convex in log N: the cap binds
        assert 3 * n_cap * d_cap == pytest.approx(budget, rel=1e-9)
        assert l_cap >= l_opt - 1e-12  # a cap can only cost loss
    n_loose, _, _ = fit.compute_optimal(budget, max_n=n_opt * 100)  # a cap that does not bind
    assert n_loose == pytest.approx(n_opt, rel=1e-6)


def test_compute_optimal_refuses_what_cannot_be_sized() -> None:
    fit = fit_joint(*_planted_joint(1), n_boot=0)
    with pytest.raises(AnalysisError, match="no model size fits"):
        fit.compute_optimal(1e15, max_n=0.5)
    with pytest.raises(AnalysisError, match="budget_flops must be > 0"):
        fit.compute_optimal(0.0)
    bad = fit_joint(np.ones(3), np.ones(3), np.ones(3))
    with pytest.raises(AnalysisError, match="too_few_points"):
        bad.compute_optimal(1e15)


def test_recommend_size_limits_extrapolation_and_reports_intervals() -> None:
    n, d, loss = _planted_joint(2)
    fit = fit_joint(n, d, loss, n_boot=30)
    hist = pd.DataFrame({"flops_per_example": n})
    free = recommend_size(fit, hist, 1e20)  # a huge budget wants a huge model
    assert free.flops_per_example <= 10 * n.max() * (1 + 1e-9)
    assert free.limited_by is not None and "extrapolation" in free.limited_by
    capped = recommend_size(fit, hist, 1e15, max_flops_per_example=1e5)
    assert capped.flops_per_example <= 1e5 * (1 + 1e-9) and capped.limited_by == "serving cap"
    assert capped.as_dict()["training_flops_check"] == pytest.approx(1e15, rel=1e-9)
    lo, hi = capped.ci["N"]
    assert lo <= capped.flops_per_example * (1 + 1e-9) and hi <= 1e5 * (1 + 1e-9)


def test_a_joint_fit_at_a_bound_recommends_no_size() -> None:
    """The same parameters, once converged and once flagged at a bound (E pinned at 0):
    only the converged law sizes a model; the other says why, and export refuses it."""
    from dataclasses import replace as dc_replace

    n, d, loss = _planted_joint(2)
    fit = fit_joint(n, d, loss, n_boot=0)
    assert fit.status == "converged"
    hist = pd.DataFrame({"flops_per_example": n, "examples_seen": d, "val_logloss": loss})
    budget = float(np.median(3 * n * d))
    assert recommend_size(fit, hist, budget).status == "ok"
    at_bound = dc_replace(fit, status="hit_bound", message="optimum at a bound (E=0)")
    rec = recommend_size(at_bound, hist, budget)
    assert rec.status == "extrapolated" and "did not converge" in rec.message
    assert "E=0" in rec.message and not rec.trusted


# ---- honest statuses ------------------------------------------------------------------


def test_too_few_points_is_a_status_with_a_clear_message() -> None:
    few = fit_power_law([1e9, 1e10, 1e11], [0.7, 0.6, 0.5])
    assert few.status == "too_few_points" and ">= 4 points" in few.message
    assert not few.ok and math.isnan(few.alpha)
    two_c = fit_power_law([1e9, 1e9, 1e10, 1e10], [0.7, 0.69, 0.6, 0.61])
    assert two_c.status == "too_few_points" and "3 distinct C" in two_c.message
    dirty = fit_power_law([np.nan, 1.0, -1, 2, 3, 0], [1, np.inf, 1, 1, 1.0, 1])
    assert dirty.status == "too_few_points" and dirty.n_points == 2
    joint = fit_joint(np.arange(1, 6), np.arange(1, 6), np.linspace(1, 0.5, 5))
    assert joint.status == "too_few_points" and ">= 6 points" in joint.message
    one_size = fit_joint(np.full(8, 1e5), np.logspace(4, 6, 8), np.linspace(0.7, 0.5, 8))
    assert one_size.status == "too_few_points" and "distinct N" in one_size.message


@pytest.mark.parametrize("seed", range(5))
def test_noise_and_constant_data_fail_honestly_without_raising(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = np.logspace(9, 12, 20)
    noise = fit_power_law(c, rng.uniform(0.5, 0.7, 20), n_boot=20)
    assert noise.status in {"failed", "hit_bound"}, noise.message
    assert noise.message
    flat = fit_power_law(c, np.full(20, 0.6), n_boot=10)
    assert flat.status == "failed" and "constant" in flat.message
    jn = fit_joint(10 ** rng.uniform(4, 6, 30), 10 ** rng.uniform(4, 6, 30),
                   rng.uniform(0.5, 0.7, 30), n_boot=10)
    assert jn.status in {"failed", "hit_bound"}, jn.message


def test_a_parameter_at_its_bound_is_reported() -> None:
    c = np.logspace(8, 12, 30)
    below = fit_power_law(c, -0.1 + 1.0 * c**-0.05, n_boot=0)  # wants E = -0.1 < 0
    assert below.status == "hit_bound" and "E=0" in below.message and below.ok
    steep = fit_power_law(c, 0.3 + 1e30 * c**-3.0, n_boot=0)  # wants α = 3 > 2
    assert steep.status == "hit_bound" and "alpha=2" in steep.message
    rising = fit_power_law(c, 0.3 + 0.01 * np.log(c), n_boot=0)  # wants A < 0
    assert rising.status in {"hit_bound", "failed"} and rising.A >= 0


# ---- frontiers --------------------------------------------------------------------------


def _brute_front(xs: np.ndarray, ys: np.ndarray) -> set[tuple[float, float]]:
    pts = set(zip(xs.tolist(), ys.tolist()))
    return {(x, y) for x, y in pts
            if not any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in pts)}


@pytest.mark.parametrize("seed", range(60))
def test_pareto_front_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 80))
    if seed % 2:  # integers: many ties and exact duplicates
        x, y = rng.integers(0, 10, m).astype(float), rng.integers(0, 10, m).astype(float)
    else:
        x, y = rng.lognormal(size=m), rng.uniform(size=m)
    df = pd.DataFrame({"x": x, "y": y, "g": rng.integers(0, 3, m)})
    df.loc[df.sample(frac=0.1, random_state=seed).index, "y"] = np.nan  # ignored
    clean = df.dropna()
    front = pareto_front(df, "x", "y")
    assert set(zip(front.x, front.y)) == _brute_front(clean.x.to_numpy(), clean.y.to_numpy())
    assert len(front) == len(set(zip(front.x, front.y)))  # duplicates kept once
    assert front.x.is_monotonic_increasing and (np.diff(front.y) < 0).all()
    by = pareto_front(df, "x", "y", by="g")
    for g, part in clean.groupby("g"):
        got = by[by.g == g]
        assert set(zip(got.x, got.y)) == _brute_front(part.x.to_numpy(), part.y.to_numpy())


@pytest.mark.parametrize("seed", range(20))
def test_compute_frontier_is_the_lower_envelope(seed: int) -> None:
    """At every compute C, the frontier's step value is the best loss at compute <= C."""
    rng = np.random.default_rng(seed)
    h = pd.DataFrame({"block": rng.choice(["a", "b"], 50),
                      "train_flops": np.round(10 ** rng.uniform(9, 12, 50), -8),
                      "val_logloss": rng.uniform(0.4, 0.7, 50)})
    f = compute_frontier(h)
    for c in np.concatenate([h.train_flops.unique(), [1e13]]):
        best = h.loc[h.train_flops <= c, "val_logloss"].min()
        step = f.loc[f.train_flops <= c, "val_logloss"]
        assert (step.iloc[-1] if len(step) else np.nan) == pytest.approx(best, nan_ok=True)
    per = compute_frontier(h, by="block")
    assert set(per.block) == set(h.block)


def test_frontier_names_missing_columns() -> None:
    with pytest.raises(AnalysisError, match="lacks column"):
        pareto_front(pd.DataFrame({"x": [1.0]}), "x", "y")


# ---- synthetic search, selection, report ------------------------------------------------


def _fake_search(seed: int = 0, n_trials: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials of five families whose reports follow 0.42 + 2·N^−0.15 + 3·D^−0.3 (plus a
    small offset per family and 0.1% noise)."""
    rng = np.random.default_rng(seed)
    trials, hist = [], []
    for i in range(n_trials):
        fam = FAMILIES[i % 5]
        fpe = float(10 ** rng.uniform(4, 6))
        run, best = f"r{i}", math.inf
        for k in range(1, 7):
            ex = 2000.0 * 2**k
            ll = 0.42 + 0.004 * (i % 5) + 2 * fpe**-0.15 + 3 * ex**-0.3
            ll += 0.001 * rng.standard_normal()
            best = min(best, ll)
            hist.append({"run_id": run, "trial_id": f"t{i}", "block": fam,
                         "step": int(3 * fpe * ex),
                         "examples_seen": ex, "train_flops": 3 * fpe * ex, "val_logloss": ll,
                         "val_auc": 0.75, "flops_per_example": fpe, "params_dense": fpe / 2})
        trials.append({"run_id": run, "trial_id": f"t{i}", "block": fam,
                       "status": "DIVERGED" if i == 7 else "TERMINATED",
                       "flops_per_example": fpe, "params_dense": fpe / 2, "val_logloss": ll,
                       "val_auc": 0.75, "train_flops": 3 * fpe * ex, "examples_seen": ex,
                       "model.block": fam, "model.d_model": 16 + i, "train.lr": 1e-3})
    return pd.DataFrame(trials), pd.DataFrame(hist)


def test_runs_from_frames_derives_what_the_contract_implies() -> None:
    trials, hist = _fake_search(n_trials=3)
    runs = runs_from_frames(trials, hist.drop(columns=["train_flops", "block"]), "x")
    assert runs.history["train_flops"].tolist() == pytest.approx(
        (3 * hist["flops_per_example"] * hist["examples_seen"]).tolist())
    assert runs.history["block"].tolist() == hist["block"].tolist()
    assert runs.history["step"].tolist() == hist["step"].tolist()  # step = train_flops
    # a trial's result is its last report, every metric of it: plant a last report that
    # is worse than an earlier one, with its own AUC, and a stale value in the trial row
    planted = hist.copy()
    last_r0 = planted.index[planted.run_id == "r0"][-1]
    planted.loc[last_r0, ["val_logloss", "val_auc"]] = [0.9, 0.61]
    stale = trials.copy()
    stale.loc[0, ["val_logloss", "val_auc"]] = [0.1, 0.99]
    t = runs_from_frames(stale, planted).trials.set_index("run_id")
    assert (t.loc["r0", "val_logloss"], t.loc["r0", "val_auc"]) == (0.9, 0.61)
    assert t.loc["r0", "result_step"] == planted.loc[last_r0, "step"]
    assert t.loc["r0", "train_flops"] == planted.loc[last_r0, "train_flops"]
    last = hist.groupby("run_id").tail(1).set_index("run_id")
    assert runs.trials.set_index("run_id")["val_logloss"].to_dict() == last["val_logloss"].to_dict()
    bare = runs_from_frames(trials.drop(columns=["flops_per_example", "status"]),
                            hist.drop(columns=["val_auc"]))
    assert bare.trials["flops_per_example"].tolist() == trials["flops_per_example"].tolist()
    assert bare.history["val_auc"].isna().all() and bare.trials["status"].isna().all()
    empty = runs_from_frames(trials, pd.DataFrame())
    assert empty.history.empty and empty.trials["result_step"].isna().all()
    assert empty.trials["val_logloss"].tolist() == trials["val_logloss"].tolist()
    with pytest.raises(AnalysisError, match="no trials"):
        runs_from_frames(trials.iloc[:0], hist)
    with pytest.raises(AnalysisError, match="lacks"):
        runs_from_frames(trials.drop(columns=["block"]), hist)


def test_select_best_under_a_cap_skips_failed_trials_and_explains_none() -> None:
    trials, hist = _fake_search()
    runs = runs_from_frames(trials, hist)
    t = runs.trials
    ok = t[t.status != "DIVERGED"]
    assert select_best(t).run_id == ok.loc[ok.val_logloss.idxmin(), "run_id"]
    best = select_best(t, 1e5)
    assert best.flops_per_example <= 1e5 and best.status != "DIVERGED"
    under = ok[ok.flops_per_example <= 1e5]
    assert best.val_logloss == under.val_logloss.min()
    t2 = t.copy()
    t2.loc[t2.run_id == "r7", "val_logloss"] = 0.0  # diverged trials are never chosen
    assert select_best(t2).run_id != "r7"
    with pytest.raises(AnalysisError, match=r"no trial .* under max_flops_per_example=1"):
        select_best(t, 1.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    trials, hist = _fake_search()
    runs = runs_from_frames(trials, hist, "fake", settings={"budget_flops": 2e12,
                                                            "trial_flops": 4e11},
                            experiment_id="7")
    return build_report(runs, tmp_path_factory.mktemp("report"), max_flops_per_example=1e5,
                        budget_flops=1e13, n_boot=40)


def test_report_writes_figures_html_and_json(report: ReportResult) -> None:
    names = {p.name for p in report.files}
    assert names == {"loss_vs_flops_per_example.png", "loss_vs_params.png",
                     "loss_vs_train_flops.png", "joint_fit.png", "report.html", "summary.json",
                     "plotly.min.js"}
    for p in report.files:
        assert p.exists() and p.stat().st_size > 1000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report.out_dir / "report.html").read_text()
    # plotly.js once, beside the page, from the Python package (offline); PNGs by name
    assert "Plotly.newPlot" in page and len(page.encode()) < 300_000
    assert page.count("<script src='plotly.min.js'></script>") == 1 and "base64" not in page
    assert (report.out_dir / "plotly.min.js").stat().st_size > 1_000_000
    assert '<script src="http' not in page and "<script src='http" not in page  # offline
    assert "src='joint_fit.png'" in page
    assert "fake" in page and "Compute-optimal" in page
    # every trial links to its MLflow run; the winner's config and budgets are stated
    for run_id in report.summary["frontier"]["flops_per_example"][0:1]:
        assert f"#/experiments/7/runs/{run_id['run_id']}'" in page
    assert all(f"/#/experiments/7/runs/r{i}'" in page for i in range(20))
    best = report.summary["recommendation"]["best_under_cap"]
    assert f"Winning config: {best['block']} trial {best['trial_id']}" in page
    assert f"&quot;model.d_model&quot;: {best['config']['model.d_model']}" in page
    assert "search budget 2e+12 training FLOPs" in page and "per trial at most 4e+11" in page
    assert "training budget of 1e+13 FLOPs = 5× the search's budget" in page


def test_report_summary_has_the_frontiers_fits_and_recommendation(report: ReportResult) -> None:
    summary = json.loads((report.out_dir / "summary.json").read_text())  # strict JSON
    assert summary == json.loads(json.dumps(report.summary))
    assert {"search", "n_trials", "families", "settings", "frontier", "fits",
            "recommendation", "files"} <= set(summary)
    assert set(summary["frontier"]) == {"flops_per_example", "params_dense", "train_flops",
                                        "train_flops_by_family"}
    losses = [p["val_logloss"] for p in summary["frontier"]["train_flops"]]
    assert losses == sorted(losses, reverse=True)
    fits = summary["fits"]
    assert set(fits["power_law"]["by_family"]) == set(FAMILIES)
    for f in [fits["power_law"]["frontier"], fits["joint"],
              *fits["power_law"]["by_family"].values()]:
        assert f["status"] in {"converged", "hit_bound", "too_few_points", "failed"}
        assert f["message"]
    joint = fits["joint"]
    assert joint["status"] == "converged", joint["message"]
    assert joint["beta"] == pytest.approx(0.3, abs=0.03)  # planted in _fake_search
    assert joint["alpha"] == pytest.approx(0.15, abs=0.05)
    assert set(joint["ci95"]) == {"E", "A", "alpha", "B", "beta"}
    rec = summary["recommendation"]
    assert rec["best_overall"]["status"] != "DIVERGED"
    assert rec["best_overall"]["config"]["model.block"] == rec["best_overall"]["block"]
    assert rec["best_under_cap"]["flops_per_example"] <= 1e5
    for key in ("compute_optimal", "compute_optimal_under_cap"):
        opt = rec[key]
        assert 3 * opt["flops_per_example"] * opt["examples"] == pytest.approx(1e13, rel=1e-9)
    assert rec["compute_optimal_under_cap"]["flops_per_example"] <= 1e5 * (1 + 1e-9)
    assert (rec["compute_optimal_under_cap"]["predicted_val_logloss"]
            >= rec["compute_optimal"]["predicted_val_logloss"] - 1e-12)


def test_validation_noise_states_the_se_beside_the_gaps_asha_cuts_at() -> None:
    from analysis.report import validation_noise

    trials, hist = _fake_search(n_trials=9)
    hist["val_logloss_se"] = 0.004
    settings = {"name": "x", "space": "unified", "budget_flops": 1e12, "trial_flops": 4e10,
                "grace_flops": 4e10 / 9, "reduction_factor": 3, "eval_max_examples": 500}
    noise = validation_noise(runs_from_frames(trials, hist, settings=settings))
    assert noise["se_median"] == noise["se_max"] == 0.004 and noise["eval_examples"] == 500
    assert [r["milestone_flops"] for r in noise["rungs"]] == pytest.approx([4e10 / 9, 4e10 / 3])
    assert all(r["trials"] >= 4 for r in noise["rungs"])
    for rung in noise["rungs"]:
        reached = hist[hist.train_flops >= rung["milestone_flops"]]
        first = reached.sort_values("train_flops").groupby("run_id").head(1)
        losses = sorted(first["val_logloss"])
        assert rung["trials"] == len(losses) and rung["kept"] == max(1, len(losses) // 3)
        assert rung["cut_gap"] == pytest.approx(losses[rung["kept"]] - losses[rung["kept"] - 1])
    assert validation_noise(runs_from_frames(trials, hist))["rungs"] == []  # no settings
    assert all(r["paired_se"] is None for r in noise["rungs"])  # no store: no losses


def test_paired_se_is_the_noise_of_a_difference_on_shared_examples() -> None:
    """Two models that err on the same examples: the SE of their loss difference is the
    SD of the per-example differences / sqrt(n), far below either model's own SE."""
    from analysis.report import _paired_se

    rng = np.random.default_rng(0)
    hard = rng.exponential(0.6, size=4000)  # per-example difficulty both models share
    a = hard + rng.normal(0, 0.05, size=4000)
    b = hard + 0.01 + rng.normal(0, 0.05, size=4000)
    se = _paired_se(a, b)
    assert se == pytest.approx(float(np.std(a - b, ddof=1) / np.sqrt(4000)))
    assert se < 0.2 * float(np.std(a, ddof=1) / np.sqrt(4000))
    assert _paired_se(a, b[:10]) is None


def test_report_on_a_thin_search_records_statuses_instead_of_failing(tmp_path: Path) -> None:
    trials, hist = _fake_search(n_trials=2)
    hist = hist[hist.examples_seen <= 8000]  # two reports per trial
    res = build_report(runs_from_frames(trials, hist, "thin"), tmp_path, budget_flops=1e12,
                       max_flops_per_example=1.0, n_boot=10)
    rec, fits = res.summary["recommendation"], res.summary["fits"]
    assert "error" in rec["best_under_cap"] and "error" in rec["compute_optimal_under_cap"]
    assert fits["power_law"]["by_family"]["attention"]["status"] == "too_few_points"
    assert {p.name for p in res.files} >= {"report.html", "summary.json", "joint_fit.png"}


# ---- MLflow -----------------------------------------------------------------------------


def test_load_search_reads_a_sqlite_store_and_logs_the_report(tmp_path: Path) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("fake-search", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, tags={"recscale.kind": "search"})
    pid = parent.info.run_id
    client.log_dict(pid, {"budget_flops": 1e12}, SEARCH_ARTIFACT)  # as the search does
    client.create_run(exp, tags={"note": "an unrelated run"})
    for i, status in enumerate(["TERMINATED", "STOPPED", "DIVERGED"]):
        run = client.create_run(exp, tags={"recscale.kind": "trial", "trial_id": f"t{i}",
                                           "mlflow.parentRunId": pid, "block": "wukong",
                                           TAG_STATUS: status})
        cfg = experiment_from_flat({"model.block": "wukong", "model.d_model": 16 * (i + 1),
                                    "model.wukong.k": 4, "train.lr": 1e-3})
        client.log_dict(run.info.run_id, cfg.to_dict(), CONFIG_ARTIFACT)  # as tracking does
        steps = (100, 200, 300)
        # params are MLflow's strings, for its UI; analysis never parses them back;
        # metrics at step = train_flops, the per-trial constants once at step 0
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in cfg.flat().items()],
                         metrics=[Metric(name, v, 0, int(3e3 * s)) for s in steps for name, v in (
                             ("val_logloss", 0.7 - s / 1e4 - i / 100), ("examples_seen", s),
                             ("train_flops", 3e3 * s))]
                         + [Metric("flops_per_example", 1e3, 0, 0),
                            Metric("params_dense", 500.0, 0, 0)])
    runs = load_search("fake-search", uri)
    assert runs.parent_run_id == pid and runs.settings == {"budget_flops": 1e12}
    t = runs.trials.set_index("trial_id")
    assert list(t.index) == ["t0", "t1", "t2"] and list(t.status) == ["TERMINATED", "STOPPED",
                                                                       "DIVERGED"]
    assert t["model.d_model"].tolist() == [16, 32, 48]  # the typed config, not the params
    assert t.loc["t0", "train.lr"] == 1e-3 and t.loc["t0", "model.head_hidden"] == [64]
    assert t.loc["t0", "train.max_examples"] is None
    config = t.loc["t1", "config"]
    assert config["model.wukong.k"] == 4 and type(config["model.d_model"]) is int
    assert not any(k.startswith("data.") for k in config)  # the data is the search's
    assert t.loc["t2", "val_logloss"] == pytest.approx(0.7 - 0.03 - 0.02)  # the last report
    assert t.loc["t2", "result_step"] == 9e5 and t.loc["t2", "flops_per_example"] == 1e3
    h = runs.history
    assert len(h) == 9
    assert all(tuple(s) == tuple(3e3 * x for x in steps)
               for s in h.groupby("run_id")["step"].apply(list))
    assert {"train_flops", "examples_seen", "val_logloss", "flops_per_example",
            "params_dense", "block", "trial_id"} <= set(h.columns)
    assert (h["train_flops"] == h["step"]).all() and (h["flops_per_example"] == 1e3).all()

    (tmp_path / "rep").mkdir()
    files = [tmp_path / "rep" / "summary.json", tmp_path / "rep" / "report.html"]
    for f in files:
        f.write_text("{}")
    log_report_to_mlflow(ReportResult(tmp_path / "rep", files, {}), pid, uri)
    logged = {a.path for a in client.list_artifacts(pid, "report")}
    assert logged == {"report/summary.json", "report/report.html"}

    with pytest.raises(AnalysisError, match="no search named 'absent'"):
        load_search("absent", uri)
    client.create_experiment("empty", artifact_location=str(tmp_path / "art2"))
    with pytest.raises(AnalysisError, match="no recscale search run"):
        load_search("empty", uri)
    lonely = client.create_experiment("lonely", artifact_location=str(tmp_path / "art3"))
    client.create_run(lonely, tags={"recscale.kind": "search"})
    with pytest.raises(AnalysisError, match="no trial runs"):
        load_search("lonely", uri)
    with pytest.raises(AnalysisError, match="no MLflow store"):
        load_search("fake-search", f"sqlite:///{tmp_path / 'nowhere.db'}")


def test_summary_configs_keep_their_types(tmp_path: Path) -> None:
    """Trials of several families share config columns, so pandas holds NaN where a
    family lacks a knob and turns the others' ints into floats; the report and export
    read each trial's own typed ``config`` instead."""
    exps = [experiment_from_flat({"model.block": "wukong", "model.wukong.n_fm": 4}),
            experiment_from_flat({"model.block": "tokenmixer", "model.d_model": 32})]
    trials = pd.DataFrame([
        {"run_id": f"r{i}", "trial_id": f"t{i}", "block": e.model.block, "status": "TERMINATED",
         "val_logloss": 0.4 + i / 10, "flops_per_example": 1e3,
         "train_flops": 3e6, "config": {k: v for k, v in e.flat().items()
                                        if k.startswith(("model.", "train."))},
         **e.flat()} for i, e in enumerate(exps)])
    assert trials["model.wukong.n_fm"].dtype == float  # the pandas column lost the type
    hist = pd.DataFrame([{"run_id": f"r{i}", "step": s, "examples_seen": s,
                          "val_logloss": 0.5 + i / 10 - s / 1e4} for i in range(2)
                         for s in (100, 200, 300)])
    runs = runs_from_frames(trials, hist, "typed")
    best = build_report(runs, tmp_path / "rep", n_boot=0).summary["recommendation"]["best_overall"]
    assert best["trial_id"] == "t0" and best["config"] == trials.loc[0, "config"]
    assert type(best["config"]["model.wukong.n_fm"]) is int
    assert not any(k.startswith("model.tokenmixer.") for k in best["config"])
    exported = export_config(runs, tmp_path / "b.yaml")
    assert exported.model == exps[0].model
    assert "n_fm: 4\n" in (tmp_path / "b.yaml").read_text()
    assert load_experiment(tmp_path / "b.yaml").model == exps[0].model


def test_load_search_refuses_a_trial_without_its_typed_config(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("untyped", artifact_location=str(tmp_path / "art"))
    pid = client.create_run(exp, tags={TAG_KIND: KIND_SEARCH}).info.run_id
    client.create_run(exp, tags={TAG_KIND: KIND_TRIAL, TAG_PARENT: pid, TAG_CONFIG: "{not json"})
    with pytest.raises(AnalysisError, match=f"tag {TAG_CONFIG} is not JSON"):
        load_search("untyped", uri)


def test_load_search_reads_a_search_made_before_the_json_artifacts(tmp_path: Path) -> None:
    """Older searches kept the settings and each trial's config in tags."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("older", artifact_location=str(tmp_path / "art"))
    pid = client.create_run(exp, tags={TAG_KIND: KIND_SEARCH,
                                       TAG_CONFIG: json.dumps({"budget_flops": 5e11})}).info.run_id
    cfg = experiment_from_flat({"model.block": "wukong", "model.d_model": 16})
    run = client.create_run(exp, tags={TAG_KIND: KIND_TRIAL, TAG_PARENT: pid, "trial_id": "t0",
                                       "block": "wukong",
                                       TAG_CONFIG: json.dumps(cfg.to_dict())}).info.run_id
    client.log_batch(run, metrics=[Metric("val_logloss", 0.6, 0, 300), Metric("train_flops", 300, 0, 300)])
    runs = load_search("older", uri)
    assert runs.settings == {"budget_flops": 5e11}
    assert runs.trials.loc[0, "model.d_model"] == 16 and runs.trials.loc[0, "val_logloss"] == 0.6
