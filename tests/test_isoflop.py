"""isoFLOP fits on planted data: profiles, N*(C), L*(C), the pick and its statuses."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from analysis.isoflop import analyze_study, fit_family, fit_floor, fit_profile, n_star_weights
from analysis.study_report import build_study_report

E, A, ALPHA, B, BETA = 0.45, 0.08, 0.30, 0.10, 0.35
A_TRUE = BETA / (ALPHA + BETA)


def law(n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
    return np.asarray(E + A * (np.asarray(n) / 1e4) ** -ALPHA + B * (np.asarray(d) / 1e5) ** -BETA)


def true_n_star(c: float) -> float:
    # dL/dN = 0 along D = C/3N: α·A·(N/1e4)^-α = β·B·(D/1e5)^-β
    x = np.linspace(0, 25, 200_001)
    n = np.exp(x)
    return float(n[np.argmin(law(n, c / (3 * n)))])


def planted(budgets: list[float], sizes: int = 7, noise: float = 0.002, seed: int = 0,
            families: tuple[str, ...] = ("f",), offset: dict[str, float] | None = None
            ) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for fam in families:
        for c in budgets:
            centre = true_n_star(c) * 1.3
            for n in centre * np.geomspace(1 / 4, 4, sizes) * np.exp(rng.normal(0, 0.05, sizes)):
                d = c / (3 * n)
                loss = float(law(n, d)) + (offset or {}).get(fam, 0.0) + rng.normal(0, noise)
                rows.append({"family": fam, "budget": c, "N": n, "D": d, "loss": loss})
    return pd.DataFrame(rows)


BUDGETS = [1e9 * 4**k for k in range(4)]


def test_profile_recovers_a_planted_parabola() -> None:
    n = np.geomspace(1e3, 1e5, 9)
    loss = 0.5 + 0.01 * np.log(n / 1e4) ** 2
    p = fit_profile("f", 1e10, n, 1e10 / (3 * n), loss + np.random.default_rng(0).normal(0, 1e-4, 9))
    assert p.status == "converged"
    assert p.n_star == pytest.approx(1e4, rel=0.05)
    assert p.l_star == pytest.approx(0.5, abs=2e-4)
    assert p.curvature == pytest.approx(0.01, rel=0.05)
    lo, hi = p.ci["n_star"]
    assert lo < 1e4 < hi and hi / lo < 1.5


def test_profile_statuses() -> None:
    n = np.geomspace(1e3, 1e5, 5)
    edge = fit_profile("f", 1e10, n, n, 0.5 + 0.01 * np.log(n / 3e5) ** 2)
    assert edge.status == "hit_bound" and "largest" in edge.message
    concave = fit_profile("f", 1e10, n, n, 0.5 - 0.01 * np.log(n / 1e4) ** 2)
    assert concave.status == "failed" and not math.isfinite(concave.n_star)
    few = fit_profile("f", 1e10, n[:2], n[:2], [0.5, 0.6])
    assert few.status == "too_few_points"


def test_laws_recover_the_planted_exponent_and_extrapolate() -> None:
    fit = analyze_study(planted(BUDGETS), n_boot=300)
    fam = fit.families["f"]
    assert fam.status == "converged"
    assert abs(fam.a - A_TRUE) / A_TRUE < 0.05
    lo, hi = fam.ci["a"]
    assert lo < A_TRUE < hi
    target = 10 * BUDGETS[-1]
    assert float(fam.n_star(target)) == pytest.approx(true_n_star(target), rel=0.15)
    pred = fam.predict(target)
    assert pred.loss_law == "joint"
    assert abs(pred.loss - float(law(pred.N, pred.D))) < 0.003
    assert pred.loss_ci[0] < float(law(pred.N, pred.D)) < pred.loss_ci[1]
    # off the optimum the predicted loss rises on both sides
    assert fam.predict(target, pred.N / 3).loss > pred.loss < fam.predict(target, pred.N * 3).loss
    assert 0 < fam.b < 0.2 and fam.ci["b"][0] < fam.b < fam.ci["b"][1]
    assert fit.pick.status == "ok" and fit.pick.budget == target


def _edge_study(seed: int) -> list:
    """Profiles on the planted law; at the smallest budget the sizes start just below
    the minimum (0.7×…11× N*) and the runs are 4× noisier, so its N* is poorly pinned
    (bench/RESULTS.md, synthetic_small5: such a profile steepened ``a``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(BUDGETS):
        sizes = true_n_star(c) * (np.geomspace(0.7, 11, 5) if i == 0 else np.geomspace(1 / 4, 4, 5))
        d = c / (3 * sizes)
        noise = 0.004 if i == 0 else 0.001
        out.append(fit_profile("f", c, sizes, d, law(sizes, d) + rng.normal(0, noise, 5),
                               n_boot=200, seed=seed))
    return out


def test_n_star_line_weighs_each_minimum_by_its_certainty() -> None:
    errors_weighted, errors_equal = [], []
    for seed in range(12):
        profiles = [p for p in _edge_study(seed) if p.ok]
        fam = fit_family("f", profiles, n_boot=0)
        lc = np.log([p.budget for p in profiles])
        w = n_star_weights(profiles, lc)
        assert w is not None and len(w) == len(profiles)
        if profiles[0].budget == BUDGETS[0]:  # the edge profile counts least
            assert w[0] == min(w)
        equal_a = np.polyfit(lc, np.log([p.n_star for p in profiles]), 1)[0]
        errors_weighted.append(abs(fam.a - A_TRUE))
        errors_equal.append(abs(equal_a - A_TRUE))
    # weighted: mean |a - a_true| 0.014 against 0.031 with equal weights (12 seeds)
    assert np.mean(errors_weighted) < 0.6 * np.mean(errors_equal)
    assert np.mean(errors_weighted) < 0.05 * A_TRUE


def test_n_star_weights_add_the_scatter_between_budgets() -> None:
    # four tightly pinned minima that scatter far more than their intervals: the
    # between-budget variance dominates and the weights come out nearly equal
    profiles = [p for p in _edge_study(0)[1:]]
    lc = np.log([p.budget for p in profiles])
    tight = n_star_weights(profiles, lc)
    assert tight is not None
    shaken = [replace(p, n_star=p.n_star * f) for p, f in zip(profiles, (1.0, 2.5, 0.4))]
    w = n_star_weights(shaken, lc)
    assert w is not None and max(w) / min(w) < max(tight) / min(tight)
    assert max(w) / min(w) < 1.5
    # too few bootstrap replicates: equal weights
    assert n_star_weights([replace(p, samples=p.samples[:5]) for p in profiles], lc) is None


def test_a_joint_law_at_a_bound_is_not_extrapolated() -> None:
    # no irreducible loss: the joint fit pins E at its bound 0 (hit_bound), a law the
    # data do not determine; predictions come from L*(C), which is exact here (with
    # E = 0 the isoFLOP minima follow a pure power law in C)
    rng = np.random.default_rng(1)
    rows = []
    for c in BUDGETS:
        centre = true_n_star(c)
        for n in centre * np.geomspace(1 / 4, 4, 7):
            d = c / (3 * n)
            loss = float(law(n, d)) - E + rng.normal(0, 0.0005)
            rows.append({"family": "f", "budget": c, "N": n, "D": d, "loss": loss})
    fam = analyze_study(pd.DataFrame(rows), n_boot=100).families["f"]
    assert fam.joint is not None and fam.joint.status != "converged"
    assert not fam.joint_ok
    target = 10 * BUDGETS[-1]
    pred = fam.predict(target)
    assert pred.loss_law == "power"
    assert abs(pred.loss - (float(law(pred.N, pred.D)) - E)) < 0.005


def _floored_profiles(budgets: list[float], e: float, seed: int = 0) -> list:
    """Profiles whose minima follow ``L*(C) = e + 2.2·(C/1e9)^-0.15`` (parabolas in
    ``ln N`` about ``N* = 3·C^0.5``), 0.001 nats of noise."""
    rng = np.random.default_rng(seed)
    out = []
    for c in budgets:
        n_star = 3 * c ** 0.5
        sizes = n_star * np.geomspace(1 / 4, 4, 7)
        loss = (e + 0.22 * (c / 1e9) ** -0.15 + 0.01 * np.log(sizes / n_star) ** 2
                + rng.normal(0, 0.001, 7))
        out.append(fit_profile("f", c, sizes, c / (3 * sizes), loss, n_boot=200, seed=seed))
    return out


def test_the_floored_law_follows_a_floor_the_power_law_misses() -> None:
    budgets = [1e9 * 4**k for k in range(5)]
    fam = fit_family("f", _floored_profiles(budgets, e=0.45), n_boot=200)
    assert fam.floor_status == "converged", fam.floor_message
    assert fam.floor[0] == pytest.approx(0.45, abs=0.01)
    assert fam.ci["E"][0] < 0.45 < fam.ci["E"][1]
    fam = replace(fam, joint=None)  # losses from L*(C), not the joint law
    target = 10 * budgets[-1]
    truth = 0.45 + 0.22 * (target / 1e9) ** -0.15
    pred = fam.predict(target)
    assert pred.loss_law == "floored" and fam.as_dict()["loss_law"] == "floored"
    assert abs(pred.loss - truth) < 0.003
    assert pred.loss_ci[0] < truth < pred.loss_ci[1]
    # the pure power law through the same minima is too optimistic at 10x
    power = math.exp(fam.log_K - fam.b * math.log(target))
    assert truth - power > 0.005
    lo, hi = fam.band(np.array([target]), "l")
    assert lo[0] < truth < hi[0]


def test_a_floor_at_zero_or_too_few_budgets_keeps_the_power_law() -> None:
    budgets = [1e9 * 4**k for k in range(5)]
    lc = np.log(budgets)
    e, b, lk = fit_floor(lc, 0.22 * (np.asarray(budgets) / 1e9) ** -0.15 + 0.45)
    assert e == pytest.approx(0.45, abs=1e-6) and b == pytest.approx(0.15, abs=1e-5)
    # no floor in the minima: E pinned at 0, the pure power law is kept
    fam = replace(fit_family("f", _floored_profiles(budgets, e=0.0), n_boot=50), joint=None)
    assert fam.floor_status == "hit_bound" and "from 0" in fam.floor_message
    assert fam.predict(10 * budgets[-1]).loss_law == "power"
    # three budgets: three parameters and nothing to check them
    fam = replace(fit_family("f", _floored_profiles(budgets[:3], e=0.45), n_boot=50),
                  joint=None)
    assert fam.floor_status == "too_few_points"
    assert fam.predict(10 * budgets[2]).loss_law == "power"


def test_a_pick_below_the_datas_own_floor_is_not_an_answer(tmp_path) -> None:
    pts = planted(BUDGETS)
    target = 10 * BUDGETS[-1]
    fit = analyze_study(pts, target, n_boot=100)
    assert fit.pick.status == "ok" and fit.pick.prediction is not None
    loss = fit.pick.prediction.loss
    # a floor (the data's Bayes loss) above the predicted loss: no model can reach it
    below = analyze_study(pts, target, n_boot=100, floor_loss=loss + 0.01)
    assert below.pick.status == "extrapolated"
    assert "below the data's own floor" in below.pick.message
    last = fit.families["f"].profiles[-1]
    assert f"between the floor and L*={last.l_star:.4f} measured at C={last.budget:.3g}" \
        in below.pick.message
    assert below.as_dict()["data_floor_logloss"] == loss + 0.01
    # under the prediction, the floor changes nothing
    assert analyze_study(pts, target, n_boot=100, floor_loss=loss - 0.01).pick.status == "ok"
    out = build_study_report(None, below, None, tmp_path / "r")
    table = json.loads((out / "summary.json").read_text())["table"]
    assert any(r["quantity"].startswith("the data's own loss floor") for r in table)
    assert any("EXTRAPOLATED" in r["status"] for r in table)


def test_pick_refuses_beyond_what_was_measured() -> None:
    pts = planted(BUDGETS)
    far = analyze_study(pts, target_flops=100 * BUDGETS[-1], n_boot=100)
    assert far.pick.status == "extrapolated" and "100x the largest budget" in far.pick.message
    # repetition: D* at the target needs more passes than any measured point (the
    # smallest sizes, which see the most examples, left out so the study's D stays short)
    pts = pts[pts.groupby("budget")["N"].rank() > 2]
    n_train = int(pts["D"].max() / 2)  # the study measured up to 2 passes
    rep = analyze_study(pts, n_train=n_train, n_boot=100)
    assert rep.families["f"].ok
    assert rep.pick.status == "extrapolated" and "repetition not measured" in rep.pick.message
    assert rep.pick.epochs > 2


def test_repetition_is_judged_at_the_picks_size() -> None:
    # the smallest sizes saw many passes, the pick's size few: passes measured on small
    # models do not cover a large one (MovieLens-1M: 0.076 nats worse than predicted)
    pts = planted(BUDGETS)
    c = BUDGETS[-1]  # two small models trained long at the largest budget
    small = [{"family": "f", "budget": c, "N": n, "D": c / (3 * n),
              "loss": float(law(n, c / (3 * n)))} for n in true_n_star(c) / np.array([8, 16])]
    pts = pd.concat([pts, pd.DataFrame(small)], ignore_index=True)
    fresh = analyze_study(pts, n_boot=100).pick
    assert fresh.status == "ok" and fresh.prediction is not None
    n_train = int(fresh.prediction.D / 2)  # the pick needs 2 passes
    near = pts[pts["N"] >= fresh.prediction.N / 2]
    assert (pts["D"] / n_train).max() > 2.5 and (near["D"] / n_train).max() < 1.8
    rep = analyze_study(pts, n_train=n_train, n_boot=100).pick
    assert rep.status == "extrapolated", rep.message
    assert "at sizes >= N/2" in rep.message and "repetition not measured" in rep.message
    assert rep.epochs == pytest.approx(2, rel=0.01)
    assert rep.max_epochs_measured == pytest.approx((near["D"] / n_train).max())
    # with more rows the same pick needs fewer passes than measured near its size: ok
    ok = analyze_study(pts, n_train=int(fresh.prediction.D), n_boot=100).pick
    assert ok.status == "ok" and ok.epochs == pytest.approx(1, rel=0.01)


def test_serving_cap_and_family_ranking() -> None:
    pts = planted(BUDGETS, families=("good", "worse"), offset={"worse": 0.02})
    fit = analyze_study(pts, n_boot=100)
    assert set(fit.winners.values()) == {"good"}
    assert [r[0] for r in fit.pick.ranking] == ["good", "worse"]
    assert "beyond the intervals" in fit.pick.message
    n_opt = fit.pick.n_star
    capped = analyze_study(pts, max_n=n_opt / 4, n_boot=100)
    assert capped.pick.status == "capped"
    assert capped.pick.prediction is not None
    assert abs(capped.pick.prediction.N / (n_opt / 4) - 1) < 1e-9
    assert capped.pick.prediction.loss > fit.pick.prediction.loss  # type: ignore[union-attr]


def test_no_usable_law_fails_honestly() -> None:
    pts = planted(BUDGETS[:1])
    fit = analyze_study(pts, n_boot=50)
    assert fit.families["f"].status == "too_few_points"
    assert fit.pick.status == "failed" and fit.pick.prediction is None


def test_report_files(tmp_path) -> None:
    fit = analyze_study(planted(BUDGETS, families=("a", "b"), offset={"b": 0.01}), n_boot=100)
    out = build_study_report(None, fit, None, tmp_path)
    for name in ("isoflop.png", "scaling.png", "summary.json", "report.md"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "summary.json").read_text())  # strict JSON: no NaN
    assert data["fit"]["pick"]["family"] == "a"
    assert data["fit"]["families"]["a"]["a"] == pytest.approx(fit.families["a"].a)
    quantities = [r["quantity"] for r in data["table"]]
    assert any("exponent a" in q for q in quantities)
    assert any("passes over the training data" in q for q in quantities)
    assert "| pick at C=6.4e+11: loss (joint law) |" in (out / "report.md").read_text()


