"""recscale analysis: runs from MLflow, Pareto frontiers, scaling-law fits, report, export."""

from analysis.fits import FitStatus, JointFit, PowerLawFit, fit_joint, fit_power_law
from analysis.frontier import compute_frontier, pareto_front
from analysis.plots import html_figures, png_figures
from analysis.report import (
    ComputeOptimal,
    ReportResult,
    ScalingFits,
    build_report,
    fit_search,
    log_report_to_mlflow,
    recommend_size,
    select_best,
)
from analysis.runs import AnalysisError, SearchRuns, load_search, runs_from_frames

__all__ = [
    "AnalysisError",
    "ComputeOptimal",
    "FitStatus",
    "JointFit",
    "PowerLawFit",
    "ReportResult",
    "ScalingFits",
    "SearchRuns",
    "build_report",
    "compute_frontier",
    "fit_joint",
    "fit_power_law",
    "fit_search",
    "html_figures",
    "load_search",
    "log_report_to_mlflow",
    "pareto_front",
    "png_figures",
    "recommend_size",
    "runs_from_frames",
    "select_best",
]
