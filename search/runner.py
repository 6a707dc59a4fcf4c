"""Run one search: data once, OptunaSearch + ASHA on FLOPs, budget, resources, MLflow.

``run_search`` is what ``recscale search`` calls; tests call it directly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import optuna
import pandas as pd

from search.budget import (
    BudgetPolicy,
    BudgetStopper,
    reported_work,
    set_untracked_spend,
    set_work_floors,
)
from search.checkpoints import prune_finished
from search.checks import ConfigCheck
from search.lock import SearchLock
from search.monitor import (
    DriverMemory,
    NoTensorBoardEvents,
    TrimFinishedTrials,
    short_trial_dirname,
)
from search.references import (
    Lift,
    is_reference,
    is_reference_id,
    reference_rows,
    search_lift,
    train_references,
)
from search.resources import TrialResources
from search.schedulers import make_scheduler, scheduler_milestones
from search.settings import SearchConfig
from search.space import Choice, IntRange, SearchSpace, bundled_space, load_space
from search.tracking import TrialStatusCallback, settle_trial_runs
from trainers.contracts import (
    CONSTANT_METRICS,
    DATA_ARTIFACT,
    LOST_FLOPS,
    METRICS,
    OBJECTIVE,
    OBJECTIVE_MODE,
    SEARCH_ARTIFACT,
    SEARCH_PREFIX,
    SEARCHER_ARTIFACT,
    SECONDARY_OBJECTIVE,
    TAG_DATA_FINGERPRINT,
    TAG_STATUS,
    TAG_STORAGE,
    TAG_TRIAL_ID,
    TIME_ATTR,
    VAL_SE,
    WORK_ATTR,
    UserError,
    default_tracking_uri,
)
from trainers.data import EncodedDataset, load_dataset
from trainers.experiment import flatten
from trainers.tracking import (
    Winner,
    describe_search,
    end_run,
    find_or_create_parent,
    finish_run,
    log_files,
    log_metrics,
    logged_work,
    set_winner,
    trial_runs,
)

__all__ = [
    "SearchError",
    "SearchInterrupted",
    "SearchOutcome",
    "SearchPlan",
    "Tracking",
    "build_tuner",
    "collect_outcome",
    "ensure_feasible",
    "search_winner",
    "open_tracking",
    "plan_search",
    "resolve_space",
    "run_search",
    "trial_costs",
]

log = logging.getLogger(__name__)

SETTINGS_FILE = "recscale_search.json"
# Settings a resumed search must share with the interrupted one.
_RESUME_KEYS = ("space", "data", "budget_flops", "trial_flops", "max_flops_per_example",
                "grace_flops", "reduction_factor", "searcher", "scheduler", "objective", "seed")


class SearchError(UserError):
    """A search that cannot run as asked; the message is one line."""


@dataclass
class SearchOutcome:
    """What a finished search leaves: its trials, budget spent and MLflow ids.

    ``trials`` are the searched trials; ``references`` the reference models trained
    first (``search.references``; their FLOPs are part of ``spent_flops``) and ``lift``
    the winner's lift over them and over the base rate.
    """

    name: str
    trials: pd.DataFrame
    spent_flops: float
    budget_flops: float
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    rejected_samples: int
    driver_rss_mb: list[tuple[int, float]]
    wall_seconds: float
    references: pd.DataFrame = field(default_factory=pd.DataFrame)
    lift: Lift | None = None

    def best(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` best trials by their result (their last report), best first."""
        if self.trials.empty or OBJECTIVE not in self.trials:
            return self.trials
        return self.trials.sort_values(OBJECTIVE, ascending=OBJECTIVE_MODE == "min").head(n)

    def winner(self) -> pd.Series | None:
        """The winning trial's row (:func:`search_winner`)."""
        return search_winner(self.trials)


def search_winner(trials: pd.DataFrame) -> pd.Series | None:
    """The trial with the lowest objective in its result, among the searched trials (not
    the reference models) that neither failed nor diverged; ``None`` if there is none.

    A trial's result is its last report (``trainers.contracts.RESULT_REPORT``): Tune's
    ``last_result``, the latest value of each metric in MLflow. Every column of the row
    (loss, AUC, ``train_flops``) is from that same report.
    """
    if trials.empty or OBJECTIVE not in trials:
        return None
    ok = trials
    if "trial_id" in ok:
        ok = ok[~is_reference(ok["trial_id"])]
    if "error" in ok:
        ok = ok[ok["error"].fillna("").astype(str) == ""]
    if "trial_status" in ok:
        ok = ok[ok["trial_status"] != "diverged"]
    values = pd.to_numeric(ok[OBJECTIVE], errors="coerce")
    ok = ok[values.notna() & values.abs().ne(float("inf"))]
    if ok.empty:
        return None
    return ok.loc[pd.to_numeric(ok[OBJECTIVE]).idxmin()]


def resolve_space(space: str) -> Path:
    """A space file path, or the name of one shipped in ``spaces/`` (``unified``)."""
    path = Path(space)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return bundled_space(space)


