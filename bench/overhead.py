"""Where a search's time goes: the share of slot time inside the training loop (issue 15).

One search per case, on the real search path (``search.runner.run_search``: references,
Tune, ASHA + TPE, MLflow in SQLite, 2 concurrent trials), and the same split accounting
as ``bench/search.py``:

* **slot time** = ``max_concurrent`` × the wall time of ``Tuner.fit`` (the reference
  models the driver trains before Tune starts are left out; ``share_of_run_wall`` keeps
  ``bench/search.py``'s base, the whole ``run_search`` wall, for comparison);
* **training loop** = the time of the optimiser steps of every trial (``examples_seen /
  examples_per_s`` of its last report: forward, backward, step, batch gathering);
* **trial-side overhead** = each trial's ``trial_seconds`` (start of the trial function to
  its last report) minus its loop time: start-up (MLflow run, model build), validation,
  checkpoints, logging, Tune's report;
* **outside trials** = the rest: Ray and the driver (actor start and reuse, the searcher
  and scheduler, experiment snapshots, a trial's end after its last report).

Cases:

* ``demo``: ``recscale demo``'s own search (MovieLens-1M, 300k ratings, budget 8e11,
  ``trial_flops`` 1.6e11, 10k validation examples);
* ``long``: the same with ``trial_flops`` and the budget × ``--long-scale`` (3 by
  default), so trials run ~3× longer (the mean trial length is in the output).

    .venv/bin/python bench/overhead.py --case demo long --label after   # -> bench/results/overhead.json

"Before" is the same script run against the code before the change (a checkout of
``main``, ``PYTHONPATH`` pointing at it); results of each label and case are merged into
the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path and bench/search.py would
# shadow the `search` package; the code measured is the one on PYTHONPATH (or this tree).
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(_HERE).parent))

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import search.runner as runner  # noqa: E402
from recscale.demo import demo_config  # noqa: E402
from search.settings import SearchConfig  # noqa: E402


def case_config(case: str, long_scale: float, seed: int, space: str | None = None) -> SearchConfig:
    """The search of one case (see the module docstring); ``space``: another space file
    than the demo's (to compare two versions of the code on one space)."""
    demo = demo_config(quick=False)
    if space is not None:
        demo = demo.model_copy(update={"space": space})
    if case == "demo":
        return demo.model_copy(update={"name": f"overhead-demo-{seed}", "seed": seed})
    if case == "long":
        assert demo.trial_flops is not None
        return demo.model_copy(update={"name": f"overhead-long-{seed}", "seed": seed,
                                       "trial_flops": demo.trial_flops * long_scale,
                                       "budget_flops": demo.budget_flops * long_scale})
    raise SystemExit(f"unknown case {case!r}")


class _TimedFit:
    """Wraps ``search.runner.build_tuner`` so the wall time of ``Tuner.fit`` is known."""

    def __init__(self) -> None:
        self.fit_seconds = 0.0
        self._build = runner.build_tuner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tuner = self._build(*args, **kwargs)
        fit = tuner.fit

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fit()
            finally:
                self.fit_seconds += time.perf_counter() - t0

        tuner.fit = timed
        return tuner


def split(trials: Any, slots: float) -> dict[str, float]:
    """Training loop / trial-side overhead / outside trials, as shares of ``slots``."""
    t = trials[trials["examples_per_s"].fillna(0) > 0]
    loop = float((t["examples_seen"] / t["examples_per_s"]).sum())
    inside = float(t["trial_seconds"].sum())
    return {"share_training_loop": loop / slots, "share_trial_overhead": (inside - loop) / slots,
            "share_outside_trials": 1 - inside / slots, "loop_seconds": loop,
            "trial_seconds": inside}


def run_case(case: str, seed: int, long_scale: float, tmp: Path,
             space: str | None = None) -> dict[str, Any]:
    cfg = case_config(case, long_scale, seed, space)
    timer = _TimedFit()
    runner.build_tuner = timer  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        out = runner.run_search(cfg, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                                storage=tmp / "ray", verbose=0)
        wall = time.perf_counter() - t0
    finally:
        runner.build_tuner = timer._build
    t = out.trials
    ran = t[t["examples_per_s"].fillna(0) > 0]
    row: dict[str, Any] = {
        "case": case, "seed": seed, "trials": len(t), "trials_reported": len(ran),
        "trial_flops": cfg.trial_budget, "budget_flops": cfg.budget_flops,
        "eval_max_examples": cfg.eval_max_examples, "spent_flops": out.spent_flops,
        "run_wall_s": wall, "fit_wall_s": timer.fit_seconds,
        "mean_trial_s": float(ran["trial_seconds"].mean()),
        "max_trial_s": float(ran["trial_seconds"].max()),
        "best_val_logloss": float(ran["val_logloss"].min()),
        "trial_peak_rss_mb": float(ran["peak_rss_mb"].max()),
        **split(t, cfg.max_concurrent * timer.fit_seconds),
        "share_of_run_wall": split(t, cfg.max_concurrent * out.wall_seconds),
    }
    from ray.tune import ExperimentAnalysis

    last = [t.last_result or {} for t in ExperimentAnalysis(out.storage_path).trials]
    for key in ("startup_seconds", "eval_seconds", "report_seconds", "checkpoints"):
        if any(key in r for r in last):  # the trial-side parts, where the code measures them
            row[f"sum_{key}"] = float(sum(r.get(key, 0.0) for r in last))
    row["reports"] = int(sum(r.get("training_iteration", 0) for r in last))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", default=["demo", "long"], choices=["demo", "long"])
    ap.add_argument("--label", required=True, help="before | after | anything")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--long-scale", type=float, default=3.0)
    ap.add_argument("--space", default=None,
                    help="a space YAML instead of the demo's (the same file for before and after)")
    ap.add_argument("--out", default=str(Path(_HERE) / "results" / "overhead.json"))
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    code = os.environ.get("PYTHONPATH") or str(Path(_HERE).parent)
    commit = subprocess.run(["git", "-C", code.split(":")[0], "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for case in args.case:
        with tempfile.TemporaryDirectory(prefix="rsover") as tmp:
            row = {"label": args.label, "commit": commit,
                   "load_avg_start": os.getloadavg()[0],
                   **run_case(case, args.seed, args.long_scale, Path(tmp), args.space),
                   "space": args.space or "the demo's",
                   "load_avg_end": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        results["runs"] = [r for r in results["runs"]
                           if (r["label"], r["case"], r["seed"]) != (args.label, case, args.seed)]
        results["runs"].append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
