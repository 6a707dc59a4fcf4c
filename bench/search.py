"""Search strategies at equal FLOPs budget on synthetic teacher data.

Strategies (each over several search seeds, same data, same budget):
  * ``asha_tpe``    — TPE + ASHA on train_flops, TPE modelling after 6 random trials
    (recscale's default until this benchmark)
  * ``random_asha`` — random search + ASHA: the scheduler's effect without the searcher's
  * ``tpe_full``    — TPE, every trial at full fidelity (FIFO)
  * ``random_full`` — random search at full fidelity (FIFO): the baseline
  * ``asha_tpe_rf2`` (not in the default set) — TPE + ASHA with reduction factor 2
    (rungs at trial/4 and trial/2): a less aggressive ASHA, to see whether the default
    stops on noise at this scale
  * ``asha_tpe_s20`` — TPE + ASHA with 20 random trials before TPE models the results:
    ASHA's cheap early looks at random configs first, TPE's model after (recscale's
    default now: ``SearchConfig.startup`` is 20 at this benchmark's budget)

For each search: the best val_logloss reached as a function of compute spent (read back
from MLflow's per-report metric histories, ordered by time; the reference models a search
trains first are left out of both the loss and the compute, since they are the same for
every strategy), the wall-time split (training loop / trial-side evaluation,
checkpointing and logging / Ray and driver overhead), the driver's memory per finished
trial, and trial peak memory. Then, per strategy, the mean and a 95% t-interval over
seeds of the best loss at 25/50/75/100% of the budget, and the compute each search
needed to reach random_full's final best loss (mean over its seeds), with a bootstrap
interval of the median over seeds. Each finished search is appended to ``--out`` at
once, so a run cut short keeps what it measured; ``--summarise`` re-reads that file
and prints the table without running anything.

    .venv/bin/python bench/search.py [--seeds 0 1 2 3 4] [--out bench/results/search.json]
    .venv/bin/python bench/search.py --summarise bench/results/search.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path and this file would shadow
# the `search` package; put the repository root there instead.
_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path[:] = [_ROOT] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from trainers.contracts import KIND_TRIAL, OBJECTIVE, TAG_KIND, TAG_TRIAL_ID, TIME_ATTR  # noqa: E402
from trainers.data import DataConfig, SyntheticConfig  # noqa: E402

#: name -> (searcher, scheduler, SearchConfig overrides)
STRATEGIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "asha_tpe": ("tpe", "asha", {"startup_trials": 6}),  # the default before startup scaled
    "random_asha": ("random", "asha", {}),
    "tpe_full": ("tpe", "fifo", {}),
    "random_full": ("random", "fifo", {}),
    "asha_tpe_rf2": ("tpe", "asha", {"reduction_factor": 2}),
    "asha_tpe_s20": ("tpe", "asha", {"startup_trials": 20}),
}
DEFAULT_STRATEGIES = ("asha_tpe_s20", "asha_tpe", "random_asha", "tpe_full", "random_full")
BASELINE = "random_full"
DATA = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=30_000, n_cat_fields=8,
                                                              cardinality=50, order=3, seed=0))
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
#: budget fractions at which each search's curve is stored in the JSON (for plots)
GRID = tuple(round(0.05 * k, 2) for k in range(1, 21))

#: one report: (time it was logged, trial, the trial's train_flops then, its val_logloss)
Event = tuple[float, str, float, float]


# --- pure parts (tests/test_bench_search.py) -------------------------------------------

def spend_curve(events: Iterable[Event]) -> list[tuple[float, float]]:
    """``(compute spent, best loss so far)`` after each report, in time order.

    Compute spent at a report is the sum over trials of each one's ``train_flops`` at its
    latest report so far (a concurrent trial's work since its last report is not yet
    counted: the same for every strategy). A NaN loss (a report without a validation
    loss) moves the spend but not the best.
    """
    latest: dict[str, float] = {}
    best = math.inf
    out: list[tuple[float, float]] = []
    for _, run, flops, loss in sorted(events):
        latest[run] = max(flops, latest.get(run, 0.0))
        if not math.isnan(loss):
            best = min(best, loss)
        out.append((sum(latest.values()), best))
    return out


def best_at(curve: Sequence[tuple[float, float]], budget: float,
            fractions: Sequence[float] = FRACTIONS) -> dict[float, float]:
    """Best loss reached by the time each fraction of ``budget`` was spent (inf before
    any report). The fraction 1.0 takes every report, so a search that overshoots the
    budget by part of a batch still has its final best there."""
    out: dict[float, float] = {}
    for frac in fractions:
        best = math.inf
        for spent, loss in curve:
            if frac < 1.0 and spent > frac * budget:
                break
            best = loss
        out[frac] = best
    return out


def compute_to_reach(curve: Sequence[tuple[float, float]], target: float,
                     budget: float) -> float:
    """The fraction of ``budget`` spent when the best loss first reached ``target``
    (``<= target``); inf when it never did."""
    for spent, loss in curve:
        if loss <= target:
            return spent / budget
    return math.inf


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student's t interval for the mean over seeds; the bounds
    are NaN with fewer than two values, everything NaN with none."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def median_interval(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """``(median, low, high)``: percentile-bootstrap interval of the median over seeds.

    Values may be inf (a search that never reached the target): the median and bounds
    are then inf where more than the matching share of resamples is inf, and nothing is
    interpolated (``inverted_cdf`` quantiles), so inf never turns into NaN.
    """
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = np.sort(rng.choice(x, size=(n_boot, len(x)), replace=True), axis=1)
    # the lower median: an order statistic, so no inf - inf
    meds = boots[:, (len(x) - 1) // 2]
    lo, hi = np.quantile(meds, [0.5 - level / 2, 0.5 + level / 2], method="inverted_cdf")
    return float(np.sort(x)[(len(x) - 1) // 2]), float(lo), float(hi)


def rung_agreement(histories: Sequence[dict[float, float]], at: float,
                   final: float, keep: float) -> dict[str, float]:
    """How well a full-fidelity trial's loss at ``at`` FLOPs predicts its final loss
    (what ASHA bets on when it cuts at ``at``).

    ``histories`` maps each trial's train_flops at a report to its loss. Reports fall on
    whole batches, so a trial counts when its report nearest ``at`` is within a factor
    1.5 of it and its last report within 10% of ``final``. Returns the Spearman rank
    correlation of the two losses, the number of trials, and ``kept_best``: 1.0 when the
    trial with the best final loss is among the best ``keep`` share at ``at`` (ASHA with
    reduction factor ``1/keep`` would have kept it), else 0.0.
    """
    pairs = []
    for h in histories:
        points = [(f, v) for f, v in h.items() if f > 0 and not math.isnan(v)]
        if not points:
            continue
        f_early, early = min(points, key=lambda p: abs(math.log(p[0] / at)))
        f_last, last = max(points)
        if abs(math.log(f_early / at)) < math.log(1.5) and f_last >= 0.9 * final:
            pairs.append((early, last))
    if len(pairs) < 3:
        return {"spearman": math.nan, "n": float(len(pairs)), "kept_best": math.nan}
    e, f = np.asarray(pairs).T
    rho = float(stats.spearmanr(e, f).statistic)
    n_keep = max(1, int(math.floor(len(pairs) * keep)))
    kept = set(np.argsort(e, kind="stable")[:n_keep].tolist())
    return {"spearman": rho, "n": float(len(pairs)), "kept_best": float(int(np.argmin(f)) in kept)}


def summarise(rows: Sequence[dict[str, Any]], baseline: str = BASELINE) -> dict[str, Any]:
    """Per strategy, over its seeds: trials, wall, best loss at each budget fraction
    (mean and 95% t-interval), and the compute to reach the baseline's mean final best
    (per seed, the median with a bootstrap interval, and how many seeds reached it)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)
    base = [r["best_at"]["1.0"] for r in by.get(baseline, [])]
    target = float(np.mean(base)) if base else math.nan
    out: dict[str, Any] = {"baseline": baseline, "target_loss": target, "strategies": {}}
    for name, rs in by.items():
        s: dict[str, Any] = {"seeds": [r["seed"] for r in rs],
                             "trials": float(np.mean([r["trials"] for r in rs])),
                             "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
        for frac in FRACTIONS:
            s[f"best_at_{int(frac * 100)}pct"] = t_interval([r["best_at"][str(frac)] for r in rs])
        s["winner_test_logloss"] = t_interval([r.get("winner_test_logloss", math.nan) for r in rs])
        reach = [compute_to_reach([tuple(p) for p in r["curve"]], target, r["search_budget"])
                 if math.isfinite(target) else math.nan for r in rs]
        s["reach_target_per_seed"] = reach
        s["reach_target_median"] = median_interval(reach)
        s["reached"] = sum(math.isfinite(x) for x in reach)
        if all(r.get("scheduler") == "fifo" for r in rs):
            s["rungs"] = fifo_rungs(rs)
        out["strategies"][name] = s
    return out


def fifo_rungs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For full-fidelity searches, at each of ASHA's default rungs below the top one
    (grace, grace·rf): per seed the :func:`rung_agreement` of the trials' losses there
    with their final losses, and the mean Spearman and count of seeds whose best final
    trial ASHA would have kept. What the default ASHA would have risked on these trials."""
    out = []
    for k in (0, 1):
        per_seed = []
        for r in rows:
            at = r["grace_flops"] * r["reduction_factor"] ** k
            per_seed.append(rung_agreement([dict(h) for h in r["histories"]], at,
                                           r["trial_flops"], 1 / r["reduction_factor"]))
        out.append({"rung": k, "at_share_of_trial": at / rows[-1]["trial_flops"],
                    "spearman_mean": float(np.nanmean([p["spearman"] for p in per_seed])),
                    "kept_best": int(np.nansum([p["kept_best"] for p in per_seed])),
                    "seeds": len(per_seed), "per_seed": per_seed})
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The strategy table of bench/RESULTS.md."""
    def ci(t: Sequence[float]) -> str:
        m, lo, hi = t
        return f"{m:.4f} [{lo:.4f}, {hi:.4f}]" if math.isfinite(lo) else f"{m:.4f}"

    def frac(x: float) -> str:
        return "never" if math.isinf(x) else f"{x:.2f}"

    head = ("| strategy | seeds | trials | best at 25% | best at 50% | best at 75% | best at 100% "
            f"| compute to reach {summary['baseline']}'s final best ({summary['target_loss']:.4f}): "
            "median [95% CI]; per seed | winner's test loss | wall s |")
    lines = [head, "|" + "---|" * 10]
    for name, s in summary["strategies"].items():
        med = s["reach_target_median"]
        reach = (f"{frac(med[0])} [{frac(med[1])}, {frac(med[2])}]; "
                 + " ".join(frac(x) for x in s["reach_target_per_seed"]))
        lines.append(f"| {name} | {len(s['seeds'])} | {s['trials']:.1f} | "
                     + " | ".join(ci(s[f"best_at_{p}pct"]) for p in (25, 50, 75, 100))
                     + f" | {reach} | {ci(s['winner_test_logloss'])} | {s['wall_s']:.0f} |")
    rungs = [(n, s["rungs"]) for n, s in summary["strategies"].items() if "rungs" in s]
    if rungs:
        lines += ["", "| full-fidelity trials of | ASHA rung (share of trial_flops) | "
                  "Spearman(loss there, final loss), mean over seeds | seeds whose best final "
                  "trial is in the top 1/rf there |", "|---|---|---|---|"]
        for name, rs in rungs:
            lines += [f"| {name} | {r['at_share_of_trial']:.3f} | {r['spearman_mean']:.2f} | "
                      f"{r['kept_best']} of {r['seeds']} |" for r in rs]
    return "\n".join(lines)


# --- the measurement -----------------------------------------------------------------

def search_events(client: Any, experiment_id: str) -> tuple[list[Event], float,
                                                            dict[str, dict[float, float]]]:
    """The searched trials' reports of one search (reference models left out), the
    FLOPs the references spent, and each trial's history ``{train_flops: loss}``."""
    from search.references import is_reference_id

    runs = client.search_runs([experiment_id], f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'",
                              max_results=5000)
    events: list[Event] = []
    references = 0.0
    histories: dict[str, dict[float, float]] = {}
    for r in runs:
        flops = client.get_metric_history(r.info.run_id, TIME_ATTR)
        if is_reference_id(r.data.tags.get(TAG_TRIAL_ID, "")):
            references += max((m.value for m in flops), default=0.0)
            continue
        loss = {m.step: m.value for m in client.get_metric_history(r.info.run_id, OBJECTIVE)}
        events += [(m.timestamp, r.info.run_id, m.value, loss.get(m.step, math.nan)) for m in flops]
        histories[r.info.run_id] = {m.value: loss.get(m.step, math.nan) for m in flops}
    return events, references, histories


def winner_test(exp_path: Path, ds: Any) -> dict[str, Any]:
    """The search's winner (lowest val_logloss in its last report, as the search picks
    it) scored on the test split, which no search ever looks at: the outcome of a search
    without the optimism of a minimum over many noisy validation scores."""
    import torch
    from ray.tune import ExperimentAnalysis

    from search.trainable import STATE_FILE, standard_error, val_losses
    from spaces import build_model
    from trainers.experiment import experiment_from_flat

    def score(t: Any) -> float:
        v = (t.last_result or {}).get(OBJECTIVE, math.nan)
        ok = (t.last_result or {}).get("trial_status") != "diverged"
        return float(v) if ok and v is not None and math.isfinite(v) else math.inf

    trials = ExperimentAnalysis(str(exp_path)).trials
    best = min(trials, key=score)
    paths = ([Path(best.checkpoint.path) / STATE_FILE] if best.checkpoint else []) + sorted(
        Path(best.path).glob(f"checkpoint_*/{STATE_FILE}"), reverse=True)
    for path in paths:
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError):
            continue
        if float(state.get("examples_seen", -1)) != float(best.last_result.get("examples_seen", -2)):
            continue  # not the report that is its result
        exp = experiment_from_flat(dict(best.config), DATA)
        model = build_model(exp.model, ds.spec)
        model.load_state_dict(state["model"])
        losses = val_losses(model, ds.test, None)
        return {"winner_val_logloss": score(best), "winner_test_logloss": float(losses.mean()),
                "winner_test_se": standard_error(losses), "winner_block": exp.model.block,
                "winner_train_flops": float(best.last_result.get(TIME_ATTR, math.nan))}
    return {"winner_val_logloss": score(best), "winner_test_logloss": math.nan}