def ensure_feasible(space: SearchSpace, check: ConfigCheck, seed: int,
                    draws: int = 400) -> float:
    """Raise ``SearchError`` unless random draws from ``space`` find a trainable config.

    Returns the largest FLOPs/example among the feasible draws.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    feasible, cheapest, largest, reason = 0, float("inf"), 0.0, ""
    for _ in range(draws):
        trial = study.ask()
        flat = space.sample(trial)
        ok, _, why = check(flat)
        study.tell(trial, 0.0)
        if ok:
            feasible += 1
            largest = max(largest, check.try_flops(flat) or 0.0)
        else:
            reason = why
            cost = check.try_flops(flat)
            if cost is not None:
                cheapest = min(cheapest, cost)
    if feasible == 0:
        cap = check.max_flops_per_example
        raise SearchError(
            f"no config in space {space.name!r} fits: cap max_flops_per_example="
            f"{cap if cap is None else f'{cap:.3g}'}, trial_flops={check.trial_flops:.3g}; "
            f"cheapest sampled config costs {cheapest:.3g} FLOPs/example (last reason: {reason})"
        )
    return largest


#: One trial may pass over the training split at most this many times, even with the
#: largest model the space allows: beyond it the budget asks for far more data than
#: there is, and the search would measure memorisation.
MAX_TRIAL_EPOCHS = 200


def _settings_record(cfg: SearchConfig) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(cfg.model_dump_json())
    return record


def _check_resume(path: Path, cfg: SearchConfig) -> None:
    record = path / SETTINGS_FILE
    if not record.exists():
        return
    old = json.loads(record.read_text())
    new = _settings_record(cfg)
    changed = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
    if changed:
        raise SearchError(
            f"search {cfg.name!r} exists in {path.parent} with other settings ({', '.join(changed)}); "
            "resume with the same settings or choose another --name"
        )


_RESULT_COLUMNS = (
        "trial_id", *METRICS, VAL_SE, WORK_ATTR, "peak_rss_mb", "trial_seconds", "trial_status", "mlflow_run_id", "device", "gpu_share", "gpu_ids",
        "node_id", "message")


def _trial_table(trials: list[Any], check: ConfigCheck, run_ids: dict[str, str]) -> pd.DataFrame:
    """One row per trial that started: its config (dotted keys) and last reported metrics.

    Built from Tune's trials (``ExperimentAnalysis.trials``), so it needs no per-trial
    result files. The config
    comes from the trial, not from its last result (``Result.config`` is empty until a
    trial reports): a trial that failed or was stopped before its first report still has
    a row, with its analytic ``flops_per_example``, ``train_flops = 0`` and its MLflow run
    (``run_ids``: trial id -> child run id). A trial the budget ended while it was still
    pending never ran and has no MLflow run; it is left out (and counted in the log).
    """
    rows, never_started = [], 0
    for trial in trials:
        metrics = dict(trial.last_result or {})
        error = trial.status == "ERROR"
        if TIME_ATTR not in metrics and not error and trial.trial_id not in run_ids:
            never_started += 1
            continue
        row = {k: v for k, v in (trial.config or {}).items()}
        row.update({"flops_per_example": check.try_flops(row), TIME_ATTR: 0.0,
                    "examples_seen": 0.0, "trial_status": "running",
                    "mlflow_run_id": run_ids.get(trial.trial_id, "")})
        row.update({k: metrics[k] for k in _RESULT_COLUMNS if k in metrics})
        row["trial_id"] = trial.trial_id
        if row["trial_status"] == "running" and trial.status == "TERMINATED":
            row["trial_status"] = "stopped"  # ended early by ASHA or the budget
        row["error"] = _error_message(trial.error_file) if error else ""
        rows.append(row)
    if never_started:
        log.info("%d trial(s) were still pending when the budget ran out; they never ran",
                 never_started)
    return pd.DataFrame(rows)


def _with_reports_tune_dropped(trials: pd.DataFrame,
                               logged: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Rows whose trial's MLflow run holds a later report than Tune's ``last_result``
    take that report, every metric of it.

    A trial logs each report to MLflow just before handing it to Tune; when the budget
    stops the search while a report is in flight, Tune drops it, but the trial did train
    that far. Taking it keeps one result per trial (its last report) in this table, in
    MLflow and in the analysis, and counts the FLOPs it spent. ``logged``: run id -> the
    run's latest metrics.
    """
    if trials.empty or "mlflow_run_id" not in trials:
        return trials
    trials = trials.copy()
    keys = (*(m for m in METRICS if m not in CONSTANT_METRICS), VAL_SE)  # the report's
    for i, run_id in trials["mlflow_run_id"].items():
        latest = logged.get(str(run_id), {})
        if latest.get(TIME_ATTR, 0.0) > float(trials.at[i, TIME_ATTR] or 0.0):
            for key in keys:
                if key in latest:
                    trials.loc[i, key] = latest[key]
    return trials


