"""The ``recscale`` command line.

    recscale search  --space unified --data movielens-1m --budget-flops 3e13
    recscale ui      [NAME] [--tracking-uri URI] [--port 5000] [--no-browser]
    recscale analyze NAME [-o DIR]
    recscale export  NAME [--max-flops-per-example S] [--budget-flops C] [--force] -o best.yaml
    recscale train   best.yaml [-o DIR]
    recscale demo    (a real search on the embedded defaults, then analysis and export)
    recscale scale   --name S --families tokenmixer --min-budget 1e11   (an isoFLOP study)
    recscale verify  S [--budget-flops C]   (train the predicted compute-optimal size)
    recscale schema  DATA_FILE [-o schema.yaml]   (propose a schema for your own data)

Your own data: a CSV/parquet file and a schema YAML (`--data F --schema S`); the schema
format, splits, vocabularies and the data cache are documented in docs/data.md.

Bad input (a malformed YAML, an unknown block, an infeasible budget, a bad data file)
prints one line ``recscale: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from recscale import cmd_schema, cmd_study, commands
from recscale.commands import CliError

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2


def _env_defaults() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # reading each trial's config.json would print one download bar per trial
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # trials checkpoint at every report (exact resume); Tune would warn on each snapshot
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _add_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="movielens-1m",
                   help="movielens-1m, synthetic, or a .csv/.parquet file (with --schema)")
    p.add_argument("--schema", default=None,
                   help="schema YAML for a user data file: format in docs/data.md; "
                        "`recscale schema FILE` proposes one")
    p.add_argument("--max-rows", type=int, default=None, help="deterministic subsample")
    p.add_argument("--label", choices=["rating>=4", "rating>3"], default=None,
                   help="MovieLens label rule (default rating>=4)")
    p.add_argument("--split", choices=["random", "temporal", "user_temporal"], default=None,
                   help="random (default), temporal (global time order) or user_temporal "
                        "(per user: latest 10%% test, the 10%% before val; the protocol for "
                        "behaviour histories)")
    p.add_argument("--sequences", action="store_true",
                   help="build behaviour histories (needs user, item and time columns; "
                        "docs/data.md) so configs with model.seq_len = K > 0 can train")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--min-count", type=int, default=None,
                   help="categorical values seen fewer times in train share the OOV id "
                        "(default 1; a schema's vocab.<field>.min_count overrides it)")
    p.add_argument("--hash-buckets", type=int, default=None,
                   help="hash a categorical field with a larger train vocabulary into this "
                        "many buckets; 0 never hashes (default 131072; docs/data.md)")


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
    s.add_argument("--startup-trials", type=int, default=None,
                   help="trials TPE samples at random before it models the results "
                        "(default: a fifth of the ~2*budget/trial_flops trials ASHA runs, at least 6)")
    s.add_argument("--trial-patience", type=int, default=None,
                   help="end a trial after this many evaluations in a row without a lower "
                        "val_logloss (0: never; default 3)")
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
    s.set_defaults(func=commands.cmd_search)

    t = sub.add_parser("train", help="train one config (e.g. an exported best.yaml) to completion")
    t.add_argument("config")
    t.add_argument("-o", "--out", default=None, help="output directory (model, checkpoint)")
    t.add_argument("--experiment", default="recscale-train", help="MLflow experiment name")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true")
    _add_tracking(t)
    t.set_defaults(func=commands.cmd_train)

    u = sub.add_parser("ui", help="MLflow UI on 127.0.0.1, opened on a search's runs "
                                  "(machine-learning mode)")
    u.add_argument("name", nargs="?", default=None,
                   help="the search to open (default: the one that started last)")
    u.add_argument("--no-browser", action="store_true", help="print the address only")
    _add_tracking(u)
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(func=commands.cmd_ui)

    a = sub.add_parser("analyze", help="Pareto frontiers, scaling fits and a report of a search")
    a.add_argument("name")
    _add_tracking(a)
    a.add_argument("-o", "--out", default=None, help="report directory (default reports/NAME)")
    a.add_argument("--max-flops-per-example", type=float, default=None)
    a.add_argument("--budget-flops", type=float, default=None)
    a.set_defaults(func=commands.cmd_analyze)

    e = sub.add_parser("export", help="export the best (or compute-optimal) config as YAML")
    e.add_argument("name")
    _add_tracking(e)
    e.add_argument("--max-flops-per-example", type=float, default=None)
    e.add_argument("--budget-flops", type=float, default=None,
                   help="size the config compute-optimally for this training budget")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--force", action="store_true",
                   help="export even a model that does not beat the base rate by 2 SE")
    e.set_defaults(func=commands.cmd_export)

    d = sub.add_parser("demo", help="a real search on the embedded defaults, then report and export")
    d.add_argument("--quick", action="store_true", help="synthetic data, tiny budget (smoke test)")
    d.add_argument("--out", default="demo_out")
    _add_tracking(d)
    d.set_defaults(func=commands.cmd_demo)
    cmd_study.add_parsers(sub)  # scale, verify
    cmd_schema.add_parser(sub)
    return parser


def _user_error(err: BaseException) -> str | None:
    """The one-line message of an error that is the user's input, else None.

    Every package's user-facing error derives from ``trainers.contracts.UserError``; by
    the time one is raised its module is imported, so checking costs nothing.
    """
    if isinstance(err, CliError | FileNotFoundError):
        return " ".join(str(err).split())
    if type(err).__name__ == "ValidationError" and type(err).__module__.startswith("pydantic"):
        from trainers.experiment import validation_message

        return " ".join(validation_message(err, "config").split())
    contracts = sys.modules.get("trainers.contracts")
    if contracts is not None and isinstance(err, contracts.UserError):
        return " ".join(str(err).split())
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recscale`` console script."""
    _env_defaults()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt as err:
        print(f"recscale: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        print(f"recscale: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
