"""Can a team trust the answer? References beside the searched best, and the export
retrained beside the search's record (issue 11).

For each dataset, the path a user takes, through the command line:

    recscale search --data D --budget-flops B --name N   (references trained first)
    recscale export N -o best.yaml
    recscale train best.yaml -o trained/

and from what they leave (the parent MLflow run, ``metrics.json`` of the trained model):
the best reference and the searched best with the lift and its (paired) standard
error, the lift over the base rate, and the export retrained beside the record it was
exported from (target: within one standard error).

    .venv/bin/python bench/trust.py [--only movielens|synthetic] [--budget-movielens 3e12] [--seed 0]

Writes ``bench/results/trust.json``: one entry per dataset, the newest run; a dataset's
earlier runs move to its ``"earlier"`` list (newest first), so a re-run keeps them.
What it does not show: more than one search seed; test-split lift (the lift is on the validation set the search compared on).
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

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "trust.json"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run a command; returns (seconds, peak RSS in MB of it and its children)."""
    t0 = time.perf_counter()
    # the output goes to a file: a pipe read only at the end fills up and blocks the command
    log = cwd / f"{cmd[3]}.log"
    with log.open("wb") as out_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out_file,
                                stderr=subprocess.STDOUT)
    peak = 0.0
    while proc.poll() is None:
        try:
            p = psutil.Process(proc.pid)
            rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(True))
            peak = max(peak, rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(1)
    out = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    print(out[-2500:])
    return time.perf_counter() - t0, peak


def one(name: str, data_args: list[str], budget: float, work: Path, seed: int = 0) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    uri = f"sqlite:///{work / 'mlflow.db'}"
    rc = [sys.executable, "-m", "recscale"]
    search_s, search_mb = _run([*rc, "search", *data_args, "--name", name, "--budget-flops",
                                str(budget), "--tracking-uri", uri, "--gpus", "off", "-v", "0",
                                "--seed", str(seed)],
                               work, env)
    _run([*rc, "export", name, "--tracking-uri", uri, "-o", "best.yaml", "--force"], work, env)
    train_s, train_mb = _run([*rc, "train", "best.yaml", "-o", "trained", "--tracking-uri", uri,
                              "--no-progress"],
                             work, env)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    assert exp is not None
    parent = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'search'")[0]
    m = parent.data.metrics
    trained = json.loads((work / "trained" / "model" / "metrics.json").read_text())
    import yaml

    best = yaml.safe_load((work / "best.yaml").read_text())
    prov = best["provenance"]
    return {
        "run_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_flops": budget, "seed": seed, "spent_flops": m.get("search.spent_flops"),
        "trials": m.get("search.n_trials"), "search_s": round(search_s),
        "search_peak_rss_mb": round(search_mb), "train_s": round(train_s),
        "train_peak_rss_mb": round(train_mb),
        "base_rate": m.get("search.base_rate"),
        "lift": {k[len("search.lift."):]: v for k, v in m.items() if k.startswith("search.lift.")},
        "record": {k: prov.get(k) for k in ("val_logloss", "val_logloss_se", "val_auc",
                                            "examples_seen", "trial_id", "run_id")},
        "trained": {k: trained.get(k) for k in ("val_logloss", "val_auc", "test_logloss",
                                                "test_auc", "status")}
                   | {k: v for k, v in trained.items() if k.startswith(("best", "stopped"))},
        "exported": {"model": best.get("model"), "train": best.get("train")},
        "description": parent.data.tags.get("mlflow.note.content", ""),
    }


def keep(results: dict[str, Any], key: str, new: dict[str, Any]) -> None:
    """Store ``new`` as ``results[key]``; the entry it replaces (with its own earlier
    runs) goes first in ``new["earlier"]``.

    Example:
        >>> r = {"ml": {"val": 1}}
        >>> keep(r, "ml", {"val": 2}); keep(r, "ml", {"val": 3})
        >>> r["ml"]["val"], [e["val"] for e in r["ml"]["earlier"]]
        (3, [2, 1])
    """
    old = results.get(key)
    if old is not None:
        earlier = old.pop("earlier", [])
        new["earlier"] = [old, *earlier]
    results[key] = new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["movielens", "synthetic"], default=None)
    ap.add_argument("--budget-movielens", type=float, default=3e12)
    ap.add_argument("--budget-synthetic", type=float, default=3e11)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0, help="the search's seed (recscale search --seed)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="trust"))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.only in (None, "movielens"):
        keep(results, "movielens-1m", one("trust-ml", ["--data", "movielens-1m"],
                                          args.budget_movielens, work / "movielens", args.seed))
    if args.only in (None, "synthetic"):
        keep(results, "synthetic", one("trust-syn", ["--data", "synthetic", "--max-rows", "100000"],
                                        args.budget_synthetic, work / "synthetic", args.seed))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