def _error_message(error_file: str | None) -> str:
    """The last line of a trial's error file (the exception's message), or a default."""
    if not error_file:
        return "error"
    try:
        lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
    except OSError:
        return "error"
    return lines[-1] if lines else "error"


@dataclass(frozen=True)
class SearchPlan:
    """Everything decided before Ray starts: space, data, feasibility, budget rule."""

    cfg: SearchConfig
    space_path: Path
    space: SearchSpace
    exp_path: Path
    restoring: bool
    dataset: EncodedDataset
    check: ConfigCheck
    milestones: tuple[float, ...]
    policy: BudgetPolicy
    #: Tune's saved state was unreadable (a kill while it was being written) and nothing
    #: older was: the search starts afresh in its old MLflow runs (see repair_tune_state)
    state_lost: bool = False

    @property
    def storage_path(self) -> Path:
        return self.exp_path.parent


@dataclass(frozen=True)
class Tracking:
    """The search's MLflow coordinates."""

    uri: str
    experiment_id: str
    parent_run_id: str


def _readable(path: Path) -> bool:
    """A saved state file that is whole: the experiment state is JSON that parses; the
    searcher and callback states are pickles (Tune unpickles its own; recscale never
    unpickles them itself), so a non-empty file is all that is checked of them."""
    try:
        if path.name.startswith("experiment_state-"):
            json.loads(path.read_text())
            return True
        return path.stat().st_size > 0
    except (OSError, ValueError):
        return False


def repair_tune_state(exp_path: Path) -> bool:
    """Make a search killed while Tune was saving its state restorable.

    Tune 2.60 saves ``experiment_state-<session>.json``, ``search_gen_state-<session>.json``
    and ``callback-states-<session>.pkl`` by truncating and rewriting them (and copying
    them to the storage path), so a SIGKILL at that moment leaves one empty or cut short,
    and restoring it raises. Here a session whose files are not all whole is moved to
    ``<exp_path>/.unreadable/`` so Tune restores the newest whole session instead (the
    trials of the session lost are closed as LOST and their work counted as spent, see
    :func:`reconcile_resumed`). Returns True when state existed but none was whole (the
    search then starts afresh, in the same MLflow parent run).
    """
    sessions = sorted(exp_path.glob("experiment_state-*.json"), reverse=True)
    moved = 0
    for state in sessions:
        stamp = state.name[len("experiment_state-"):-len(".json")]
        group = [state, exp_path / f"search_gen_state-{stamp}.json",
                 exp_path / f"callback-states-{stamp}.pkl"]
        if all(_readable(p) for p in group if p.exists() or p == state):
            break
        aside = exp_path / ".unreadable"
        aside.mkdir(exist_ok=True)
        for p in group:
            if p.exists():
                p.replace(aside / p.name)
        moved += 1
        log.warning("Tune's saved state %s is unreadable (the driver was killed while "
                    "writing it): moved to %s", state.name, aside)
    return moved > 0 and moved == len(sessions)


def plan_search(cfg: SearchConfig, storage: str | os.PathLike[str] | None = None,
                resume: Literal["auto", "always", "never"] = "auto",
                dataset: EncodedDataset | None = None) -> SearchPlan:
    """Step 1: validate everything that can be checked without Ray or MLflow.

    Raises ``SearchError`` (one line) for a space with no feasible config, a budget
    that cannot pay one trial, or a resume that does not match the stored search.
    """
    from ray import tune

    space_path = resolve_space(cfg.space)
    space = load_space(space_path)
    storage_path = Path(storage or "recscale_runs").absolute()
    exp_path = storage_path / cfg.name
    restoring = tune.Tuner.can_restore(str(exp_path))
    if restoring and resume == "never":
        raise SearchError(f"search {cfg.name!r} already exists in {storage_path}; "
                          "pass --resume or choose another --name")
    if not restoring and resume == "always":
        raise SearchError(f"no interrupted search {cfg.name!r} in {storage_path} to resume")
    if restoring:
        _check_resume(exp_path, cfg)
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    _check_histories(space, ds, space_path)
    trial_flops = cfg.trial_budget
    check = ConfigCheck(cfg.data, ds.spec, cfg.max_flops_per_example, trial_flops)
    largest = ensure_feasible(space, check, cfg.seed)
    passes = trial_flops / (3 * max(largest, 1.0) * max(len(ds.train), 1))
    if passes > MAX_TRIAL_EPOCHS:
        raise SearchError(
            f"training split too small for the budget: {len(ds.train)} rows, and one trial's "
            f"trial_flops={trial_flops:.3g} is {passes:.0f} passes over it even for the "
            f"largest sampled model ({largest:.3g} FLOPs/example; at most {MAX_TRIAL_EPOCHS}): "
            "lower --trial-flops / --budget-flops, or use more data")
    milestones, admission = scheduler_milestones(cfg)
    if cfg.budget_flops < admission:
        raise SearchError(f"budget_flops={cfg.budget_flops:.3g} cannot pay one trial's "
                          f"first {admission:.3g} FLOPs")
    policy = BudgetPolicy(cfg.budget_flops, admission, tuple(milestones))
    return SearchPlan(cfg, space_path, space, exp_path, restoring, ds, check,
                      tuple(milestones), policy)


