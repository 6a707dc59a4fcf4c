"""``recscale analyze`` and ``recscale export`` (the command-line glue of analysis)."""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.export import export_config
from analysis.report import build_report, log_report_to_mlflow
from analysis.runs import load_search

__all__ = ["analyze", "export", "export_best", "write_report"]


def write_report(name: str, tracking_uri: str | None, out_dir: str | Path,
                 max_flops_per_example: float | None = None,
                 budget_flops: float | None = None) -> Path:
    """Build the report of search ``name`` and log it to its parent MLflow run."""
    runs = load_search(name, tracking_uri)
    cap = max_flops_per_example or runs.settings.get("max_flops_per_example")
    budget = budget_flops or runs.settings.get("budget_flops")
    result = build_report(runs, out_dir, max_flops_per_example=cap, budget_flops=budget)
    if runs.parent_run_id and runs.tracking_uri:
        log_report_to_mlflow(result, runs.parent_run_id, runs.tracking_uri)
    return result.out_dir


def export_best(name: str, tracking_uri: str | None, output: str | Path,
                max_flops_per_example: float | None = None,
                budget_flops: float | None = None) -> Path:
    runs = load_search(name, tracking_uri)
    export_config(runs, output, max_flops_per_example=max_flops_per_example,
                  budget_flops=budget_flops)
    return Path(output)


def analyze(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("reports") / args.name)
    report = write_report(args.name, args.tracking_uri, out, args.max_flops_per_example,
                          args.budget_flops)
    print(f"report: {report / 'report.html'} (+ PNG figures, summary.json); logged to the "
          f"search's parent run in MLflow")
    return 0


def export(args: argparse.Namespace) -> int:
    path = export_best(args.name, args.tracking_uri, args.output, args.max_flops_per_example,
                       args.budget_flops)
    print(f"exported {path}; train it with: recscale train {path}")
    return 0
