"""The contracts every package relies on, declared once (ARCHITECTURE.md).

Nothing else in recscale spells these names: the training loop, the Ray trainable, the
MLflow writer (``search.tracking``), the MLflow reader (``analysis.runs``), the report
and export all import them from here. The module is pure Python (no torch, Ray or
MLflow), so the command line can import it for free.

* **Metrics** every trial reports, with the same names in Ray, MLflow and analysis;
  :data:`OBJECTIVE` (minimised) is what the searcher optimises and ASHA prunes on.
* **MLflow layout**: one experiment per search, a parent run tagged
  ``recscale.kind=search``, one nested child run per trial tagged ``recscale.kind=trial``;
  metric steps are :data:`STEP_AXIS` (training FLOPs spent, so MLflow's default charts
  draw loss against compute); per-trial constants (:data:`CONSTANT_METRICS`) are logged
  once, at step 0; the search's own numbers on the parent carry the :data:`SEARCH_PREFIX`;
  the parent names the winner (:data:`TAG_BEST_RUN`, ...) and the experiment opens in
  MLflow's machine-learning mode (:data:`TAG_EXPERIMENT_KIND`).
* **A trial's result** is its *last* report (:data:`RESULT_REPORT`): every metric of the
  row (loss, AUC, FLOPs) comes from that one report, in Ray's table, MLflow, the report
  and export alike. The last report is the model the trial ended with (its checkpoint)
  and what ASHA judged it on; the lowest loss over a trial's history would pick one
  evaluation's noise.
* **Tracking URI rule**: the flag, else ``MLFLOW_TRACKING_URI``, else SQLite in the
  working directory (:func:`default_tracking_uri`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final, Literal

from spaces.errors import UserError

__all__ = [
    "BEST_PREFIX",
    "BUDGET_ATTR",
    "CONFIG_ARTIFACT",
    "CONSTANT_METRICS",
    "EXPERIMENT_KIND_ML",
    "RESULT_REPORT",
    "SEARCH_ARTIFACT",
    "DATA_ARTIFACT",
    "SEARCHER_ARTIFACT",
    "SEARCH_PREFIX",
    "TAG_BEST_BLOCK",
    "TAG_BEST_RUN",
    "TAG_BEST_TRIAL",
    "TAG_DESCRIPTION",
    "TAG_EXPERIMENT_KIND",
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
    "STOPPED_PREFIX",
    "TAG_BEST_AT",
    "TAG_STOPPED_AT",
    "TAG_BLOCK",
    "TAG_CONFIG",
    "TAG_DATA_FINGERPRINT",
    "TAG_KIND",
    "TAG_NODE",
    "TAG_PARENT",
    "TAG_REFERENCE",
    "REFERENCE_TRIAL_PREFIX",
    "LIFT_AGAINST",
    "LIFT_QUANTITIES",
    "VAL_SET_METRICS",
    "TAG_SEARCH",
    "TAG_STATUS",
    "TAG_STORAGE",
    "TAG_TRIAL_ID",
    "TAG_VIEW",
    "VIEW_COLUMNS",
    "VIEW_KEY",
    "TIME_ATTR",
    "TRIAL_STATUSES",
    "LOST_FLOPS",
    "VAL_SE",
    "VAL_LOSSES_DIR",
    "WORK_ATTR",
    "artifact_location",
    "cache_dir",
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
# the step of every metric series in MLflow: training FLOPs spent (an int64 holds 9e18)
STEP_AXIS: Final = TIME_ATTR
#: Which report of a trial is its result (module docstring): the last one.
RESULT_REPORT: Final[Literal["last"]] = "last"

#: Every metric a trial reports, in the order reports show them.
METRICS: Final[tuple[str, ...]] = (
    "val_logloss", "val_auc", "val_ne", "train_loss", "examples_seen", "train_flops",
    "flops_per_example", "params_dense", "params_embedding", "examples_per_s",
)

#: The standard error of ``val_logloss`` over the fixed validation examples (standard
#: deviation of the per-example loss over sqrt(n)), logged with every search report, so
#: the noise of the number ASHA compares is stated beside it.
VAL_SE: Final = "val_logloss_se"
#: A trial's per-example validation losses at each ASHA milestone report, as float16
#: ``.npy`` artifacts ``val_losses/<train_flops>.npy`` of its run: two trials' arrays
#: give the *paired* standard error of the loss difference ASHA cut on.
VAL_LOSSES_DIR: Final = "val_losses"

#: Metrics constant over a trial: logged once (step 0), not at every report.
CONSTANT_METRICS: Final[tuple[str, ...]] = ("flops_per_example", "params_dense", "params_embedding")

#: A trial's final status (the ``status`` tag of its child run). ``LOST``: a trial the
#: driver started after its last saved experiment state and then died; Tune does not
#: know it on resume, so its run is closed (MLflow status KILLED) and its work counted
#: as spent.
TRIAL_STATUSES: Final[tuple[str, ...]] = ("COMPLETED", "STOPPED", "DIVERGED", "ERROR", "LOST")
#: Training FLOPs spent that no trial Tune knows accounts for: the work of trials
#: ``LOST`` to a driver kill. On the parent run, with the search prefix.
LOST_FLOPS: Final = "lost_flops"
#: What a trial has cost so far, in training FLOPs: its ``train_flops`` plus every
#: segment it trained again after a restore or a retry (from its checkpoint up to the
#: point it had reached). Reported and logged with every report (>= ``train_flops``);
#: the budget counts it, not ``train_flops`` (``search.budget``).
WORK_ATTR: Final = "work_flops"

# --- MLflow layout -------------------------------------------------------------------

TAG_KIND: Final = "recscale.kind"          # search | trial | train | study | verify
TAG_SEARCH: Final = "recscale.search"      # the search (experiment) name
TAG_CONFIG: Final = "recscale.config"      # settings/config JSON of runs made before search.json
TAG_STORAGE: Final = "recscale.storage"    # where Ray Tune keeps the search's state
TAG_DATA_FINGERPRINT: Final = "recscale.data_fingerprint"
TAG_PARENT: Final = "mlflow.parentRunId"   # MLflow's own nesting tag
TAG_TRIAL_ID: Final = "trial_id"
TAG_BLOCK: Final = "block"
TAG_STATUS: Final = "trial_status"      # a trial's outcome; MLflow's run status is another
TAG_BEST_RUN: Final = "recscale.best_run_id"      # on the parent: the winning trial's run
TAG_BEST_TRIAL: Final = "recscale.best_trial_id"
TAG_BEST_BLOCK: Final = "recscale.best_block"
TAG_DESCRIPTION: Final = "mlflow.note.content"    # MLflow's run description
# MLflow 3.17's UI reads this experiment tag: "custom_model_development" opens the
# machine-learning mode (runs, charts) instead of the GenAI one (traces, evaluations)
TAG_EXPERIMENT_KIND: Final = "mlflow.experimentKind"
EXPERIMENT_KIND_ML: Final = "custom_model_development"
#: MLflow 3.17's shared views: an experiment tag ``mlflow.sharedViewState.<key>`` holds
#: a runs-table state that ``?viewStateShareKey=<key>`` opens. recscale's view shows the
#: trial's result and identity instead of MLflow's Dataset / Source / Models columns.
VIEW_KEY: Final = "recscale"
TAG_VIEW: Final = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_COLUMNS: Final[tuple[str, ...]] = (
    *(f"metrics.`{m}`" for m in (OBJECTIVE, "val_auc", TIME_ATTR, "flops_per_example")),
    f"tags.`{TAG_BLOCK}`", f"tags.`{TAG_STATUS}`",
)

#: The search's own numbers on the parent run (``search.spent_flops``, ...), so they
#: form their own group in MLflow and never read as trial metrics.
SEARCH_PREFIX: Final = "search."
#: A trial's full typed config, as a JSON artifact of its run.
CONFIG_ARTIFACT: Final = "config.json"
#: A search's settings (``SearchConfig``), as a JSON artifact of its parent run.
SEARCH_ARTIFACT: Final = "search.json"
#: The search's data, as a JSON artifact of its parent run: the dataset fingerprint and,
#: per split, rows, positives and base rate (``EncodedDataset.split_stats``).
DATA_ARTIFACT: Final = "data.json"
#: What the search's searcher was told, as a JSON artifact of its parent run, written at
#: the end: ``completed`` (the trial ids told as finished) and ``rejected`` (samples).
SEARCHER_ARTIFACT: Final = "searcher.json"
TAG_NODE: Final = "ray.node_id"

#: A reference model's child run (logistic regression, factorization machine: trained
#: first by every search, never searched) carries this tag set to ``"true"``; its trial
#: id is :data:`REFERENCE_TRIAL_PREFIX` + its family (``reference-logreg``), so a reader
#: that sees only trial ids tells references from searched trials too.
TAG_REFERENCE: Final = "recscale.reference"
REFERENCE_TRIAL_PREFIX: Final = "reference-"
#: The parent run's lift numbers: ``search.lift.<against>.<quantity>``, ``against`` one of
#: :data:`LIFT_AGAINST` (the base rate: predicting the training click rate; the best
#: reference), ``quantity`` one of :data:`LIFT_QUANTITIES` (``logloss``: the baseline's
#: val log loss minus the best searched model's, positive when the model is better;
#: ``auc``: the model's val AUC minus the baseline's; ``*_se`` their standard errors;
#: ``paired``: 1 when the SEs are paired over the same validation examples).
LIFT_AGAINST: Final[tuple[str, ...]] = ("base_rate", "reference")
LIFT_QUANTITIES: Final[tuple[str, ...]] = (
    "logloss", "logloss_se", "auc", "auc_se", "baseline_logloss", "baseline_auc", "paired")
#: The parent run's description of the fixed validation set and the base rate:
#: ``search.val_examples``, ``search.val_positives``, ``search.base_rate`` (training
#: click rate), ``search.base_rate_val_logloss`` (its log loss on that set) and
#: ``search.base_rate_val_logloss_se`` (that loss's standard error).
VAL_SET_METRICS: Final[tuple[str, ...]] = (
    "val_examples", "val_positives", "base_rate", "base_rate_val_logloss",
    "base_rate_val_logloss_se")
#: ``recscale train`` keeps the best evaluation's weights and says where it was and
#: where training stopped: metrics ``best.val_logloss``, ``best.examples_seen``,
#: ``best.epoch``, ... and ``stopped.examples_seen``, ... on the train run, and the
#: same in words in these tags.
BEST_PREFIX: Final = "best."
STOPPED_PREFIX: Final = "stopped."
TAG_BEST_AT: Final = "recscale.best_at"
TAG_STOPPED_AT: Final = "recscale.stopped_at"

KIND_SEARCH: Final = "search"
KIND_TRIAL: Final = "trial"
KIND_TRAIN: Final = "train"
KIND_STUDY: Final = "study"
KIND_VERIFY: Final = "verify"


def default_tracking_uri(uri: str | None = None) -> str:
    """The tracking-URI rule: the flag, else ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def _sqlite_path(uri: str) -> str | None:
    """The file a ``sqlite:///`` URI names (relative to the working directory when the
    URI holds a relative path, as SQLAlchemy reads it), else None."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        return path or None
    return None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite tracking store, in
    ``<store's directory>/mlartifacts/<experiment>``, so runs of any working directory
    keep their artifacts with their store (MLflow's default is ``./mlruns`` of the
    process that creates the experiment); None (the server's or MLflow's default) for
    any other store.

    Example:
        >>> artifact_location("sqlite:////data/mlflow.db", "ml-unified")
        '/data/mlartifacts/ml-unified'
    """
    path = _sqlite_path(uri)
    if path is None:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(path)), "mlartifacts", experiment)


def missing_store(uri: str) -> str | None:
    """The path of a SQLite store that ``uri`` names but that does not exist (MLflow would
    create an empty one on first use), else None."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path and not os.path.exists(path):
            return path
    return None


def cache_dir() -> Path:
    """Where recscale caches what it can rebuild (encoded datasets, the config-key
    schema): ``$RECSCALE_CACHE`` if set, else ``~/.cache/recscale``."""
    env = os.environ.get("RECSCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "recscale"