def history_lengths(space: SearchSpace) -> list[int]:
    """The behaviour-history lengths ``K`` (``model.seq_len``) the space can sample."""
    knob = space.model.get("seq_len", 0)
    if isinstance(knob, Choice):
        return sorted({int(k) for k in knob.choice})
    if isinstance(knob, IntRange):
        return sorted({knob.bounds[0], knob.bounds[1]})
    return [int(knob)]


def _check_histories(space: SearchSpace, ds: EncodedDataset, space_path: Path) -> None:
    """A space that samples ``seq_len = K > 0`` on data loaded without behaviour
    histories would have every such sample rejected as infeasible, quietly narrowing the
    search to ``K = 0``: refuse it up front, in one line."""
    with_history = [k for k in history_lengths(space) if k > 0]
    if with_history and ds.spec.sequence is None:
        raise SearchError(
            f"space {space_path.name} samples model.seq_len = {with_history} (behaviour "
            "histories), but the data was loaded without them: pass --sequences (and "
            "--split user_temporal) with data that has user, item and time columns, or fix "
            "model.seq_len to 0")


def open_tracking(plan: SearchPlan, tracking_uri: str | None) -> Tracking:
    """Step 2: the search's experiment and parent run (found again on resume)."""
    from mlflow.tracking import MlflowClient

    cfg, ds = plan.cfg, plan.dataset
    uri = default_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    params = {f"search.{k}": v for k, v in flatten(_settings_record(cfg)).items()}
    params.update({f"space.{k}": _describe(v) for k, v in plan.space.dimensions().items()})
    params["data.fingerprint"] = ds.fingerprint
    exp_id, parent_id, _ = find_or_create_parent(
        client, cfg.name, params, tags={TAG_DATA_FINGERPRINT: ds.fingerprint,
                                        TAG_STORAGE: str(plan.exp_path)})
    client.log_dict(parent_id, _settings_record(cfg), SEARCH_ARTIFACT)  # typed, not a tag
    client.log_dict(parent_id, {"fingerprint": ds.fingerprint, "splits": ds.split_stats()},
                    DATA_ARTIFACT)
    log_files(client, parent_id, [plan.space_path])
    return Tracking(uri, exp_id, parent_id)


def build_tuner(plan: SearchPlan, tracking: Tracking, verbose: int = 1) -> Any:
    """Step 3: the ``tune.Tuner`` (fresh, or restored with its pickled searcher,
    scheduler and callbacks: on resume those come from the stored search, not from
    here)."""
    import ray
    from ray import tune

    from search.checkpoints import DropFinishedCheckpoints
    from search.trainable import TrialContext, run_trial, share_dataset

    cfg, check = plan.cfg, plan.check
    use_gpus = cfg.resources.gpus == "on" or (
        cfg.resources.gpus == "auto"
        and ray.cluster_resources().get("GPU", 0) > 0)  # type: ignore[no-untyped-call]
    ctx = TrialContext(
        search=cfg.name, data=cfg.data, trial_flops=cfg.trial_budget,
        milestones=plan.milestones,
        report_every_flops=cfg.report_every_flops,
        eval_max_examples=cfg.eval_max_examples, patience=cfg.trial_patience,
        tracking_uri=tracking.uri,
        experiment_id=tracking.experiment_id, parent_run_id=tracking.parent_run_id,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx, data=share_dataset(plan.dataset)),
        TrialResources(cfg.resources, use_gpus, check.flops),
    )
    if plan.restoring:
        return tune.Tuner.restore(str(plan.exp_path), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    stopper = BudgetStopper(plan.policy.budget_flops)  # what the references left
    callbacks = [stopper, TrialStatusCallback(tracking.uri, tracking.experiment_id,
                                              tracking.parent_run_id),
                 DropFinishedCheckpoints(plan.exp_path),  # finished trials: last one only
                 TrimFinishedTrials(),  # ... and in the driver's memory too
                 # after the trim: what the driver keeps of a finished trial, once glibc
                 # has handed back the pages the trial's bookkeeping freed
                 DriverMemory(tracking.uri, tracking.parent_run_id),
                 NoTensorBoardEvents()]  # instead of Tune's TensorBoard logger (a leak)
    run_config = tune.RunConfig(
        name=cfg.name, storage_path=str(plan.storage_path), stop=stopper,
        callbacks=callbacks,
        # a resume needs the checkpoint the last *saved* experiment state names, maybe
        # several reports old: Tune deletes none, search.checkpoints prunes finished trials
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        failure_config=tune.FailureConfig(max_failures=2),
        progress_reporter=_reporter() if verbose >= 1 else None,
        verbose=verbose,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=make_searcher(plan), scheduler=make_scheduler(cfg),
                                    num_samples=-1, max_concurrent_trials=cfg.max_concurrent,
                                    reuse_actors=cfg.reuse_actors,
                                    trial_dirname_creator=short_trial_dirname),
        run_config=run_config,
    )


