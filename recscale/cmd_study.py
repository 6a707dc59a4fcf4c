"""``recscale scale`` and ``recscale verify``: the command-line layer of scaling studies.

    recscale scale  --name tm --data movielens-1m --families tokenmixer \\
                    --min-budget 1e11 --n-budgets 4 --ratio 4 [--target-flops 1.6e13]
    recscale verify tm [--budget-flops 1.6e13] [--max-flops-per-example 5e5]
    recscale scale  --name k --families attention --seq-lens 0,16,64 --split user_temporal \\
                    --min-budget 1e12     (history length K as a scaling axis: one series per K)

Only argparse here; Ray, MLflow, torch and SciPy are imported inside the handlers. Bad
input raises :class:`search.study.StudyError` (a ``trainers.contracts.UserError``), which
the ``recscale`` entry point prints as one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parsers", "cmd_scale", "cmd_verify"]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(flag: str, text: str, least: int = 1) -> tuple[int, ...]:
    """A comma-separated list of integers ``>= least``, or one line naming ``flag``."""
    from search.study import StudyError

    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < least:
        kind = "positive integers" if least == 1 else f"integers >= {least}"
        raise StudyError(f"scale: {flag} takes comma-separated {kind}, got {text!r}")
    return out


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``scale`` and ``verify`` on the ``recscale`` sub-command parser."""
    s = sub.add_parser("scale", help="isoFLOP scaling study: a budget ladder x sizes, "
                                     "each trained for D = C/(3N)")
    s.add_argument("--name", required=True, help="study name = MLflow experiment")
    s.add_argument("--data", default="movielens-1m",
                   help="movielens-1m, synthetic, or a .csv/.parquet file (with --schema)")
    s.add_argument("--schema", default=None, help="schema YAML of a data file (docs/data.md)")
    s.add_argument("--split", choices=["random", "temporal", "user_temporal"], default=None,
                   help="default random; user_temporal is the protocol for histories")
    s.add_argument("--seq-lens", default=None,
                   help="comma-separated history lengths K (e.g. 0,16,64): every family is "
                        "studied at every K as its own series (loss vs K at equal FLOPs); "
                        "K > 0 loads the data with behaviour histories")
    s.add_argument("--max-rows", type=int, default=None, help="MovieLens subsample")
    s.add_argument("--synthetic-rows", type=int, default=None, help="synthetic teacher rows")
    s.add_argument("--families", default="tokenmixer", help="comma-separated block families")
    s.add_argument("--budgets", default=None, help="comma-separated training FLOPs per point")
    s.add_argument("--min-budget", type=float, default=1e10, help="smallest budget of the ladder")
    s.add_argument("--n-budgets", type=int, default=4)
    s.add_argument("--ratio", type=float, default=4.0, help="ladder step")
    s.add_argument("--sizes", type=int, default=5, help="model sizes per budget and family")
    s.add_argument("--span", type=float, default=16.0, help="largest/smallest N per budget")
    s.add_argument("--center-ratio", type=float, default=10.0,
                   help="D/N guessed at the optimum (centres the sizes)")
    s.add_argument("--widths", default=None,
                   help="comma-separated d_model values sizes are drawn from")
    s.add_argument("--depths", default=None,
                   help="comma-separated n_layers values (one value: sizes differ in width only)")
    s.add_argument("--n-tokens", type=int, default=None, help="frame: grouped tokens")
    s.add_argument("--embed-dim", type=int, default=None, help="frame: embedding width")
    s.add_argument("--head-hidden", default=None,
                   help="frame: comma-separated head MLP widths")
    s.add_argument("--eval-examples", type=int, default=None,
                   help="validation examples each point is scored on")
    s.add_argument("--lr", default="3e-3", help="learning rate, or a comma list (grid per size)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--max-epochs", type=float, default=None,
                   help="refuse points needing more passes over the training split")
    s.add_argument("--target-flops", type=float, default=None,
                   help="budget to answer for (default 10x the largest)")
    s.add_argument("--max-flops-per-example", type=float, default=None, help="serving cap")
    s.add_argument("--max-concurrent", type=int, default=2)
    s.add_argument("--tracking-uri", default=None)
    s.add_argument("--storage", default=None, help="Ray Tune state (resume)")
    s.add_argument("-o", "--out", default=None, help="report directory (default NAME_study/)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-v", "--verbose", type=int, default=1)
    s.set_defaults(func=cmd_scale)

    v = sub.add_parser("verify", help="train the predicted compute-optimal config at a "
                                      "target budget, with N*/2 and 2N*")
    v.add_argument("name", help="the study")
    v.add_argument("--budget-flops", type=float, default=None,
                   help="target budget (default 10x the largest studied)")
    v.add_argument("--family", default=None, help="verify this family (default: the pick)")
    v.add_argument("--max-flops-per-example", type=float, default=None, help="serving cap")
    v.add_argument("--tracking-uri", default=None)
    v.add_argument("--storage", default=None)
    v.add_argument("-o", "--out", default=None, help="report directory (default NAME_study/)")
    v.add_argument("-v", "--verbose", type=int, default=1)
    v.set_defaults(func=cmd_verify)


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from search.study import StudyConfig, StudyError, ladder, study_config
    from trainers.data import DataConfig, SyntheticConfig

    try:
        lrs = _floats(args.lr)
        budgets = (_floats(args.budgets) if args.budgets
                   else ladder(args.min_budget, args.n_budgets, args.ratio))
    except ValueError as err:
        raise StudyError(f"scale: {err}") from None
    grid = {k: _ints(f"--{k}", getattr(args, k)) for k in ("widths", "depths")
            if getattr(args, k)}
    frame = {"n_tokens": args.n_tokens, "embed_dim": args.embed_dim,
             "head_hidden": (list(_ints("--head-hidden", args.head_hidden))
                             if args.head_hidden else None)}
    # frame knobs given on the command line replace the study's default frame's
    model = {**StudyConfig.model_fields["model"].get_default(call_default_factory=True),
             **{k: v for k, v in frame.items() if v is not None}}
    extra: dict[str, Any] = {**grid, "model": model}
    if args.eval_examples is not None:
        extra["eval_max_examples"] = args.eval_examples
    seq_lens = _ints("--seq-lens", args.seq_lens, least=0) if args.seq_lens else ()
    fields: dict[str, Any] = {"max_rows": args.max_rows}
    if args.split:
        fields["split"] = args.split
    if any(seq_lens):
        fields["sequences"] = True  # K > 0 needs the histories: no separate flag to forget
    if args.data == "synthetic":
        syn = SyntheticConfig(**({"n_rows": args.synthetic_rows} if args.synthetic_rows else {}))
        fields.update(name="synthetic", synthetic=syn)
    elif args.data == "movielens-1m":
        fields["name"] = args.data
    else:
        if not args.schema:
            raise StudyError(f"scale: --data {args.data}: a CSV/parquet file needs --schema")
        # recorded absolute, as `recscale search` does: verify works from any directory
        fields.update(name="file", path=str(Path(args.data).resolve()),
                      schema_path=str(Path(args.schema).resolve()))
    try:
        data = DataConfig(**fields)
    except ValidationError as err:
        raise StudyError(f"scale: data: {err.errors()[0]['msg']}") from None
    if seq_lens:
        extra["seq_lens"] = seq_lens
    return study_config(
        name=args.name, data=data, families=tuple(f for f in args.families.split(",") if f),
        budgets=budgets, sizes=args.sizes, span=args.span, center_ratio=args.center_ratio,
        train={"batch_size": args.batch_size, "lr": lrs[0] if lrs else 3e-3,
               "optimizer": "adamw_split", "embedding_lr": 1e-2},
        lrs=lrs if len(lrs) > 1 else (), max_epochs=args.max_epochs,
        max_concurrent=args.max_concurrent, seed=args.seed, **extra)