def test_runs_that_did_not_learn_are_left_out() -> None:
    pts = planted(BUDGETS)
    pts["val_ne"] = 0.8
    dead = pts.index[pts.groupby("budget")["N"].rank() == 1]  # smallest size per budget
    pts.loc[dead, "loss"] = 0.69
    pts.loc[dead, "val_ne"] = 1.0
    fit = analyze_study(pts, n_boot=100)
    assert len(fit.dead) == 4 and "did not beat the base rate" in fit.pick.message
    clean = analyze_study(pts.drop(index=dead), n_boot=100)
    assert fit.families["f"].a == pytest.approx(clean.families["f"].a)


def test_a_law_on_two_budgets_does_not_outrank_a_checked_one() -> None:
    # "two" measured at 2 budgets only, 0.01 below "good" there: its laws pass through
    # both minima exactly, so it is not ranked against a family checked on 4 budgets
    good = planted(BUDGETS, families=("good",))
    two = planted(BUDGETS[-2:], families=("two",), offset={"two": -0.01}, seed=1)
    fit = analyze_study(pd.concat([good, two], ignore_index=True), n_boot=100)
    assert fit.families["two"].status == "hit_bound" and fit.families["two"].ok
    assert fit.pick.status == "ok" and fit.pick.family == "good"
    assert [r[0] for r in fit.pick.ranking] == ["good"]
    assert "not ranked (laws on 2 budgets, unchecked): two (would predict" in fit.pick.message
    # alone, the unchecked family gives numbers but not an answer
    alone = analyze_study(two, n_boot=100).pick
    assert alone.family == "two" and alone.prediction is not None
    assert alone.status == "extrapolated" and "nothing checks them" in alone.message


