"""Every block family against a logistic regression on MovieLens-1M, same loop.

Label rating >= 4, random 80/10/10 split, seed 0. Each config in
``bench/configs/movielens/`` trains with ``trainers.loop.train`` for up to 3 epochs,
evaluating on the validation split every half epoch; a run stops early once val
log loss has not improved for two evaluations. We record the best evaluation.

    .venv/bin/python bench/movielens.py [--families ...] [--threads 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from trainers.data import load_dataset
from trainers.experiment import load_experiment
from trainers.loop import TrainConfig, train

CONFIGS = Path(__file__).parent / "configs" / "movielens"


def run(name: str, epochs: float, threads: int) -> dict[str, object]:
    exp = load_experiment(CONFIGS / f"{name}.yaml")
    ds = load_dataset(exp.data)
    n = len(ds.train)
    tc: TrainConfig = exp.train.model_copy(update={"epochs": epochs, "max_examples": None,
                                                   "eval_every": n // 2})
    torch.set_num_threads(threads)
    best: dict[str, float] = {}
    stale = [0]

    def report(m: dict[str, float], state: object) -> bool:
        if not best or m["val_logloss"] < best["val_logloss"]:
            best.clear()
            best.update(m)
            stale[0] = 0
        else:
            stale[0] += 1
        print(f"  {name}: epoch {m['examples_seen'] / n:.1f} val_auc {m['val_auc']:.4f} "
              f"val_logloss {m['val_logloss']:.4f} ({m['examples_per_s']:.0f} ex/s)", flush=True)
        return stale[0] >= 2

    t0 = time.perf_counter()
    result = train(exp.model, tc, ds.spec, ds.train, ds.val, report=report)
    wall = time.perf_counter() - t0
    return {"family": name, "status": result.status, "val_auc": best["val_auc"],
            "val_logloss": best["val_logloss"], "val_ne": best["val_ne"],
            "best_epoch": best["examples_seen"] / n, "params_dense": int(best["params_dense"]),
            "params_embedding": int(best["params_embedding"]),
            "flops_per_example": int(best["flops_per_example"]),
            "examples_per_s": best["examples_per_s"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", nargs="+",
                        default=["logistic_regression", "attention", "tokenmixer", "wukong",
                                 "unimixing", "unimixing_lite"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--out", default="bench/results/movielens.json")
    args = parser.parse_args()
    rows = []
    for name in args.families:
        rows.append(run(name, args.epochs, args.threads))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| family | val AUC | val logloss | val NE | best epoch | dense params | embedding params "
          "| FLOPs/example | examples/s | wall s |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['val_auc']:.4f} | {r['val_logloss']:.4f} | {r['val_ne']:.4f} "
              f"| {r['best_epoch']:.1f} | {r['params_dense']:,} | {r['params_embedding']:,} "
              f"| {r['flops_per_example']:,} | {r['examples_per_s']:,.0f} | {r['wall_s']:.0f} |")
    out = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
           "torch": torch.__version__, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
