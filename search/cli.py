"""The ``recscale`` command line.

    recscale search  --space unified --data movielens-1m --budget-flops 3e13
    recscale ui      [--tracking-uri URI] [--port 5000]
    recscale analyze NAME [-o DIR]
    recscale export  NAME [--max-flops-per-example S] [--budget-flops C] -o best.yaml
    recscale train   best.yaml [-o DIR]
    recscale demo    (a real search on the embedded defaults, then analysis and export)

Bad input (a malformed YAML, an unknown block, an infeasible budget, a bad data file)
prints one line ``recscale: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["main"]

EXIT_USAGE = 2


class CliError(Exception):
    """A one-line, user-facing error."""


def _env_defaults() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # trials checkpoint at every report (exact resume); Tune would warn on each snapshot
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _data_config(args: argparse.Namespace) -> Any:
    from trainers.data import DataConfig

    fields: dict[str, Any] = {"seed": args.data_seed}
    data = args.data
    if data in ("movielens-1m", "synthetic"):
        fields["name"] = data
    else:
        if not args.schema:
            raise CliError(f"--data {data}: a CSV/parquet file needs --schema SCHEMA.yaml")
        fields.update(name="file", path=data, schema_path=args.schema)
    if args.max_rows:
        fields["max_rows"] = args.max_rows
    if args.label:
        fields["label"] = args.label
    if args.split:
        fields["split"] = args.split
    return DataConfig(**fields)


def _search_config(args: argparse.Namespace) -> Any:
    from search.settings import ResourceConfig, SearchConfig

    return SearchConfig(
        name=args.name, space=args.space, data=_data_config(args),
        budget_flops=args.budget_flops, trial_flops=args.trial_flops,
        max_flops_per_example=args.max_flops_per_example, grace_flops=args.grace_flops,
        reduction_factor=args.reduction_factor, searcher=args.searcher,
        scheduler=args.scheduler, objective=args.objective,
        max_concurrent=args.max_concurrent, seed=args.seed,
        reuse_actors=not args.no_reuse_actors,
        resources=ResourceConfig(cpus_per_trial=args.cpus_per_trial, gpus=args.gpus),
    )


def _print_best(outcome: Any, n: int = 10) -> None:
    best = outcome.best(n)
    cols = [c for c in ("trial_id", "model.block", "model.d_model", "model.n_layers",
                        "model.n_tokens", "flops_per_example", "train_flops", "val_logloss",
                        "val_auc", "trial_status") if c in best.columns]
    print(f"\nsearch {outcome.name}: {len(outcome.trials)} trials, spent "
          f"{outcome.spent_flops:.3g} of {outcome.budget_flops:.3g} training FLOPs "
          f"({outcome.rejected_samples} samples rejected before training)")
    if len(best):
        print(best[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"MLflow: {outcome.tracking_uri}  experiment {outcome.name!r} "
          f"(parent run {outcome.parent_run_id}); `recscale ui` to compare trials")


def cmd_search(args: argparse.Namespace) -> int:
    from search.runner import run_search

    cfg = _search_config(args)
    resume: Literal["auto", "always", "never"] = (
        "always" if args.resume else "never" if args.no_resume else "auto")
    outcome = run_search(cfg, tracking_uri=args.tracking_uri, storage=args.storage,
                         address=args.address, resume=resume, verbose=args.verbose)
    _print_best(outcome)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainers.experiment import load_experiment
    from trainers.full import train_full

    exp = load_experiment(args.config)
    out = Path(args.out or Path("recscale_models") / Path(args.config).stem)
    res = train_full(exp, out, tracking_uri=args.tracking_uri, experiment_name=args.experiment,
                     progress=not args.no_progress, resume=args.resume)
    if res.status == "diverged":
        print(f"recscale: training diverged (status DIVERGED); run {res.run_id}", file=sys.stderr)
        return 3
    v, t = res.val, res.test
    print(f"{exp.model.block}: val_auc {v.get('val_auc', float('nan')):.4f} "
          f"val_logloss {v.get('val_logloss', float('nan')):.4f} | test_auc {t['test_auc']:.4f} "
          f"test_logloss {t['test_logloss']:.4f} test_ne {t['test_ne']:.4f} "
          f"({res.seconds:.0f} s); model saved in {res.model_dir}; MLflow run {res.run_id}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from search.tracking import default_tracking_uri

    uri = default_tracking_uri(args.tracking_uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.cli import analyze

    return analyze(args)


def cmd_export(args: argparse.Namespace) -> int:
    from analysis.cli import export

    return export(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from search.demo import demo

    return demo(args)


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="movielens-1m",
                   help="movielens-1m, synthetic, or a .csv/.parquet file (with --schema)")
    p.add_argument("--schema", default=None, help="schema YAML for a user data file")
    p.add_argument("--max-rows", type=int, default=None, help="deterministic subsample")
    p.add_argument("--label", choices=["rating>=4", "rating>3"], default=None,
                   help="MovieLens label rule (default rating>=4)")
    p.add_argument("--split", choices=["random", "temporal"], default=None)
    p.add_argument("--data-seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recscale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="search the model space under a FLOPs budget")
    s.add_argument("--space", default="unified", help="a space YAML, or a bundled name (unified, ...)")
    _add_data(s)
    s.add_argument("--budget-flops", type=float, required=True, help="training FLOPs of the whole search")
    s.add_argument("--trial-flops", type=float, default=None, help="most FLOPs one trial may spend (ASHA max_t)")
    s.add_argument("--max-flops-per-example", type=float, default=None, help="serving-cost cap")
    s.add_argument("--grace-flops", type=float, default=None, help="ASHA grace period in FLOPs")
    s.add_argument("--reduction-factor", type=int, default=3)
    s.add_argument("--searcher", choices=["tpe", "random"], default="tpe")
    s.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    s.add_argument("--objective", choices=["single", "multi"], default="single",
                   help="multi: val_logloss and flops_per_example (NSGA-II)")
    s.add_argument("--name", default="recscale", help="search name = MLflow experiment")
    _add_tracking(s)
    s.add_argument("--storage", default=None, help="Tune state directory (shared on a cluster)")
    s.add_argument("--address", default=None, help="an existing Ray cluster (e.g. auto)")
    s.add_argument("--max-concurrent", type=int, default=2)
    s.add_argument("--cpus-per-trial", type=float, default=1.0)
    s.add_argument("--gpus", choices=["auto", "on", "off"], default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-reuse-actors", action="store_true",
                   help="a fresh Ray actor per trial (spreads trials over a cluster's nodes)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="require an interrupted search to resume")
    g.add_argument("--no-resume", action="store_true", help="refuse to resume an existing search")
    s.add_argument("-v", "--verbose", type=int, default=1, choices=[0, 1, 2])
    s.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="train one config (e.g. an exported best.yaml) to completion")
    t.add_argument("config")
    t.add_argument("-o", "--out", default=None, help="output directory (model, checkpoint)")
    t.add_argument("--experiment", default="recscale-train", help="MLflow experiment name")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true")
    _add_tracking(t)
    t.set_defaults(func=cmd_train)

    u = sub.add_parser("ui", help="MLflow UI for the tracking store, on 127.0.0.1")
    _add_tracking(u)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=cmd_ui)

    a = sub.add_parser("analyze", help="Pareto frontiers, scaling fits and a report of a search")
    a.add_argument("name")
    _add_tracking(a)
    a.add_argument("-o", "--out", default=None, help="report directory (default reports/NAME)")
    a.add_argument("--max-flops-per-example", type=float, default=None)
    a.add_argument("--budget-flops", type=float, default=None)
    a.set_defaults(func=cmd_analyze)

    e = sub.add_parser("export", help="export the best (or compute-optimal) config as YAML")
    e.add_argument("name")
    _add_tracking(e)
    e.add_argument("--max-flops-per-example", type=float, default=None)
    e.add_argument("--budget-flops", type=float, default=None,
                   help="size the config compute-optimally for this training budget")
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="a real search on the embedded defaults, then report and export")
    d.add_argument("--quick", action="store_true", help="synthetic data, tiny budget (smoke test)")
    d.add_argument("--out", default="demo_out")
    _add_tracking(d)
    d.set_defaults(func=cmd_demo)
    return parser


def _one_line(err: BaseException) -> str:
    from trainers.experiment import validation_message

    msg = validation_message(err, "config") if err.__class__.__name__ == "ValidationError" else str(err)
    return " ".join(msg.split())


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, reported as one line (never a traceback)."""
    from pydantic import ValidationError

    from analysis.runs import AnalysisError
    from search.runner import SearchError
    from search.space import SpaceError
    from spaces.blocks import BlockDimensionError, UnknownBlockError
    from trainers.data import DataError
    from trainers.experiment import ConfigError

    return (CliError, ValidationError, ConfigError, SpaceError, DataError, SearchError,
            AnalysisError, UnknownBlockError, BlockDimensionError, FileNotFoundError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recscale`` console script."""
    _env_defaults()
    args = build_parser().parse_args(argv)
    user_errors = _user_errors()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("recscale: interrupted", file=sys.stderr)
        return 130
    except user_errors as err:
        print(f"recscale: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