def make_searcher(plan: SearchPlan) -> Any:
    """The budgeted OptunaSearch over ``plan.space``: TPE on the objective, or NSGA-II
    on (objective, serving cost) with ``objective="multi"``."""
    from search.searcher import BudgetedOptunaSearch, create_sampler

    cfg = plan.cfg
    multi = cfg.objective == "multi"
    return BudgetedOptunaSearch(
        space=plan.space.suggest, feasibility=plan.check, policy=plan.policy,
        metric=[OBJECTIVE, SECONDARY_OBJECTIVE] if multi else OBJECTIVE,
        mode=[OBJECTIVE_MODE, "min"] if multi else OBJECTIVE_MODE,
        sampler=create_sampler(cfg.searcher, cfg.seed, multi, cfg.startup),
        # every family gets a trial before the sampler focuses (the rest of each
        # point is sampled; an infeasible draw is re-drawn with the family kept)
        points_to_evaluate=[{"model.block": f} for f in plan.space.families],
    )


def _reporter() -> Any:
    from ray import tune

    return tune.CLIReporter(
        parameter_columns={"model.block": "block", "model.d_model": "D",
                           "model.n_layers": "L", "model.n_tokens": "T"},
        metric_columns={OBJECTIVE: OBJECTIVE, "val_auc": "auc",
                        TIME_ATTR: TIME_ATTR, "flops_per_example": "flops/ex"},
        # no sort_by_metric: ray 2.60 sorts finished trials by the raw metric and raises
        # TypeError on one that ended before its first report (the end table is ours)
        max_report_frequency=30, metric=OBJECTIVE, mode=OBJECTIVE_MODE,
    )


def close_lost_runs(client: Any, runs: list[Any], known: set[str]) -> tuple[float, int]:
    """Close the child ``runs`` whose trial Tune does not know as ``LOST`` (the driver
    started them after its last whole saved state, then died; they may even have
    finished); returns the training FLOPs they had cost (their last logged work,
    :func:`trainers.tracking.logged_work`) and how many were closed."""
    lost, closed = 0.0, 0
    for run in runs:
        trial_id = str(run.data.tags.get(TAG_TRIAL_ID, ""))
        if is_reference_id(trial_id):
            continue  # trained by the driver, not Tune (search.references)
        if run.data.tags.get(TAG_STATUS) != "LOST" and trial_id not in known:
            lost += logged_work(client, run)
            finish_run(client, run.info.run_id, "LOST")
            closed += 1
    return lost, closed


def close_stopped_runs(client: Any, runs: list[Any], trials: list[Any]) -> int:
    """At the search's end, close the runs of trials still open: those the budget stopped
    together with the experiment (Tune leaves them RUNNING in its state). They get the
    status their last report says (``STOPPED`` unless it completed or diverged), as
    finished trials do; returns how many were closed."""
    by_id = {t.trial_id: t for t in trials}
    closed = 0
    for run in runs:
        trial = by_id.get(str(run.data.tags.get(TAG_TRIAL_ID, "")))
        if trial is None or run.data.tags.get(TAG_STATUS) != "RUNNING":
            continue
        finish_run(client, run.info.run_id, "ERROR" if trial.status == "ERROR"
                   else TrialStatusCallback.final_status(trial))
        closed += 1
    return closed


def reconcile_resumed(plan: SearchPlan, tracking: Tracking) -> tuple[float, dict[str, float]]:
    """Before a resumed search runs: what MLflow knows of the work done that Tune's saved
    state does not (:mod:`search.budget`). Returns ``(lost, floors)``:

    * ``lost``: the search's untracked spend so far, every trial closed ``LOST`` (see
      :func:`close_lost_runs`), this interruption's added to the running total kept on
      the parent run (``search.lost_flops``), so a later interruption adds to it;
    * ``floors``: for each trial Tune restores, the work its run logged (Tune saved its
      state before some of its reports). Tune's saved result is older: without them the
      budget would forget that work until the trial reports again.

    A restored trial's re-run segment (from its checkpoint back to where it had got) is
    not charged here: the trial counts it in its work as it trains it
    (``search.trainable.WorkMeter``), so a search whose budget ends first is charged only
    what was done.
    """
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    client = MlflowClient(tracking.uri)
    restored = ({t.trial_id: t for t in ExperimentAnalysis(str(plan.exp_path)).trials}
                if plan.restoring else {})
    children = trial_runs(client, tracking.experiment_id, tracking.parent_run_id)
    wasted, _ = close_lost_runs(client, children, set(restored))
    floors = {str(r.data.tags.get(TAG_TRIAL_ID)): logged_work(client, r) for r in children
              if str(r.data.tags.get(TAG_TRIAL_ID)) in restored}
    key = f"{SEARCH_PREFIX}{LOST_FLOPS}"
    before = client.get_run(tracking.parent_run_id).data.metrics.get(key, 0.0)
    total = float(before) + wasted
    log_metrics(client, tracking.parent_run_id, {key: total}, step=0)
    if wasted:
        log.warning("the interruption lost trials that had trained %.3g FLOPs; they count "
                    "against the budget", wasted)
    return total, floors


