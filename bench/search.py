"""Search strategies at equal FLOPs budget on synthetic teacher data.

Strategies (each over 3 seeds, same data, same budget):
  * ``asha_tpe``    — TPE + ASHA on train_flops (recscale's default)
  * ``tpe_full``    — TPE, every trial at full fidelity (FIFO)
  * ``random_full`` — random search at full fidelity (FIFO)

For each search: the best val_logloss reached as a function of compute spent (read back
from MLflow's per-report metric histories, ordered by time), the wall-time split
(training loop / trial-side evaluation, checkpointing and logging / Ray and driver
overhead), the driver's memory per finished trial, and trial peak memory.

    .venv/bin/python bench/search.py [--seeds 0 1 2] [--out bench/results/search.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file would shadow
# the `search` package; put the repository root there instead.
_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path[:] = [_ROOT] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from search.runner import run_search  # noqa: E402
from search.settings import SearchConfig  # noqa: E402
from trainers.data import DataConfig, SyntheticConfig, load_dataset  # noqa: E402

STRATEGIES = {"asha_tpe": ("tpe", "asha"), "tpe_full": ("tpe", "fifo"),
              "random_full": ("random", "fifo")}
DATA = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=30_000, n_cat_fields=8,
                                                              cardinality=50, order=3, seed=0))
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def curve(client: MlflowClient, experiment_id: str, budget: float) -> dict[str, float]:
    """Best val_logloss reached once each fraction of the budget was spent."""
    runs = client.search_runs([experiment_id], "tags.`recscale.kind` = 'trial'", max_results=1000)
    events = []
    for r in runs:
        flops = client.get_metric_history(r.info.run_id, "train_flops")
        loss = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val_logloss")}
        events += [(m.timestamp, r.info.run_id, m.value, loss.get(m.step, np.nan)) for m in flops]
    events.sort()
    latest: dict[str, float] = {}
    best, out, i = np.inf, {}, 0
    for frac in FRACTIONS:
        while i < len(events) and sum(latest.values()) < frac * budget:
            _, run, f, ll = events[i]
            latest[run] = f
            best = min(best, ll)
            i += 1
        out[f"best_at_{int(frac * 100)}pct"] = float(best)
    out["best"] = float(min((e[3] for e in events), default=np.nan))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=2e11)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--out", default="bench/results/search.json")
    args = parser.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="rsbench"))
    ds = load_dataset(DATA, cache_dir=tmp / "cache")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    rows = []
    for seed in args.seeds:
        for strategy in args.strategies:
            searcher, scheduler = STRATEGIES[strategy]
            cfg = SearchConfig(name=f"bench-{strategy}-{seed}", space="unified", data=DATA,
                               budget_flops=args.budget, trial_flops=args.budget / 8,
                               max_flops_per_example=5e5, searcher=searcher,
                               scheduler=scheduler, seed=seed, eval_max_examples=5_000,
                               max_concurrent=2)
            t0 = time.perf_counter()
            out = run_search(cfg, tracking_uri=uri, storage=tmp / "ray", verbose=0, dataset=ds)
            wall = time.perf_counter() - t0
            t = out.trials
            train_s = float((t["examples_seen"] / t["examples_per_s"]).sum())
            trial_s = float(t["trial_seconds"].sum())
            slots = cfg.max_concurrent * out.wall_seconds
            row = {"strategy": strategy, "seed": seed, "trials": len(t),
                   "spent_flops": out.spent_flops, "budget_flops": cfg.budget_flops,
                   "wall_s": wall, "tune_fit_s": out.wall_seconds,
                   "share_training_loop": train_s / slots,
                   "share_trial_overhead": (trial_s - train_s) / slots,
                   "share_outside_trials": 1 - trial_s / slots,
                   "driver_rss_mb_first": out.driver_rss_mb[0][1] if out.driver_rss_mb else None,
                   "driver_rss_mb_last": out.driver_rss_mb[-1][1] if out.driver_rss_mb else None,
                   "driver_rss_mb": out.driver_rss_mb,
                   "trial_peak_rss_mb": float(t["peak_rss_mb"].max()),
                   **curve(client, out.experiment_id, cfg.budget_flops)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "driver_rss_mb"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"data": DATA.model_dump(mode="json"), "rows": rows},
                                         indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
