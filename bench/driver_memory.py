"""Driver memory per finished trial, over a search of >= 200 trials.

Runs the real search path (``search.runner.run_search``, what ``recscale search``
runs: Ray Tune + OptunaSearch (TPE) + ASHA on FLOPs + MLflow on SQLite, in a temporary
directory) with tiny synthetic data and tiny trials, so that a few hundred trials finish
in minutes on two cores. The driver's RSS is sampled each time a trial finishes
(``search.monitor.DriverMemory``, the product's own series); the slope of RSS against
the number of finished trials is fitted by least squares over the second half of the
trials (the first half is warm-up: imports, Ray's and MLflow's caches, the arena
settling) and reported with its standard error.

``--keep-trial-history`` runs the same search with the product's trimming of finished
trials switched off (``search.monitor.TrimFinishedTrials`` with its ``malloc_trim``,
``BudgetedOptunaSearch.forget_finished`` with the compaction of finished Optuna trials,
and Tune's TensorBoard logger back in place of ``search.monitor.NoTensorBoardEvents``),
for a before/after in two runs of this script; ``--debug`` also records what the driver
holds (Tune's cached trial JSON, ``log_once`` keys, glibc's malloc counters, resident
memory by kind of mapping, Python's allocated blocks, threads, Python objects by type;
``--trace`` adds the ``tracemalloc`` heap and the allocation sites that grow between
``--trials``/2 and ``--trials`` finished trials).

    .venv/bin/python bench/driver_memory.py [--trials 220] [--keep-trial-history]
        [--debug] [--out bench/results/driver_memory.json]

Results of several runs go to one JSON file, one entry per ``--label`` (default
``trimmed`` or ``untrimmed``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path and this file would shadow
# the `search` package; put the repository root there instead.
_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path[:] = [_ROOT] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import psutil  # noqa: E402

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: the target of issue 15: driver RSS per finished trial, MB
TARGET_MB_PER_TRIAL = 0.05


def fit_slope(samples: Sequence[tuple[float, float]], skip_fraction: float = 0.5) -> dict[str, float]:
    """Least-squares slope of ``y`` on ``x`` over the samples after the first
    ``skip_fraction`` of them (by ``x``), with its standard error and a 95% interval.

    ``samples``: ``(finished_trials, rss_mb)`` pairs. Returns ``slope``, ``se``, ``lo``,
    ``hi`` (slope ± t·se, Student t with n-2 degrees of freedom), ``n`` (points fitted)
    and ``x_from``/``x_to`` (the range fitted). Needs at least three points after the
    skip.
    """
    from scipy import stats

    pts = sorted((float(x), float(y)) for x, y in samples)
    start = int(len(pts) * skip_fraction)
    tail = pts[start:]
    if len(tail) < 3:
        raise ValueError(f"need at least 3 samples to fit a slope, have {len(tail)}")
    x = np.array([p[0] for p in tail])
    y = np.array([p[1] for p in tail])
    if np.ptp(x) == 0:
        raise ValueError("all samples are at the same number of finished trials")
    fit = stats.linregress(x, y)
    t = float(stats.t.ppf(0.975, len(tail) - 2))
    slope, se = float(fit.slope), float(fit.stderr)
    return {"slope": slope, "se": se, "lo": slope - t * se, "hi": slope + t * se,
            "n": float(len(tail)), "x_from": float(x[0]), "x_to": float(x[-1])}


def _smaps_mb() -> dict[str, float]:
    """The driver's resident memory by kind of mapping (``/proc/self/smaps``), MB:
    ``heap_mb`` (glibc's main arena, ``[heap]``), ``anon_mb`` (other anonymous mappings:
    glibc's thread arenas and large blocks, Python's small-object arenas, thread stacks,
    what native libraries map), ``file_mb`` (mapped files: code, shared memory). Empty
    where ``/proc`` is absent."""
    out = {"heap_mb": 0.0, "anon_mb": 0.0, "file_mb": 0.0}
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return {}
    kind = "anon_mb"
    for line in text.splitlines():
        head = line.split(maxsplit=6)
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            name = head[5] if len(head) > 5 else ""
            kind = ("heap_mb" if name == "[heap]" else
                    "file_mb" if name.startswith("/") else "anon_mb")
        elif head and head[0] == "Rss:":
            out[kind] += float(head[1]) / 1024
    return out


class _Diagnostics:
    """What the driver holds, sampled at each finished trial (``--debug`` only).

    Cheap enough to leave the figure meaningful: at each sample the size of the JSON
    Tune has cached for its trials (what every experiment-state save writes) and the
    number of ``log_once`` keys, glibc's ``malloc`` counters, the resident memory by kind
    of mapping, Python's allocated blocks and the thread count; Python objects by type
    before and after the search. With ``trace``, also the Python heap ``tracemalloc``
    sees (slow: two to three times the wall time, for finding what grows, not for the
    figure), and the allocation sites (12 frames deep) that grew between the samples at
    ``window[0]`` and ``window[1]`` finished trials (both after the warm-up, both before
    the search builds its outcome).
    """

    def __init__(self, trace: bool = False, top: int = 15,
                 window: tuple[int, int] = (100, 200)) -> None:
        self.trace, self.top, self.window = trace, top, window
        if trace:
            import tracemalloc

            tracemalloc.start(12)
        self.series: list[dict[str, float]] = []
        self.first_counts: Counter[str] | None = None
        self.snapshots: list[tuple[int, Any]] = []

    @staticmethod
    def _counts() -> Counter[str]:
        return Counter(type(o).__name__ for o in gc.get_objects())

    def sample(self, finished: int, trials: list[Any]) -> None:
        from ray.util import debug

        from search.monitor import malloc_info

        json_kb = sum(len(getattr(t, "_state_json", None) or "")
                      + len(getattr(getattr(t, "run_metadata", None), "_cached_json", None) or "")
                      for t in trials) / 1024
        row = {"finished": float(finished), "tune_json_kb": json_kb,
               "log_once_keys": float(len(getattr(debug, "_logged", ()))),
               "py_blocks": float(sys.getallocatedblocks()),
               "threads": float(threading.active_count()),
               "os_threads": float(psutil.Process().num_threads()), **_smaps_mb()}
        malloc = malloc_info()
        if malloc is not None:
            row.update({f"malloc_{k}_mb": v for k, v in malloc.items()})
        if self.trace:
            import tracemalloc

            row["traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        self.series.append(row)
        if self.trace and len(self.snapshots) < 2 and finished >= self.window[len(self.snapshots)]:
            import tracemalloc

            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__)])
            self.snapshots.append((finished, snap))

    def baseline(self) -> None:
        """Object counts before the search starts. (``gc.get_objects`` is only called
        while no other thread runs Python: a tuple another thread is still building
        would be handed out too, and that thread would fail with a SystemError.)"""
        self.first_counts = self._counts()

    def report(self, finished: int) -> dict[str, Any]:
        """Everything recorded; object counts grown from before the search to after it
        (``finished`` trials; the outcome the search builds at its end is included)."""
        gc.collect()
        base, counts = self.first_counts or Counter(), self._counts()
        grown = {k: counts[k] - base.get(k, 0) for k in counts}
        out: dict[str, Any] = {
            "series": self.series,
            "objects_grown_per_finished_trial": {
                k: round(v / max(finished, 1), 2)
                for k, v in sorted(grown.items(), key=lambda kv: -kv[1])[: 2 * self.top]},
        }
        keys = sorted({k for r in self.series for k in r} - {"finished"})
        for key in keys:
            pts = [(r["finished"], r[key]) for r in self.series if key in r]
            if len(pts) >= 6:
                out[f"slope_{key}"] = fit_slope(pts)
        if len(self.snapshots) == 2:
            (n0, first), (n1, last) = self.snapshots
            out["sites_window"] = [n0, n1]
            out["sites"] = [{"kb_per_trial": s.size_diff / 1024 / (n1 - n0),
                             "blocks_per_trial": s.count_diff / (n1 - n0),
                             "where": s.traceback.format(most_recent_first=True)}
                            for s in last.compare_to(first, "traceback")[: self.top]]
        return out


def _config(trials: int, seed: int) -> Any:
    """A search whose ASHA trials are tiny and whose budget buys about ``trials`` of them."""
    from search.settings import ResourceConfig, SearchConfig
    from trainers.data import DataConfig, SyntheticConfig

    data = DataConfig(name="synthetic", synthetic=SyntheticConfig(
        n_rows=2_000, n_cat_fields=4, cardinality=10, seed=seed))
    trial_flops = 4e7
    # ASHA (rf 3, grace = trial/9) stops many trials at its first rung; with these tiny
    # trials (and the reference models' share) a trial costs ~0.75 trial_flops of budget
    return SearchConfig(name=f"driver-memory-{seed}", space="unified", data=data,
                        budget_flops=trials * 0.75 * trial_flops, trial_flops=trial_flops,
                        max_flops_per_example=2e4, reports_per_grace=1, eval_max_examples=200,
                        max_concurrent=2, seed=seed, resources=ResourceConfig(gpus="off"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=220,
                        help="about how many trials the budget buys (>= 200 for the figure)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-trial-history", action="store_true",
                        help="switch the product's trimming of finished trials off")
    parser.add_argument("--debug", action="store_true",
                        help="also record Tune's cached trial JSON, log_once keys, object counts")
    parser.add_argument("--trace", action="store_true",
                        help="with --debug, also trace the Python heap (slow)")
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", default="bench/results/driver_memory.json")
    args = parser.parse_args()

    import ray
    from ray.tune.logger import TBXLoggerCallback

    import search.monitor as monitor
    import search.runner as runner
    from search.searcher import BudgetedOptunaSearch
    from trainers.data import load_dataset

    diagnostics = (_Diagnostics(trace=args.trace, window=(args.trials // 2, args.trials))
                   if args.debug else None)

    class Sampled(monitor.DriverMemory):
        """The product's sampler, plus the bench's diagnostics at the same moments."""

        def _sample(self, trials: list[Any]) -> None:
            super()._sample(trials)
            if diagnostics is not None:
                diagnostics.sample(self.samples[-1][0], trials)

    # The bench swaps two names the runner builds its callbacks from; the search is
    # otherwise exactly the product's (no resume here, so the classes are never pickled).
    runner.DriverMemory = Sampled  # type: ignore[misc]
    if args.keep_trial_history:
        class KeepAll(monitor.TrimFinishedTrials):
            def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                                  **info: Any) -> None:
                return None

        runner.TrimFinishedTrials = KeepAll  # type: ignore[misc]
        BudgetedOptunaSearch.forget_finished = False
        runner.NoTensorBoardEvents = TBXLoggerCallback  # type: ignore[misc]  # Tune's own

    label = args.label or ("untrimmed" if args.keep_trial_history else "trimmed")
    cfg = _config(args.trials, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="rsmem"))
    ds = load_dataset(cfg.data, cache_dir=tmp / "cache")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=str(tmp / "ray-tmp"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    if diagnostics is not None:
        diagnostics.baseline()
    t0 = time.perf_counter()
    out = runner.run_search(cfg, tracking_uri=uri, storage=tmp / "ray", verbose=0, dataset=ds)
    wall = time.perf_counter() - t0
    ray.shutdown()
    samples = out.driver_rss_mb
    fit = fit_slope(samples)
    t = out.trials
    row: dict[str, Any] = {
        "label": label, "trimming": not args.keep_trial_history, "seed": args.seed,
        # glibc's per-thread malloc arenas: memory freed in one thread's arena is not
        # reused by another's, which shows in RSS and not in the Python heap
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "trials": len(t), "finished_trials": samples[-1][0] if samples else 0,
        "wall_s": wall, "spent_flops": out.spent_flops, "budget_flops": cfg.budget_flops,
        "rss_mb_first": samples[0][1], "rss_mb_last": samples[-1][1],
        "slope_mb_per_trial": fit["slope"], "slope_se": fit["se"],
        "slope_ci95": [fit["lo"], fit["hi"]], "fit_points": fit["n"],
        "fit_range": [fit["x_from"], fit["x_to"]],
        "slope_all_mb_per_trial": fit_slope(samples, skip_fraction=0.0)["slope"],
        "target_mb_per_trial": TARGET_MB_PER_TRIAL,
        "meets_target": fit["hi"] <= TARGET_MB_PER_TRIAL,
        "trial_peak_rss_mb": float(t["peak_rss_mb"].max()) if "peak_rss_mb" in t else None,
        "driver_rss_mb": samples,
        "settings": json.loads(cfg.model_dump_json()),
    }
    if diagnostics is not None:
        row["debug"] = diagnostics.report(row["finished_trials"])
    print(json.dumps({k: v for k, v in row.items()
                      if k not in ("driver_rss_mb", "settings", "debug")}), flush=True)
    if diagnostics is not None:
        debug = row["debug"]
        print(json.dumps({k: v for k, v in debug.items() if k.startswith("slope_")}))
        print(json.dumps(debug["objects_grown_per_finished_trial"]))
        for site in debug.get("sites", []):
            print(f"{site['kb_per_trial']:8.2f} KB/trial {site['blocks_per_trial']:7.1f} blocks/trial")
            print("\n".join("      " + line for line in site["where"]))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    runs[label] = row
    path.write_text(json.dumps({"target_mb_per_trial": TARGET_MB_PER_TRIAL, "runs": runs},
                               indent=1))


if __name__ == "__main__":
    main()
