"""recscale analysis: runs from MLflow, Pareto frontiers, scaling-law fits, report, export."""

from analysis.fits import JointFit, PowerLawFit, fit_joint, fit_power_law
from analysis.frontier import compute_frontier, pareto_front
from analysis.runs import AnalysisError, SearchRuns, load_search, runs_from_frames

__all__ = [
    "AnalysisError",
    "JointFit",
    "PowerLawFit",
    "SearchRuns",
    "compute_frontier",
    "fit_joint",
    "fit_power_law",
    "load_search",
    "pareto_front",
    "runs_from_frames",
]
