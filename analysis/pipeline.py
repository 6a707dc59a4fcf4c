"""The analysis steps the command line and the demo run: report, then export."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from analysis.export import export_config
from analysis.lift import ExportRefused, export_check, model_lift, without_references
from analysis.report import build_report, log_report_to_mlflow, select_best
from analysis.runs import SearchRuns, load_search

__all__ = ["export_best", "write_report"]


def write_report(name: str, tracking_uri: str | None, out_dir: str | Path,
                 max_flops_per_example: float | None = None,
                 budget_flops: float | None = None) -> Path:
    """Build the report of search ``name`` (and its ``best.yaml``) and attach both to
    its parent MLflow run, whose description then says where the report is."""
    runs = load_search(name, tracking_uri)
    cap = max_flops_per_example or runs.settings.get("max_flops_per_example")
    budget = budget_flops or runs.settings.get("budget_flops")
    result = build_report(runs, out_dir, max_flops_per_example=cap, budget_flops=budget)
    best_yaml = result.out_dir / "best.yaml"
    export_config(without_references(runs), best_yaml, max_flops_per_example=cap)
    if runs.parent_run_id and runs.tracking_uri:
        log_report_to_mlflow(result, runs.parent_run_id, runs.tracking_uri)
        _describe_parent(runs, result.html, best_yaml)
    return result.out_dir


def _describe_parent(runs: SearchRuns, report: Path, best_yaml: Path) -> None:
    """``best.yaml`` as an artifact of the parent, and the winner (the same rule as the
    search's own: no cap) and the report's place in its description."""
    from mlflow.tracking import MlflowClient

    from trainers.contracts import OBJECTIVE
    from trainers.tracking import Winner, describe_search, log_files, set_winner

    assert runs.parent_run_id is not None
    client = MlflowClient(runs.tracking_uri)
    log_files(client, runs.parent_run_id, [best_yaml])
    best = select_best(runs.trials)
    lift = model_lift(runs, best).sentences()
    winner = Winner(run_id=str(best["run_id"]), trial_id=str(best["trial_id"]),
                    block=str(best["block"]), objective=float(best[OBJECTIVE]),
                    val_auc=float(best.get("val_auc", float("nan"))),
                    train_flops=float(best.get("train_flops", float("nan"))))
    spent = float(runs.trials["train_flops"].fillna(0).sum())
    budget = float(runs.settings.get("budget_flops") or float("nan"))
    set_winner(client, runs.parent_run_id, winner, describe_search(
        runs.name, winner, spent, budget, len(runs.trials), str(report.absolute()), lift))


def _stderr_warning(message: str) -> None:
    print(f"recscale: warning: {message}", file=sys.stderr)


def export_best(name: str, tracking_uri: str | None, output: str | Path,
                max_flops_per_example: float | None = None,
                budget_flops: float | None = None, force: bool = False,
                warn: Callable[[str], None] = _stderr_warning) -> Path:
    """Export the best (or, with ``budget_flops``, compute-optimally sized) config.

    The gate (:func:`analysis.lift.export_check`) runs on the best searched trial (under
    the cap) first: one that does not beat the base rate by more than 2 SE raises
    :class:`~analysis.lift.ExportRefused` unless ``force`` (then it is exported with a
    warning); one that does not beat the best reference model that way is exported and
    ``warn`` is called with one line.
    """
    runs = load_search(name, tracking_uri)
    searched = without_references(runs)
    check = export_check(runs, select_best(searched.trials, max_flops_per_example))
    if check.refusal is not None and not force:
        raise ExportRefused(f"{check.refusal}; not exported (--force to export it anyway)")
    export_config(searched, output, max_flops_per_example=max_flops_per_example,
                  budget_flops=budget_flops)
    # warnings once the export is written: a failed export says one line, its error
    if check.refusal is not None:
        warn(f"{check.refusal}; exported anyway (--force)")
    if check.warning is not None:
        warn(check.warning)
    return Path(output)
