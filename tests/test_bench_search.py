"""The pure parts of the strategy benchmark (bench/search.py) on hand-made data: the
best-loss-vs-compute curve, compute to reach a target, the intervals over seeds, and how
well a rung's losses predict the final ones. No Ray, no MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.bench_scripts import load_bench


def _bench() -> ModuleType:
    return load_bench("search")


bench = _bench()

# Two trials reporting alternately (timestamps out of order on purpose): spend is the
# sum of each trial's latest train_flops.
EVENTS = [
    (3.0, "b", 10.0, 0.60),
    (1.0, "a", 10.0, 0.70),
    (2.0, "a", 20.0, 0.65),
    (4.0, "a", 30.0, math.nan),  # a report without a loss moves spend only
    (5.0, "b", 20.0, 0.50),
]


def test_spend_curve_sums_latest_flops_per_trial_in_time_order() -> None:
    assert bench.spend_curve(EVENTS) == [
        (10.0, 0.70), (20.0, 0.65), (30.0, 0.60), (40.0, 0.60), (50.0, 0.50)]


def test_best_at_fractions_and_the_whole_budget() -> None:
    curve = bench.spend_curve(EVENTS)
    got = bench.best_at(curve, budget=40.0, fractions=(0.1, 0.25, 0.5, 0.75, 1.0))
    assert got[0.1] == math.inf  # nothing reported by 4 FLOPs
    assert got[0.25] == 0.70  # spent 10
    assert got[0.5] == 0.65  # spent 20 (the report at 30 is past 50%)
    assert got[0.75] == 0.60  # spent 30
    assert got[1.0] == 0.50  # 1.0 takes every report, even the one past the budget


def test_compute_to_reach() -> None:
    curve = bench.spend_curve(EVENTS)
    assert bench.compute_to_reach(curve, 0.65, budget=50.0) == pytest.approx(0.4)  # exactly
    assert bench.compute_to_reach(curve, 0.55, budget=50.0) == pytest.approx(1.0)
    assert bench.compute_to_reach(curve, 0.40, budget=50.0) == math.inf
    assert bench.compute_to_reach(curve, 0.99, budget=50.0) == pytest.approx(0.2)


def test_t_interval() -> None:
    mean, lo, hi = bench.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) · sd 1 / sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert bench.t_interval([1.0, 2.0, 3.0, math.inf])[0] == pytest.approx(2.0)  # inf ignored
    one = bench.t_interval([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])
    assert all(math.isnan(x) for x in bench.t_interval([]))


def test_median_interval_handles_never_reached() -> None:
    med, lo, hi = bench.median_interval([0.1, 0.2, 0.3, math.inf, math.inf])
    assert med == 0.3 and lo <= med <= hi and not math.isnan(lo) and not math.isnan(hi)
    assert hi == math.inf  # resamples with three or more infs are common
    med, lo, hi = bench.median_interval([math.inf] * 4 + [0.2])
    assert med == math.inf and not math.isnan(lo)
    med, lo, hi = bench.median_interval([0.3] * 5)
    assert (med, lo, hi) == (0.3, 0.3, 0.3)


def test_rung_agreement_orders() -> None:
    # losses at 10 FLOPs rank the trials exactly as at 90: perfect agreement
    same = [{10.0: 0.9 - 0.1 * i, 90.0: 0.8 - 0.1 * i} for i in range(6)]
    got = bench.rung_agreement(same, at=10.0, final=90.0, keep=1 / 3)
    assert got == {"spearman": pytest.approx(1.0), "n": 6.0, "kept_best": 1.0}
    # reversed: the best final trial was the worst early, and ASHA would have cut it
    flipped = [{11.0: 0.4 + 0.1 * i, 88.0: 0.8 - 0.1 * i} for i in range(6)]
    got = bench.rung_agreement(flipped, at=10.0, final=90.0, keep=1 / 3)
    assert got == {"spearman": pytest.approx(-1.0), "n": 6.0, "kept_best": 0.0}
    # a trial stopped early (no final report) or reporting far from the rung is left out
    partial = [*same, {10.0: 0.1}, {40.0: 0.2, 90.0: 0.3}]
    assert bench.rung_agreement(partial, 10.0, 90.0, 1 / 3)["n"] == 6.0
    assert math.isnan(bench.rung_agreement(same[:2], 10.0, 90.0, 1 / 3)["spearman"])


def _row(strategy: str, seed: int, final: float, curve: list[tuple[float, float]]) -> dict:
    return {"strategy": strategy, "seed": seed, "scheduler": "asha", "trials": 10,
            "wall_s": 1.0, "search_budget": 100.0, "curve": curve,
            "best_at": {str(f): v for f, v in bench.best_at(curve, 100.0).items()}}


def test_summarise_measures_against_the_baselines_mean_final_best() -> None:
    rows = [_row("random_full", 0, 0.60, [(50.0, 0.62), (100.0, 0.60)]),
            _row("random_full", 1, 0.64, [(60.0, 0.64)]),
            _row("asha_tpe", 0, 0.55, [(20.0, 0.61), (30.0, 0.55)]),
            _row("asha_tpe", 1, 0.63, [(90.0, 0.63)])]
    out = bench.summarise(rows)
    assert out["target_loss"] == pytest.approx(0.62)
    asha = out["strategies"]["asha_tpe"]
    assert asha["reach_target_per_seed"] == [pytest.approx(0.2), math.inf]
    assert asha["reached"] == 1
    assert asha["best_at_100pct"][0] == pytest.approx(0.59)
    base = out["strategies"]["random_full"]
    assert base["reach_target_per_seed"] == [pytest.approx(0.5), math.inf]
    table = bench.markdown(out)
    assert "| asha_tpe | 2 | 10.0 |" in table and "never" in table


def test_results_file_reads_back(tmp_path: Path) -> None:
    rows = [_row("random_full", 0, 0.60, [(50.0, 0.62), (100.0, 0.60)]),
            _row("asha_tpe", 0, 0.70, [(90.0, 0.70)])]
    path = tmp_path / "out" / "search.json"
    bench.write_results(path, {"budget_flops": 100.0}, bench.summarise(rows), rows)
    back = bench._load(path)
    assert back["settings"] == {"budget_flops": 100.0}
    assert back["rows"] == [{**r, "curve": [list(p) for p in r["curve"]]} for r in rows]
    assert back["summary"]["strategies"]["asha_tpe"]["reach_target_per_seed"] == [math.inf]
    lines = path.read_text().splitlines()
    assert lines[lines.index(' "rows": ['):] == [' "rows": [', *(lines[-4:-2]), "]", "}"]
    assert all(line.startswith('{"strategy"') for line in lines[-4:-2])  # one line a row
