"""Run one search: data once, OptunaSearch + ASHA on FLOPs, budget, resources, MLflow.

``run_search`` is what ``recscale search`` calls; tests call it directly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import pandas as pd

from search.budget import BudgetPolicy, BudgetStopper
from search.checks import ConfigCheck
from search.resources import TrialResources
from search.settings import SearchConfig, asha_milestones
from search.space import SearchSpace, bundled_space, load_space
from search.tracking import (
    TrialStatusCallback,
    child_runs,
    default_tracking_uri,
    end_parent,
    find_or_create_parent,
)
from trainers.data import EncodedDataset, load_dataset
from trainers.experiment import flatten

__all__ = ["SearchError", "SearchOutcome", "ensure_feasible", "resolve_space", "run_search"]

log = logging.getLogger(__name__)

SETTINGS_FILE = "recscale_search.json"
# Settings a resumed search must share with the interrupted one.
_RESUME_KEYS = ("space", "data", "budget_flops", "trial_flops", "max_flops_per_example",
                "grace_flops", "reduction_factor", "searcher", "scheduler", "objective", "seed")


class SearchError(ValueError):
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
        if self.trials.empty or "val_logloss" not in self.trials:
            return self.trials
        return self.trials.sort_values("val_logloss").head(n)


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
    return json.loads(cfg.model_dump_json())


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
        "trial_id", "val_logloss", "val_auc", "val_ne", "train_loss", "train_flops",
        "examples_seen", "flops_per_example", "params_dense", "params_embedding",
        "examples_per_s", "peak_rss_mb", "trial_seconds", "trial_status", "mlflow_run_id", "device", "gpu_share", "gpu_ids",
        "node_id", "message")


def _trial_table(results: Any, check: ConfigCheck, run_ids: dict[str, str]) -> pd.DataFrame:
    """One row per trial that started: its config (dotted keys) and last reported metrics.

    Built from Tune's in-memory trials, so it needs no per-trial result files. The config
    comes from the trial, not from its last result (``Result.config`` is empty until a
    trial reports): a trial that failed or was stopped before its first report still has
    a row, with its analytic ``flops_per_example``, ``train_flops = 0`` and its MLflow run
    (``run_ids``: trial id -> child run id). A trial the budget ended while it was still
    pending never ran and has no MLflow run; it is left out (and counted in the log).
    """
    analysis = getattr(results, "_experiment_analysis", None)
    trials = list(analysis.trials) if analysis is not None else []
    rows, never_started = [], 0
    for trial in trials:
        metrics = dict(trial.run_metadata.last_result or {})
        error = trial.status == "ERROR"
        if "train_flops" not in metrics and not error and trial.trial_id not in run_ids:
            never_started += 1
            continue
        row = {k: v for k, v in (trial.config or {}).items()}
        row.update({"flops_per_example": check.try_flops(row), "train_flops": 0.0,
                    "examples_seen": 0.0, "trial_status": "running",
                    "mlflow_run_id": run_ids.get(trial.trial_id, "")})
        row.update({k: metrics[k] for k in _RESULT_COLUMNS if k in metrics})
        row["trial_id"] = trial.trial_id
        row["error"] = _error_message(trial.error_file) if error else ""
        rows.append(row)
    if never_started:
        log.info("%d trial(s) were still pending when the budget ran out; they never ran",
                 never_started)
    return pd.DataFrame(rows)


def _error_message(error_file: str | None) -> str:
    """The last line of a trial's error file (the exception's message), or a default."""
    if not error_file:
        return "error"
    try:
        lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
    except OSError:
        return "error"
    return lines[-1] if lines else "error"


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
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from search.searcher import BudgetedOptunaSearch, make_sampler
    from search.trainable import TrialContext, run_trial, share_dataset

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
    if cfg.scheduler == "asha":
        milestones = asha_milestones(cfg.grace, cfg.reduction_factor, trial_flops)
        admission = cfg.grace
    else:
        milestones, admission = [trial_flops], trial_flops
    if cfg.budget_flops < admission:
        raise SearchError(f"budget_flops={cfg.budget_flops:.3g} cannot pay one trial's "
                          f"first {admission:.3g} FLOPs")
    policy = BudgetPolicy(cfg.budget_flops, admission, tuple(milestones))

    uri = default_tracking_uri(tracking_uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    params = {f"search.{k}": v for k, v in flatten(_settings_record(cfg)).items()}
    params.update({f"space.{k}": _describe(v) for k, v in space.dimensions().items()})
    params["data.fingerprint"] = ds.fingerprint
    exp_id, parent_id, _ = find_or_create_parent(
        client, cfg.name, params, tags={"recscale.data_fingerprint": ds.fingerprint,
                                        "recscale.storage": str(exp_path),
                                        "recscale.config": cfg.model_dump_json()})
    client.log_artifact(parent_id, str(space_path))

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=verbose > 1,
                 logging_level=logging.WARNING if verbose < 2 else logging.INFO)
    use_gpus = cfg.resources.gpus == "on" or (
        cfg.resources.gpus == "auto" and ray.cluster_resources().get("GPU", 0) > 0)

    ctx = TrialContext(
        search=cfg.name, data=cfg.data, trial_flops=trial_flops,
        milestones=tuple(milestones),
        report_every_flops=min(cfg.grace, trial_flops) / cfg.reports_per_grace,
        eval_max_examples=cfg.eval_max_examples, tracking_uri=uri,
        experiment_id=exp_id, parent_run_id=parent_id,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx, data=share_dataset(ds)),
        TrialResources(cfg.resources, use_gpus, check.flops),
    )
    from search.monitor import DriverMemory

    memory = DriverMemory()
    stopper = BudgetStopper(cfg.budget_flops)
    status_cb = TrialStatusCallback(uri, exp_id, parent_id)
    multi = cfg.objective == "multi"
    searcher = BudgetedOptunaSearch(
        space=space.suggest, feasibility=check, policy=policy,
        metric=["val_logloss", "flops_per_example"] if multi else "val_logloss",
        mode=["min", "min"] if multi else "min",
        sampler=make_sampler(cfg.searcher, cfg.seed, multi),
        # every family gets a trial before the sampler focuses (the rest of each
        # point is sampled; an infeasible draw is re-drawn with the family kept)
        points_to_evaluate=[{"model.block": f} for f in space.families],
    )
    scheduler = (ASHAScheduler(time_attr="train_flops", metric="val_logloss", mode="min",
                               max_t=trial_flops, grace_period=cfg.grace,  # type: ignore[arg-type]
                               reduction_factor=cfg.reduction_factor)
                 if cfg.scheduler == "asha" else FIFOScheduler())
    reporter = tune.CLIReporter(
        parameter_columns={"model.block": "block", "model.d_model": "D",
                           "model.n_layers": "L", "model.n_tokens": "T"},
        metric_columns={"val_logloss": "val_logloss", "val_auc": "auc",
                        "train_flops": "train_flops", "flops_per_example": "flops/ex"},
        max_report_frequency=30, sort_by_metric=True, metric="val_logloss", mode="min",
    )
    run_config = tune.RunConfig(
        name=cfg.name, storage_path=str(storage_path), stop=stopper,
        callbacks=[stopper, status_cb, memory],
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        failure_config=tune.FailureConfig(max_failures=2),
        progress_reporter=reporter if verbose >= 1 else None,
        verbose=verbose,
    )
    if restoring:
        tuner = tune.Tuner.restore(str(exp_path), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=-1,
                                        max_concurrent_trials=cfg.max_concurrent,
                                        reuse_actors=cfg.reuse_actors),
            run_config=run_config,
        )
    exp_path.mkdir(parents=True, exist_ok=True)
    (exp_path / SETTINGS_FILE).write_text(json.dumps(_settings_record(cfg), indent=2))
    t0 = time.perf_counter()
    try:
        results = tuner.fit()
    except BaseException:
        end_parent(uri, parent_id, "KILLED", {})
        raise
    wall = time.perf_counter() - t0
    trials = _trial_table(results, check, child_runs(client, exp_id, parent_id))
    spent = float(trials["train_flops"].fillna(0).sum()) if "train_flops" in trials else 0.0
    best = float(trials["val_logloss"].min()) if "val_logloss" in trials and len(trials) else float("nan")
    end_parent(uri, parent_id, "FINISHED", {
        "spent_flops": spent, "budget_flops": cfg.budget_flops, "n_trials": float(len(trials)),
        "best_val_logloss": best, "rejected_samples": float(len(searcher.rejected)),
        "wall_seconds": wall,
    })
    if memory.samples:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(parent_id, metrics=[Metric("driver_rss_mb", rss, now, n)
                                             for n, rss in memory.samples])
    return SearchOutcome(cfg.name, trials, spent, cfg.budget_flops, uri, exp_id, parent_id,
                         str(exp_path), len(searcher.rejected), memory.samples, wall)


def _describe(knob: Any) -> str:
    if hasattr(knob, "model_dump"):
        return json.dumps(knob.model_dump(by_alias=True))
    return json.dumps(knob) if not isinstance(knob, str) else knob