def trial_costs(trials: list[Any], runs: list[Any]) -> dict[str, float]:
    """Trial id -> the training FLOPs each trial Tune knows has cost: the larger of the
    work its last result in Tune reports and the work its MLflow run logged (a report in
    flight when the budget stopped the search reached MLflow only; a restored trial's
    run holds its work from before the interruption). Reads the runs' latest metrics.
    """
    costs = {t.trial_id: reported_work(t.last_result or {}) or 0.0 for t in trials}
    for run in runs:
        trial_id = str(run.data.tags.get(TAG_TRIAL_ID, ""))
        if trial_id in costs:
            metrics = run.data.metrics
            costs[trial_id] = max(costs[trial_id], float(metrics.get(WORK_ATTR, 0.0)),
                                  float(metrics.get(TIME_ATTR, 0.0)))
    return costs


class _WallClock:
    """Keeps ``search.wall_seconds`` on the parent run current while the search runs
    (every ``every`` seconds), counting the time of the segments before a resume, so a
    search killed at any point still records how long it has run."""

    def __init__(self, tracking: Tracking, before: float, every: float = 15.0) -> None:
        self.tracking, self.before, self.every = tracking, before, every
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wall-clock", daemon=True)

    @property
    def total(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def _loop(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.tracking.uri)
        while not self._stop.wait(self.every):
            try:
                log_metrics(client, self.tracking.parent_run_id,
                            {f"{SEARCH_PREFIX}wall_seconds": self.total}, step=0)
            except Exception as err:  # the store being down must not end the search
                log.debug("wall clock not logged: %s", err)

    def __enter__(self) -> _WallClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def collect_outcome(plan: SearchPlan, tracking: Tracking, wall: float) -> SearchOutcome:
    """Step 5: the outcome, read from what the search stored (Tune's experiment state,
    the searcher's saved state, MLflow), never from objects built in this process, so a
    resumed search reports the whole search. ``wall``: seconds over every segment.
    Spent FLOPs: every trial's work (:func:`trial_costs`) and the lost trials' (``search.lost_flops``)."""
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    client = MlflowClient(tracking.uri)
    analysis = ExperimentAnalysis(str(plan.exp_path))
    # once the trials' last writes have landed, with what Tune received and MLflow lacked
    runs = settle_trial_runs(client, tracking.experiment_id, tracking.parent_run_id,
                             analysis.trials)
    lost_now, closed = close_lost_runs(client, runs, {t.trial_id for t in analysis.trials})
    closed += close_stopped_runs(client, runs, analysis.trials)
    if closed:  # read again: the closed runs' status tags changed
        runs = trial_runs(client, tracking.experiment_id, tracking.parent_run_id)
    run_ids = {run.data.tags[TAG_TRIAL_ID]: run.info.run_id for run in runs}
    trials = _trial_table(analysis.trials, plan.check, run_ids)
    trials = _with_reports_tune_dropped(trials, {run.info.run_id: run.data.metrics for run in runs})
    references = reference_rows(runs)
    parent_metrics = client.get_run(tracking.parent_run_id).data.metrics
    lost = float(parent_metrics.get(f"{SEARCH_PREFIX}{LOST_FLOPS}", 0.0)) + lost_now
    spent = sum(trial_costs(analysis.trials, runs).values()) + lost + (
        float(references[TIME_ATTR].fillna(0).sum()) if TIME_ATTR in references else 0.0)
    winner = search_winner(trials)
    lift = search_lift(plan, analysis.trials, winner, references)
    prune_finished(analysis.trials, None if winner is None else str(winner["trial_id"]))
    rejected, told = settle_searcher(plan, runs)
    client.log_dict(tracking.parent_run_id, {"completed": sorted(told), "rejected": rejected},
                    SEARCHER_ARTIFACT)
    memory = [(int(m.step), float(m.value))
              for m in client.get_metric_history(tracking.parent_run_id, DriverMemory.METRIC)]
    total_wall = wall
    numbers = {"spent_flops": spent, "budget_flops": plan.cfg.budget_flops, LOST_FLOPS: lost,
               "n_trials": float(len(trials)), "rejected_samples": float(rejected),
               "wall_seconds": total_wall, "n_references": float(len(references))}
    if winner is not None:
        numbers.update({f"best_{k}": float(winner[k]) for k in (OBJECTIVE, "val_auc", TIME_ATTR)
                        if k in winner and pd.notna(winner[k])})
        best = Winner(run_id=str(winner.get("mlflow_run_id", "")),
                      trial_id=str(winner["trial_id"]), block=str(winner.get("model.block", "")),
                      objective=float(winner[OBJECTIVE]),
                      val_auc=float(winner.get("val_auc", float("nan"))),
                      train_flops=float(winner.get(TIME_ATTR, 0.0)))
        set_winner(client, tracking.parent_run_id, best, describe_search(
            plan.cfg.name, best, spent, plan.cfg.budget_flops, len(trials),
            lift=lift.sentences() if lift else None))
    end_run(client, tracking.parent_run_id, "FINISHED",
            {**{f"{SEARCH_PREFIX}{k}": v for k, v in numbers.items()},
             **(lift.metrics() if lift else {})})
    return SearchOutcome(plan.cfg.name, trials, spent, plan.cfg.budget_flops, tracking.uri,
                         tracking.experiment_id, tracking.parent_run_id, str(plan.exp_path),
                         rejected, sorted(memory), total_wall, references, lift)


def settle_searcher(plan: SearchPlan, runs: list[Any]) -> tuple[int, set[str]]:
    """Tell the searcher Tune saved last the trials it still holds as running whose
    MLflow runs have ended with a result, and save it back; returns the samples it
    rejected and the trial ids it has been told finished.

    Tune saves its searcher before the last trials' completions reach it (the budget's
    stop, a trial finished in the instant before a kill and reported again on resume):
    without this, a search extended later would sample without those results, and the
    searcher's count of finished trials would disagree with MLflow's.
    """
    searcher = make_searcher(plan)
    try:
        searcher.restore_from_dir(str(plan.exp_path))
    except (FileNotFoundError, RuntimeError):
        return 0, set()
    ended = {str(r.data.tags.get(TAG_TRIAL_ID)): r.data.metrics for r in runs
             if r.info.status != "RUNNING" and r.data.tags.get(TAG_STATUS) != "LOST"
             and OBJECTIVE in r.data.metrics}
    # OptunaSearch._ot_trials: the trials it holds as running (tests/test_private_apis.py)
    late = [t for t in list(searcher._ot_trials) if t in ended]
    for trial_id in late:
        metrics = ended[trial_id]
        searcher.on_trial_complete(trial_id, result={
            k: metrics[k] for k in (OBJECTIVE, SECONDARY_OBJECTIVE, TIME_ATTR) if k in metrics})
    if late:
        prefix, suffix = searcher.CKPT_FILE_TMPL.split("{}")  # "searcher-state-", ".pkl"
        newest = max(plan.exp_path.glob(searcher.CKPT_FILE_TMPL.format("*")))
        session = newest.name[len(prefix):-len(suffix)]  # overwrite the file restore reads
        searcher.save_to_dir(str(plan.exp_path), session)  # atomic: temp file, then rename
        log.info("told the searcher %d trial(s) that ended after its last save", len(late))
    return len(searcher.rejected), set(searcher._completed_trials)


def run_search(
    cfg: SearchConfig,
    tracking_uri: str | None = None,
    storage: str | os.PathLike[str] | None = None,
    address: str | None = None,
    resume: Literal["auto", "always", "never"] = "auto",
    verbose: int = 1,
    dataset: EncodedDataset | None = None,
) -> SearchOutcome:
    """Run (or resume) the search ``cfg`` describes and return its outcome.

    The steps: :func:`plan_search` (no Ray, no MLflow), :func:`open_tracking`, start Ray,
    the reference models (:func:`search.references.train_references`, charged to the
    budget), :func:`build_tuner`, ``fit``, :func:`collect_outcome`.

    Args:
        cfg: the search settings.
        tracking_uri: MLflow tracking URI (default: flag > ``MLFLOW_TRACKING_URI`` >
            ``sqlite:///./mlflow.db``).
        storage: where Ray Tune keeps the search's state (default ``./recscale_runs``);
            must be reachable from every node on a cluster.
        address: an existing Ray cluster (default: start Ray locally).
        resume: ``auto`` resumes an interrupted search of the same name, ``always``
            requires one, ``never`` refuses to touch one.
        verbose: 0 silent, 1 progress table, 2 Tune's full output.
        dataset: an already-encoded dataset (tests); by default ``cfg.data`` is loaded.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # a trial the budget stopped before its first report, restored as unfinished from an
    # older experiment state (after an out-of-memory restart), returns at once with
    # nothing to report (search/trainable.py); Tune then re-sends the restored
    # last_result, which holds its config but no metric, and its strict check ended the
    # whole search with a ValueError (a chaos run in CI). A trial stopped before its
    # first report without a restore reaches the scheduler and searcher the same way,
    # metric-less, and both handle it; every report the trainable makes has the metric
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    plan = plan_search(cfg, storage, resume, dataset)  # bad input stops here, nothing written
    # one driver per search: a second command with this name and storage stops here;
    # the holder then repairs and reads Tune's state, which no other driver now writes
    with SearchLock(plan.exp_path):
        for restart in range(MEMORY_RESTARTS + 1):
            state_lost = repair_tune_state(plan.exp_path)
            plan = replace(plan_search(cfg, storage, resume if restart == 0 else "auto",
                                       plan.dataset), state_lost=state_lost)
            try:
                return _run_search(plan, tracking_uri, address, verbose)
            except Exception as err:
                if not killed_for_memory(err):
                    raise
                _restart_after_memory_kill(err, restart)
    raise AssertionError("unreachable")  # the last restart raises


#: how many times one driver resumes a search that Ray's memory monitor stopped
MEMORY_RESTARTS = 5


def killed_for_memory(err: BaseException) -> bool:
    """Did Ray's memory monitor kill a trial's worker (``ray.exceptions.OutOfMemoryError``
    anywhere in the exception's chain)?

    Ray 2.60's Tune does not treat that error as a trial failure: its actor manager
    raises ``RuntimeError("Caught unexpected exception ...")`` from it and ``fit`` ends,
    although the trial could simply be retried (a SIGKILLed worker is).
    """
    from ray.exceptions import OutOfMemoryError

    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OutOfMemoryError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _restart_after_memory_kill(err: BaseException, restart: int) -> None:
    """Resume the search as if its command were run again: Ray is shut down (its trial
    actors with it) and the next round restores Tune's saved state; the trials the
    kill interrupted go on from their checkpoints. After ``MEMORY_RESTARTS`` in one
    driver: one clear line instead."""
    import ray

    ray.shutdown()
    first = str(err).split("OOM kill reason", 1)[0].strip().splitlines()
    detail = first[-1] if first else ""
    if restart >= MEMORY_RESTARTS:
        raise SearchError(
            f"the node ran out of memory {restart + 1} times and Ray killed trial workers "
            "each time; the search's state is saved: lower --max-concurrent or free memory, "
            "then run the same command again") from err
    log.warning("Ray killed trial workers because the node ran low on memory (%s); "
                "resuming the search from its saved state (%d of %d)",
                detail[:200], restart + 1, MEMORY_RESTARTS)


def _run_search(plan: SearchPlan, tracking_uri: str | None, address: str | None,
                verbose: int) -> SearchOutcome:
    import ray
    from mlflow.tracking import MlflowClient

    cfg = plan.cfg
    tracking = open_tracking(plan, tracking_uri)
    client = MlflowClient(tracking.uri)
    before = 0.0  # wall seconds of the segments before this one
    if plan.restoring or plan.state_lost:
        lost, floors = reconcile_resumed(plan, tracking)
        set_untracked_spend(lost)
        set_work_floors(floors)
        before = client.get_run(tracking.parent_run_id).data.metrics.get(
            f"{SEARCH_PREFIX}wall_seconds", 0.0)
    else:
        set_untracked_spend(0.0)
        set_work_floors({})
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local",
                 include_dashboard=False, log_to_driver=verbose > 1,
                 logging_level=logging.WARNING if verbose < 2 else logging.INFO)
    plan.exp_path.mkdir(parents=True, exist_ok=True)
    (plan.exp_path / SETTINGS_FILE).write_text(json.dumps(_settings_record(cfg), indent=2))
    interrupt = _CtrlC()
    stopped = (f"search {cfg.name!r} interrupted; its state is saved in {plan.exp_path}: "
               "run the same command again to resume it")
    clock = _WallClock(tracking, before)
    try:
        with clock:
            try:
                spent = train_references(plan, tracking)  # found in MLflow on resume
            except KeyboardInterrupt:
                raise SearchInterrupted(stopped) from None
            plan = replace(plan, policy=replace(plan.policy,
                                                budget_flops=plan.policy.budget_flops - spent))
            tuner = build_tuner(plan, tracking, verbose)
            with interrupt:
                tuner.fit()
        if interrupt.seen:
            raise SearchInterrupted(stopped)
    except BaseException:  # SearchInterrupted too: the parent is KILLED, never FINISHED
        end_run(client, tracking.parent_run_id, "KILLED",
                {f"{SEARCH_PREFIX}wall_seconds": clock.total})
        raise
    return collect_outcome(plan, tracking, clock.total)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the search; Tune saved its state, so the same command resumes it."""


class _CtrlC:
    """Ctrl-C during ``fit``: note it, then let Tune stop gracefully (it saves the
    experiment state) by sending its other stop signal, SIGUSR1 (ray 2.60
    ``tune.tune._setup_signal_catching`` registers it beside SIGINT). Tune's own SIGINT
    handler is switched off for the duration, since it would swallow the interrupt and
    return as if the search had ended. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.seen = False
        self._active = False
        self._previous: Any = None
        self._env: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGUSR1)

    def __enter__(self) -> _CtrlC:
        self._active = (threading.current_thread() is threading.main_thread()
                        and hasattr(signal, "SIGUSR1"))
        if self._active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._env = os.environ.get(_TUNE_SIGINT)
            os.environ[_TUNE_SIGINT] = "1"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGINT, self._previous)
            if self._env is None:
                os.environ.pop(_TUNE_SIGINT, None)
            else:
                os.environ[_TUNE_SIGINT] = self._env


_TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


def _describe(knob: Any) -> str:
    if hasattr(knob, "model_dump"):
        return json.dumps(knob.model_dump(by_alias=True))
    return json.dumps(knob) if not isinstance(knob, str) else knob