def cmd_scale(args: argparse.Namespace) -> int:
    """Run the study, fit it, write the report, print the table."""
    cfg = _config(args)
    from analysis.isoflop import analyze_study
    from analysis.study_report import build_study_report, table_rows
    from search.study import load_study, run_study

    run_study(cfg, tracking_uri=args.tracking_uri, storage=args.storage, verbose=args.verbose)
    record = load_study(cfg.name, args.tracking_uri)
    fit = analyze_study(record.points, args.target_flops, args.max_flops_per_example,
                        record.n_train, floor_loss=record.floor_loss)
    out = build_study_report(record, fit, None, args.out or f"{cfg.name}_study",
                             log_to_mlflow=True)
    _print(table_rows(fit), out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a study at a target budget and add the points to its report."""
    from analysis.isoflop import analyze_study
    from analysis.study_report import build_study_report, table_rows
    from analysis.verify import run_verify
    from search.study import load_study

    outcome = run_verify(args.name, args.budget_flops, args.tracking_uri, args.storage,
                         args.family, args.max_flops_per_example, verbose=args.verbose)
    record = load_study(args.name, args.tracking_uri)
    fit = analyze_study(record.points, outcome.budget, args.max_flops_per_example,
                        record.n_train, floor_loss=record.floor_loss)
    out = build_study_report(record, fit, outcome, args.out or f"{args.name}_study",
                             log_to_mlflow=True)
    print(outcome.table())
    _print(table_rows(fit, outcome), out)
    return 0


def _print(rows: list[tuple[str, str, str, str]], out: Any) -> None:
    w = max(len(r[0]) for r in rows) if rows else 10
    for q, val, ci, st in rows:
        print(f"{q:<{w}}  {val:>14}  {ci:>24}  {st}")
    print(json.dumps({"report": str(out)}))
