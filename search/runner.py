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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import pandas as pd

from search.budget import BudgetPolicy, BudgetStopper
from search.checks import ConfigCheck
from search.monitor import DriverMemory
from search.resources import TrialResources
from search.schedulers import make_scheduler, scheduler_milestones
from search.settings import SearchConfig
from search.space import SearchSpace, bundled_space, load_space
from search.tracking import TrialStatusCallback
from trainers.contracts import (
    CONSTANT_METRICS,
    METRICS,
    OBJECTIVE,
    OBJECTIVE_MODE,
    SEARCH_ARTIFACT,
    SEARCH_PREFIX,
    SECONDARY_OBJECTIVE,
    TAG_DATA_FINGERPRINT,
    TAG_STORAGE,
    TAG_TRIAL_ID,
    TIME_ATTR,
    VAL_SE,
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
    log_files,
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
    """What a finished search leaves: its trials, budget spent and MLflow ids."""

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

    def best(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` best trials by their result (their last report), best first."""
        if self.trials.empty or OBJECTIVE not in self.trials:
            return self.trials
        return self.trials.sort_values(OBJECTIVE, ascending=OBJECTIVE_MODE == "min").head(n)

    def winner(self) -> pd.Series | None:
        """The winning trial's row (:func:`search_winner`)."""
        return search_winner(self.trials)


def search_winner(trials: pd.DataFrame) -> pd.Series | None:
    """The trial with the lowest objective in its result, among the trials that neither
    failed nor diverged; ``None`` if there is none.

    A trial's result is its last report (``trainers.contracts.RESULT_REPORT``): Tune's
    ``last_result``, the latest value of each metric in MLflow. Every column of the row
    (loss, AUC, ``train_flops``) is from that same report.
    """
    if trials.empty or OBJECTIVE not in trials:
        return None
    ok = trials
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


def ensure_feasible(space: SearchSpace, check: ConfigCheck, seed: int, draws: int = 400) -> int:
    """Raise ``SearchError`` unless random draws from ``space`` find a trainable config.

    Returns how many of the draws were feasible.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    feasible, cheapest, reason = 0, float("inf"), ""
    for _ in range(draws):
        trial = study.ask()
        flat = space.sample(trial)
        ok, _, why = check(flat)
        study.tell(trial, 0.0)
        if ok:
            feasible += 1
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
    return feasible


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
        "trial_id", *METRICS, "peak_rss_mb", "trial_seconds", "trial_status", "mlflow_run_id", "device", "gpu_share", "gpu_ids",
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

    @property
    def storage_path(self) -> Path:
        return self.exp_path.parent


@dataclass(frozen=True)
class Tracking:
    """The search's MLflow coordinates."""

    uri: str
    experiment_id: str
    parent_run_id: str


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
    trial_flops = cfg.trial_budget
    check = ConfigCheck(cfg.data, ds.spec, cfg.max_flops_per_example, trial_flops)
    ensure_feasible(space, check, cfg.seed)
    milestones, admission = scheduler_milestones(cfg)
    if cfg.budget_flops < admission:
        raise SearchError(f"budget_flops={cfg.budget_flops:.3g} cannot pay one trial's "
                          f"first {admission:.3g} FLOPs")
    policy = BudgetPolicy(cfg.budget_flops, admission, tuple(milestones))
    return SearchPlan(cfg, space_path, space, exp_path, restoring, ds, check,
                      tuple(milestones), policy)


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
        eval_max_examples=cfg.eval_max_examples, tracking_uri=tracking.uri,
        experiment_id=tracking.experiment_id, parent_run_id=tracking.parent_run_id,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx, data=share_dataset(plan.dataset)),
        TrialResources(cfg.resources, use_gpus, check.flops),
    )
    if plan.restoring:
        return tune.Tuner.restore(str(plan.exp_path), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    stopper = BudgetStopper(cfg.budget_flops)
    callbacks = [stopper, TrialStatusCallback(tracking.uri, tracking.experiment_id,
                                              tracking.parent_run_id),
                 DriverMemory(tracking.uri, tracking.parent_run_id),
                 DropFinishedCheckpoints()]  # Tune state does not grow with the trials
    run_config = tune.RunConfig(
        name=cfg.name, storage_path=str(plan.storage_path), stop=stopper,
        callbacks=callbacks,
        # a resume needs each unfinished trial's latest checkpoint only (search.checkpoints)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=2),
        progress_reporter=_reporter() if verbose >= 1 else None,
        verbose=verbose,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=make_searcher(plan), scheduler=make_scheduler(cfg),
                                    num_samples=-1, max_concurrent_trials=cfg.max_concurrent,
                                    reuse_actors=cfg.reuse_actors),
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
        sampler=create_sampler(cfg.searcher, cfg.seed, multi),
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


def collect_outcome(plan: SearchPlan, tracking: Tracking, wall: float) -> SearchOutcome:
    """Step 5: the outcome, read from what the search stored (Tune's experiment state,
    the searcher's saved state, MLflow), never from objects built in this process, so a
    resumed search reports the whole search."""
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    client = MlflowClient(tracking.uri)
    analysis = ExperimentAnalysis(str(plan.exp_path))
    runs = trial_runs(client, tracking.experiment_id, tracking.parent_run_id)  # one query
    run_ids = {run.data.tags[TAG_TRIAL_ID]: run.info.run_id for run in runs}
    trials = _trial_table(analysis.trials, plan.check, run_ids)
    trials = _with_reports_tune_dropped(trials, {run.info.run_id: run.data.metrics for run in runs})
    spent = float(trials[TIME_ATTR].fillna(0).sum()) if TIME_ATTR in trials else 0.0
    winner = search_winner(trials)
    rejected = rejected_samples(plan)
    memory = [(int(m.step), float(m.value))
              for m in client.get_metric_history(tracking.parent_run_id, DriverMemory.METRIC)]
    # wall time of the whole search: this segment plus the segments before a resume
    previous = client.get_run(tracking.parent_run_id).data.metrics.get(
        f"{SEARCH_PREFIX}wall_seconds", 0.0)
    total_wall = wall + (previous if plan.restoring else 0.0)
    numbers = {"spent_flops": spent, "budget_flops": plan.cfg.budget_flops,
               "n_trials": float(len(trials)), "rejected_samples": float(rejected),
               "wall_seconds": total_wall}
    if winner is not None:
        numbers.update({f"best_{k}": float(winner[k]) for k in (OBJECTIVE, "val_auc", TIME_ATTR)
                        if k in winner and pd.notna(winner[k])})
        best = Winner(run_id=str(winner.get("mlflow_run_id", "")),
                      trial_id=str(winner["trial_id"]), block=str(winner.get("model.block", "")),
                      objective=float(winner[OBJECTIVE]),
                      val_auc=float(winner.get("val_auc", float("nan"))),
                      train_flops=float(winner.get(TIME_ATTR, 0.0)))
        set_winner(client, tracking.parent_run_id, best, describe_search(
            plan.cfg.name, best, spent, plan.cfg.budget_flops, len(trials)))
    end_run(client, tracking.parent_run_id, "FINISHED",
            {f"{SEARCH_PREFIX}{k}": v for k, v in numbers.items()})
    return SearchOutcome(plan.cfg.name, trials, spent, plan.cfg.budget_flops, tracking.uri,
                         tracking.experiment_id, tracking.parent_run_id, str(plan.exp_path),
                         rejected, sorted(memory), total_wall)


def rejected_samples(plan: SearchPlan) -> int:
    """Samples the searcher rejected as infeasible, over the whole search: read back
    from the searcher state Tune saved at the end (``Searcher.restore_from_dir``)."""
    searcher = make_searcher(plan)
    try:
        searcher.restore_from_dir(str(plan.exp_path))
    except (FileNotFoundError, RuntimeError):
        return 0
    return len(searcher.rejected)


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
    :func:`build_tuner`, ``fit``, :func:`collect_outcome`.

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
    import ray

    plan = plan_search(cfg, storage, resume, dataset)
    tracking = open_tracking(plan, tracking_uri)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local",
                 include_dashboard=False, log_to_driver=verbose > 1,
                 logging_level=logging.WARNING if verbose < 2 else logging.INFO)
    tuner = build_tuner(plan, tracking, verbose)
    plan.exp_path.mkdir(parents=True, exist_ok=True)
    (plan.exp_path / SETTINGS_FILE).write_text(json.dumps(_settings_record(cfg), indent=2))
    t0 = time.perf_counter()
    interrupt = _CtrlC()
    try:
        with interrupt:
            tuner.fit()
        if interrupt.seen:
            raise SearchInterrupted(
                f"search {cfg.name!r} interrupted; its state is saved in {plan.exp_path}: "
                "run the same command again to resume it")
    except BaseException:  # SearchInterrupted too: the parent is KILLED, never FINISHED
        from mlflow.tracking import MlflowClient

        end_run(MlflowClient(tracking.uri), tracking.parent_run_id, "KILLED")
        raise
    return collect_outcome(plan, tracking, time.perf_counter() - t0)


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