def test_a_recorded_fit_refits_to_the_same_answer(tmp_path) -> None:
    """bench/scaling.py --refit-recorded: the points a recorded fit keeps in its
    profiles give the same fit back, with today's rules, without the MLflow store."""
    from tests.bench_scripts import load_bench

    scaling = load_bench("scaling")
    pts = planted(BUDGETS, families=("a", "b"), offset={"b": 0.01})
    fit = analyze_study(pts, n_boot=100)
    recorded = json.loads(json.dumps(fit.as_dict(), default=float))
    back = scaling.recorded_points(recorded)
    assert len(back) == len(pts)
    again = analyze_study(back, n_boot=100)
    assert again.pick.family == fit.pick.family and again.pick.status == fit.pick.status
    assert again.pick.n_star == pytest.approx(fit.pick.n_star, rel=1e-9)
    # the whole path: a part recorded in a results file, refitted with a floor
    cfg = scaling.configs(["synthetic_small"])["synthetic_small"]
    out = tmp_path / "scaling.json"
    floor = fit.pick.prediction.loss + 0.01  # type: ignore[union-attr]
    out.write_text(json.dumps({"synthetic_small": {
        "config": json.loads(cfg.model_dump_json()), "n_train": None,
        "fit": {**recorded, "data_floor_logloss": floor}}}))
    scaling.ROOT = tmp_path  # the report goes under tmp_path/bench/results
    assert scaling.refit_recorded(["synthetic_small", "absent"], tmp_path, out) == 0
    part = json.loads(out.read_text())["synthetic_small"]
    assert part["refit"]["pick"]["status"] == "extrapolated"
    assert part["refit"]["data_floor_logloss"] == floor
    assert (tmp_path / "bench/results/scaling_synthetic_small_refit/report.md").exists()


def test_the_winner_at_a_budget_is_the_best_measured_run() -> None:
    # "valley": MovieLens-1M's Wukong profile at 4e9 (4 sizes, the smallest barely
    # trained): its parabola's minimum sits 0.035 under every run. "steady" has the best
    # run at that budget, and wins it
    c = 4e9
    rows = [{"family": "valley", "budget": c, "N": n, "D": c / (3 * n), "loss": v}
            for n, v in zip([864, 1160, 1460, 4720], [0.6135, 0.5372, 0.5376, 0.5547])]
    rows += [{"family": "steady", "budget": c, "N": n, "D": c / (3 * n), "loss": v}
             for n, v in zip([500, 1000, 2000, 4000, 8000], [0.540, 0.5362, 0.5350, 0.5360, 0.539])]
    fit = analyze_study(pd.DataFrame(rows), n_boot=50)
    valley = fit.families["valley"].profiles[0]
    assert valley.ok and valley.l_star < min(valley.L) - 0.03  # the fitted valley
    assert fit.winners == {c: "steady"}
