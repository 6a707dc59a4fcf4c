"""The contracts every package relies on, declared once (ARCHITECTURE.md).

Nothing else in recscale spells these names: the training loop, the Ray trainable, the
MLflow writer (``search.tracking``), the MLflow reader (``analysis.runs``), the report
and export all import them from here. The module is pure Python (no torch, Ray or
MLflow), so the command line can import it for free.

* **Metrics** every trial reports, with the same names in Ray, MLflow and analysis;
  :data:`OBJECTIVE` (minimised) is what the searcher optimises and ASHA prunes on.
* **MLflow layout**: one experiment per search, a parent run tagged
  ``recscale.kind=search``, one nested child run per trial tagged ``recscale.kind=trial``;
  metric steps are :data:`STEP_AXIS` (examples seen).
* **Tracking URI rule**: the flag, else ``MLFLOW_TRACKING_URI``, else SQLite in the
  working directory (:func:`default_tracking_uri`).
"""

from __future__ import annotations

import os
from typing import Final, Literal

from spaces.errors import UserError

__all__ = [
    "BUDGET_ATTR",
    "UserError",
    "KIND_SEARCH",
    "KIND_STUDY",
    "KIND_TRAIN",
    "KIND_TRIAL",
    "KIND_VERIFY",
    "METRICS",
    "OBJECTIVE",
    "OBJECTIVE_MODE",
    "SECONDARY_OBJECTIVE",
    "STEP_AXIS",
    "TAG_BLOCK",
    "TAG_CONFIG",
    "TAG_DATA_FINGERPRINT",
    "TAG_KIND",
    "TAG_NODE",
    "TAG_PARENT",
    "TAG_SEARCH",
    "TAG_STATUS",
    "TAG_STORAGE",
    "TAG_TRIAL_ID",
    "TIME_ATTR",
    "TRIAL_STATUSES",
    "default_tracking_uri",
    "missing_store",
]

# --- metrics -------------------------------------------------------------------------

OBJECTIVE: Final = "val_logloss"
OBJECTIVE_MODE: Final[Literal["min"]] = "min"
# the second objective of ``--objective multi`` (serving cost, minimised)
SECONDARY_OBJECTIVE: Final = "flops_per_example"
# ASHA's time axis and the budget's unit: cumulative training FLOPs of a trial
TIME_ATTR: Final = "train_flops"
BUDGET_ATTR: Final = TIME_ATTR
# the step of every metric series in MLflow
STEP_AXIS: Final = "examples_seen"

#: Every metric a trial reports, in the order reports show them.
METRICS: Final[tuple[str, ...]] = (
    "val_logloss", "val_auc", "val_ne", "train_loss", "examples_seen", "train_flops",
    "flops_per_example", "params_dense", "params_embedding", "examples_per_s",
)

#: A trial's final status (the ``status`` tag of its child run).
TRIAL_STATUSES: Final[tuple[str, ...]] = ("COMPLETED", "STOPPED", "DIVERGED", "ERROR")

# --- MLflow layout -------------------------------------------------------------------

TAG_KIND: Final = "recscale.kind"          # search | trial | train | study | verify
TAG_SEARCH: Final = "recscale.search"      # the search (experiment) name
TAG_CONFIG: Final = "recscale.config"      # the run's full config as JSON (typed values)
TAG_STORAGE: Final = "recscale.storage"    # where Ray Tune keeps the search's state
TAG_DATA_FINGERPRINT: Final = "recscale.data_fingerprint"
TAG_PARENT: Final = "mlflow.parentRunId"   # MLflow's own nesting tag
TAG_TRIAL_ID: Final = "trial_id"
TAG_BLOCK: Final = "block"
TAG_STATUS: Final = "status"
TAG_NODE: Final = "ray.node_id"

KIND_SEARCH: Final = "search"
KIND_TRIAL: Final = "trial"
KIND_TRAIN: Final = "train"
KIND_STUDY: Final = "study"
KIND_VERIFY: Final = "verify"


def default_tracking_uri(uri: str | None = None) -> str:
    """The tracking-URI rule: the flag, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def missing_store(uri: str) -> str | None:
    """The path of a SQLite store that ``uri`` names but that does not exist (MLflow would
    create an empty one on first use), else None."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path and not os.path.exists(path):
            return path
    return None
