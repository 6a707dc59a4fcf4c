"""The analysis steps the command line and the demo run: report, then export."""

from __future__ import annotations

from pathlib import Path

from analysis.export import export_config
from analysis.report import build_report, log_report_to_mlflow
from analysis.runs import load_search

__all__ = ["export_best", "write_report"]


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
    """Export the best (or, with ``budget_flops``, compute-optimally sized) config."""
    runs = load_search(name, tracking_uri)
    export_config(runs, output, max_flops_per_example=max_flops_per_example,
                  budget_flops=budget_flops)
    return Path(output)