def run_one(strategy: str, seed: int, budget: float, n_trials: int, common: dict[str, Any],
            uri: str, storage: Path, ds: Any) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from search.runner import run_search
    from search.settings import SearchConfig

    searcher, scheduler, overrides = STRATEGIES[strategy]
    cfg = SearchConfig(name=f"bench-{strategy}-{seed}", space="unified", data=DATA,
                       budget_flops=budget, trial_flops=budget / n_trials, searcher=searcher,
                       scheduler=scheduler, seed=seed, **{**common, **overrides})
    t0 = time.perf_counter()
    out = run_search(cfg, tracking_uri=uri, storage=storage, verbose=0, dataset=ds)
    wall = time.perf_counter() - t0
    t = out.trials
    train_s = float((t["examples_seen"] / t["examples_per_s"]).sum())
    trial_s = float(t["trial_seconds"].sum())
    slots = cfg.max_concurrent * out.wall_seconds
    events, ref_flops, histories = search_events(MlflowClient(uri), out.experiment_id)
    search_budget = cfg.budget_flops - ref_flops
    curve = spend_curve(events)
    storage_exp = storage / cfg.name
    # whole batches: a trial's last report may fall short of trial_flops by part of one
    full = [h for h in histories.values() if max(h, default=0.0) >= cfg.trial_budget * 0.9]
    return {
        "strategy": strategy, "seed": seed, "searcher": searcher, "scheduler": scheduler,
        "trials": len(t),
        "trials_full_fidelity": len(full),
        "trial_flops": cfg.trial_budget, "grace_flops": cfg.grace,
        "reduction_factor": cfg.reduction_factor,
        "spent_flops": out.spent_flops, "budget_flops": cfg.budget_flops,
        "reference_flops": ref_flops, "search_budget": search_budget,
        "wall_s": wall, "tune_fit_s": out.wall_seconds,
        "share_training_loop": train_s / slots,
        "share_trial_overhead": (trial_s - train_s) / slots,
        "share_outside_trials": 1 - trial_s / slots,
        "driver_rss_mb_first": out.driver_rss_mb[0][1] if out.driver_rss_mb else None,
        "driver_rss_mb_last": out.driver_rss_mb[-1][1] if out.driver_rss_mb else None,
        "driver_rss_mb": out.driver_rss_mb,
        "trial_peak_rss_mb": float(t["peak_rss_mb"].max()),
        "best_at": {str(k): v for k, v in best_at(curve, search_budget).items()},
        "best_on_grid": [best_at(curve, search_budget, (g,))[g] for g in GRID],
        **winner_test(storage_exp, ds),
        "curve": curve,
        "histories": [sorted(h.items()) for h in histories.values()],
    }


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_results(path: Path, settings: dict[str, Any], summary: dict[str, Any],
                  rows: Sequence[dict[str, Any]]) -> None:
    """``{"settings", "summary", "rows"}``: settings and summary indented, each row (its
    curve and trial histories included) on one line, so the file stays small and
    diffable row by row. Python's ``json`` reads it back (inf as ``Infinity``)."""
    head = json.dumps({"settings": settings, "summary": summary}, indent=1)[:-2]
    body = ",\n".join(json.dumps(r) for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{head},\n "rows": [\n{body}\n]\n}}\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=float, default=2.5e11)
    parser.add_argument("--trials", type=int, default=50,
                        help="full-fidelity trials the budget buys: trial_flops = budget / trials")
    parser.add_argument("--cap", type=float, default=1e5, help="max_flops_per_example")
    parser.add_argument("--eval-max-examples", type=int, default=3_000)
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        choices=list(STRATEGIES))
    parser.add_argument("--out", default="bench/results/search.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in --out (same data and budget)")
    parser.add_argument("--summarise", metavar="JSON", help="print the table of a past run and exit")
    parser.add_argument("--test-winners", metavar="STORAGE",
                        help="score the winners of the searches in --out, kept in the Ray "
                             "storage folder STORAGE, on the test split; rewrite --out and exit")
    args = parser.parse_args()
    if args.summarise:
        summary = summarise(_load(Path(args.summarise))["rows"])
        print(markdown(summary))
        return
    import ray
    from mlflow.tracking import MlflowClient

    from trainers.data import load_dataset

    out_path = Path(args.out)
    if args.test_winners:
        past = _load(out_path)
        ds = load_dataset(DATA, cache_dir=Path(tempfile.mkdtemp(prefix="rsbench")) / "cache")
        for r in past["rows"]:
            if not math.isfinite(r.get("winner_test_logloss", math.nan)):  # not scored yet
                r.update(winner_test(Path(args.test_winners) / f"bench-{r['strategy']}-{r['seed']}",
                                     ds))
        write_results(out_path, past["settings"], summarise(past["rows"]), past["rows"])
        print(markdown(summarise(past["rows"])))
        return
    common = {"max_flops_per_example": args.cap, "eval_max_examples": args.eval_max_examples,
              "reports_per_grace": 1, "max_concurrent": 2}
    rows: list[dict[str, Any]] = _load(out_path).get("rows", []) if args.append else []
    tmp = Path(tempfile.mkdtemp(prefix="rsbench"))
    print(f"Ray storage (for --test-winners): {tmp / 'ray'}", flush=True)
    ds = load_dataset(DATA, cache_dir=tmp / "cache")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(uri)
    settings = {"data": DATA.model_dump(mode="json"), "budget_flops": args.budget,
                "trials": args.trials, "space": "unified", **common}
    for seed in args.seeds:  # strategies interleaved, so load on the machine hits all alike
        for strategy in args.strategies:
            row = run_one(strategy, seed, args.budget, args.trials, common, uri, tmp / "ray", ds)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()
                              if k not in ("driver_rss_mb", "curve", "histories", "best_on_grid")}),
                  flush=True)
            write_results(out_path, settings, summarise(rows), rows)
    print(markdown(summarise(rows)))
    ray.shutdown()


if __name__ == "__main__":
    main()
