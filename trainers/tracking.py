"""The MLflow writer: every run recscale creates is written through this module.

Layout (ARCHITECTURE.md; the names are in :mod:`trainers.contracts`): one experiment per
search name, one parent run per search (``recscale.kind=search``), one nested child run
per trial (``recscale.kind=trial``, ``mlflow.parentRunId``, ``trial_id``, ``block``,
``trial_status``; params = the flattened model and training config (the data config is
the search's, on the parent); the full typed config as the ``config.json`` artifact;
metrics per report with ``step = train_flops``, the per-trial constants once at step 0),
and one run per full training (``recscale.kind=train``). Experiments are created tagged
for MLflow's machine-learning mode.
``analysis.runs`` is the one reader.

Runs are found again by tags, never remembered in memory, so a resumed search (or a
restarted trial) keeps writing into the same runs and creates no duplicates. Trials log
their own metrics from their worker processes, batched (one ``log_batch`` per report)
and asynchronously (the per-example validation losses too, from a thread of their own),
so a slow remote tracking server stalls neither the driver nor the training thread;
:meth:`TrialTracker.flush` waits for all of it at a trial's end, or as it fails.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run
from mlflow.tracking import MlflowClient

from trainers.contracts import (
    CONFIG_ARTIFACT,
    CONSTANT_METRICS,
    EXPERIMENT_KIND_ML,
    KIND_SEARCH,
    KIND_TRIAL,
    OBJECTIVE,
    STEP_AXIS,
    TAG_BEST_BLOCK,
    TAG_BEST_RUN,
    TAG_BEST_TRIAL,
    TAG_BLOCK,
    TAG_DESCRIPTION,
    TAG_EXPERIMENT_KIND,
    TAG_KIND,
    TAG_NODE,
    TAG_PARENT,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TAG_VIEW,
    VAL_LOSSES_DIR,
    VIEW_COLUMNS,
    WORK_ATTR,
    artifact_location,
)

__all__ = [
    "RunWriter",
    "TrialTracker",
    "Winner",
    "describe_search",
    "set_winner",
    "child_runs",
    "trial_runs",
    "create_run",
    "end_run",
    "experiment_id",
    "find_or_create_parent",
    "find_trial_run",
    "finish_run",
    "last_step",
    "logged_steps",
    "logged_work",
    "log_files",
    "log_metric_series",
    "log_metrics",
    "log_params",
    "metric_batch",
    "set_tags",
    "set_trial_status",
    "stamp_in_place",
]

log = logging.getLogger(__name__)

_PARAM_BATCH = 100
#: a trial run's ``trial_status`` once Tune has finished it (not ERROR: a retry trains)
FINISHED_STATUSES = ("COMPLETED", "STOPPED", "DIVERGED")


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (or restored from deleted) if need be.

    A new experiment is tagged with the settings MLflow 3.17's UI offers for it:
    ``mlflow.experimentKind=custom_model_development``, which opens it in the
    machine-learning mode (runs and charts) rather than the GenAI one (traces,
    evaluations), and recscale's shared runs view (:data:`~trainers.contracts.TAG_VIEW`:
    the result columns instead of Dataset / Source / Models). Its artifacts go beside a
    SQLite store (:func:`~trainers.contracts.artifact_location`), not into ``./mlruns``
    of the working directory.
    """
    tags = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND_ML,
            TAG_VIEW: json.dumps({"selectedColumns": list(VIEW_COLUMNS)})}
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        for key, value in tags.items():  # an experiment an older recscale made
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return str(exp.experiment_id)
    try:
        where = artifact_location(str(client.tracking_uri), name)
        return str(client.create_experiment(name, artifact_location=where, tags=tags))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Params in batches of 100 (MLflow's limit per ``log_batch``)."""
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[i : i + _PARAM_BATCH])


def metric_batch(metrics: Mapping[str, Any], step: int,
                 timestamp: int | None = None) -> list[Metric]:
    """The numeric entries of ``metrics`` as MLflow metrics at ``step``, stamped
    ``timestamp`` (milliseconds; now when None)."""
    now = int(time.time() * 1000) if timestamp is None else int(timestamp)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]


def stamp_in_place(logged: Mapping[int, int], step: int) -> int | None:
    """The time stamp (ms) for a report at ``step`` written after later ones: that of the
    report before it (of the first one when none is before), so that a series ordered by
    (time, step) keeps the order of its steps; None (now) when ``step`` is past every
    logged one.

    Example:
        >>> stamp_in_place({100: 5, 200: 9, 400: 12}, 300)
        9
        >>> stamp_in_place({100: 5}, 300) is None
        True
    """
    if not logged or step > max(logged):
        return None
    below = [t for s, t in logged.items() if s < step]
    return max(below) if below else min(logged.values())


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int,
                synchronous: bool = True) -> Any:
    """The numeric entries of ``metrics`` at ``step``, in one batch."""
    return client.log_batch(run_id, metrics=metric_batch(metrics, step), synchronous=synchronous)


def log_metric_series(client: MlflowClient, run_id: str, key: str,
                      points: list[tuple[int, float]]) -> None:
    """One metric as a series of ``(step, value)`` points."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(v), now, int(s)) for s, v in points])


def log_files(client: MlflowClient, run_id: str, paths: list[Path] | list[str],
              artifact_path: str | None = None) -> None:
    """Files as artifacts of ``run_id`` (under ``artifact_path``)."""
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def create_run(client: MlflowClient, exp_id: str, run_name: str, tags: Mapping[str, str],
               params: Mapping[str, Any] | None = None) -> str:
    """A new run with its tags and params; returns its id."""
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
    if params:
        log_params(client, run.info.run_id, params)
    return str(run.info.run_id)


def end_run(client: MlflowClient, run_id: str, status: str,
            metrics: Mapping[str, float] | None = None) -> None:
    """Final metrics (step 0) and the run status (FINISHED, KILLED, FAILED)."""
    if metrics:
        log_metrics(client, run_id, metrics, step=0)
    client.set_terminated(run_id, status)


def find_or_create_parent(client: MlflowClient, name: str, params: Mapping[str, Any],
                          tags: Mapping[str, str]) -> tuple[str, str, bool]:
    """The search's parent run: ``(experiment_id, run_id, created)``."""
    exp_id = experiment_id(client, name)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_KIND}` = '{KIND_SEARCH}'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    if runs:
        run_id = str(runs[0].info.run_id)
        client.update_run(run_id, status="RUNNING")
        return exp_id, run_id, False
    run_id = create_run(client, exp_id, name, {TAG_KIND: KIND_SEARCH, TAG_SEARCH: name, **tags},
                        params)
    return exp_id, run_id, True


def find_trial_run(client: MlflowClient, exp_id: str, parent_run_id: str,
                   trial_id: str) -> str | None:
    """The child run of trial ``trial_id`` under ``parent_run_id``, if it exists."""
    runs = client.search_runs(
        [exp_id],
        filter_string=(f"tags.`{TAG_PARENT}` = '{parent_run_id}' "
                       f"and tags.{TAG_TRIAL_ID} = '{trial_id}'"),
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None


def trial_runs(client: MlflowClient, exp_id: str, parent_run_id: str) -> list[Run]:
    """Every trial run under one search's parent run (with its tags and latest metrics)."""
    out: list[Run] = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        out.extend(run for run in page if TAG_TRIAL_ID in run.data.tags)
        token = page.token
        if not token:
            return out


def child_runs(client: MlflowClient, exp_id: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of every trial run under one search's parent run."""
    return {run.data.tags[TAG_TRIAL_ID]: run.info.run_id
            for run in trial_runs(client, exp_id, parent_run_id)}


def finish_run(client: MlflowClient, run_id: str, status: str) -> None:
    """A finished trial run's ``status`` tag (one of ``TRIAL_STATUSES``) and MLflow status."""
    client.set_tag(run_id, TAG_STATUS, status)
    client.set_terminated(run_id, {"ERROR": "FAILED", "LOST": "KILLED"}.get(status, "FINISHED"))


def last_step(client: MlflowClient, run_id: str) -> int:
    """The largest step at which a run logged the objective (-1 when it logged none)."""
    return max(logged_steps(client, run_id), default=-1)


def logged_steps(client: MlflowClient, run_id: str) -> dict[int, int]:
    """The steps at which a run logged the objective, each with its time stamp (ms)."""
    return {int(m.step): int(m.timestamp) for m in client.get_metric_history(run_id, OBJECTIVE)}


def logged_work(client: MlflowClient, run: Run, step: int | None = None) -> float:
    """The training FLOPs a trial run's reports say it has cost: its latest logged
    ``work_flops``, at least its last logged step (``step``: :func:`last_step`, when
    already read; a run from before work was logged has only its steps); 0 for a run
    with no report."""
    step = last_step(client, run.info.run_id) if step is None else step
    return max(float(run.data.metrics.get(WORK_ATTR, 0.0)), float(max(step, 0)))


def set_trial_status(client: MlflowClient, exp_id: str, parent_run_id: str, trial_id: str,
                     status: str) -> None:
    """A finished trial's ``status`` tag and MLflow run status, found by its trial id."""
    run_id = find_trial_run(client, exp_id, parent_run_id, trial_id)
    if run_id is not None:
        finish_run(client, run_id, status)


class TrialTracker:
    """A trial's own child run, written from the trial's worker process.

    ``params``: the trial's flat config (``model.*``, ``train.*``); ``config``: its full
    typed config, saved as the ``config.json`` artifact; ``constants``: the per-trial
    constants (:data:`~trainers.contracts.CONSTANT_METRICS`), logged once at step 0 and
    left out of every report; ``tags``: extra tags of a new run (a reference model's
    :data:`~trainers.contracts.TAG_REFERENCE`).
    """

    def __init__(self, tracking_uri: str, exp_id: str, parent_run_id: str,
                 trial_id: str, block: str, params: dict[str, Any], search: str,
                 config: Mapping[str, Any] | None = None, node_id: str = "",
                 constants: Mapping[str, float] | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        self.client = MlflowClient(tracking_uri)
        run_id = find_trial_run(self.client, exp_id, parent_run_id, trial_id)
        existing = run_id is not None
        before: Run | None = None  # the run as a restored or retried trial finds it
        #: how the trial's run says it ended (COMPLETED, STOPPED, DIVERGED), when Tune
        #: restores a trial it had finished after its last saved state; else None
        self.finished: str | None = None
        self.final_metrics: dict[str, float] = {}
        if run_id is None:
            run_id = create_run(
                self.client, exp_id, f"{block}-{trial_id}",
                {TAG_KIND: KIND_TRIAL, TAG_PARENT: parent_run_id, TAG_TRIAL_ID: trial_id,
                 TAG_BLOCK: block, TAG_STATUS: "RUNNING", TAG_SEARCH: search,
                 TAG_NODE: node_id, **(tags or {})},
                params,
            )
            if config is not None:
                self.client.log_dict(run_id, dict(config), CONFIG_ARTIFACT)
            if constants:
                log_metrics(self.client, run_id, constants, step=0)
        else:  # a restored or retried trial, maybe on another node
            before = self.client.get_run(run_id)
            ended = before.data.tags.get(TAG_STATUS)
            if ended in FINISHED_STATUSES:
                self.finished = ended
                self.final_metrics = dict(before.data.metrics)
            else:
                self.client.update_run(run_id, status="RUNNING")
            if config is not None and not any(  # a kill between create and config
                    f.path == CONFIG_ARTIFACT for f in self.client.list_artifacts(run_id)):
                self.client.log_dict(run_id, dict(config), CONFIG_ARTIFACT)
            if node_id:
                self.client.set_tag(run_id, TAG_NODE, node_id)
        self.run_id = run_id
        # A restored trial re-runs from its checkpoint, which may be older than its last
        # logged report: the loop's resume is exact, so those reports repeat what MLflow
        # already holds, and are not logged twice (no duplicate or backward steps).
        #: the steps MLflow holds a report at, with their time stamps (ms)
        self.logged_steps = logged_steps(self.client, run_id) if existing else {}
        self.logged_upto = max(self.logged_steps, default=-1)
        #: the last report MLflow held when this tracker started (its val-loss files too)
        self.restored_upto = self.logged_upto
        #: what the trial had cost by its last logged report (``WORK_ATTR``; 0 if new)
        self.logged_work = (logged_work(self.client, before, self.restored_upto)
                            if before is not None else 0.0)
        #: MLflow's asynchronous metric writes, each with the batch it sends
        self._pending: list[tuple[Any, list[Metric]]] = []
        self._files: Any = None  # the thread that writes the val-loss artifacts
        self._file_writes: list[tuple[Any, int, Any]] = []  # (future, train_flops, losses)

    def log(self, metrics: dict[str, float]) -> None:
        """One batched, asynchronous write per report, at ``step = train_flops``.

        A report MLflow already holds is not logged again. One it lacks below its last
        step (MLflow writes batches on several threads: a worker killed while an earlier
        write still retried through an outage leaves a later report in and that one out)
        is filled in by the restored trial, which re-runs it or finds it in its
        checkpoint's history, stamped with the time of the report before it, so the
        series stays in order by (time, step)."""
        step = int(metrics[STEP_AXIS])
        if step in self.logged_steps:
            return
        stamp = stamp_in_place(self.logged_steps, step)
        varying = {k: v for k, v in metrics.items() if k not in CONSTANT_METRICS}
        batch = metric_batch(varying, step, stamp)
        self.logged_steps[step] = batch[0].timestamp if batch else int(time.time() * 1000)
        self.logged_upto = max(self.logged_upto, step)
        self._pending.append((self.client.log_batch(self.run_id, metrics=batch, synchronous=False),
                              batch))

    def log_val_losses(self, train_flops: int, losses: Any) -> None:
        """The per-example validation losses of the report at ``train_flops`` (an ASHA
        milestone), as ``val_losses/<train_flops>.npy`` (float16, no pickle)."""
        if int(train_flops) <= self.restored_upto:
            return
        import numpy as np

        if self._files is None:
            from concurrent.futures import ThreadPoolExecutor

            self._files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-files")
        array = np.asarray(losses, dtype=np.float16)  # a copy: the caller's may change
        self._file_writes.append((self._files.submit(self._write_losses, int(train_flops), array),
                                  int(train_flops), array))

    def _write_losses(self, train_flops: int, losses: Any) -> None:
        import tempfile

        import numpy as np

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{train_flops}.npy"
            np.save(path, losses, allow_pickle=False)
            self.client.log_artifact(self.run_id, str(path), VAL_LOSSES_DIR)

    def flush(self, raise_errors: bool = True) -> None:
        """Wait for every write this tracker started (metrics go through MLflow's
        asynchronous logging, val-loss artifacts through the tracker's own thread, both
        off the training thread). A write that failed (the store was down when it was
        sent) is sent once more, now, the same batch with its first time stamps, so a
        store that came back holds every report in order; a retry that fails too is an
        error. Each is waited for, even after one failed; then the first failure is
        raised, or with ``raise_errors=False`` (a trial already failing) logged.

        A worker killed before its flush loses what was still unsent or retrying; the
        restored trial fills those reports in (:meth:`log`)."""
        errors: list[BaseException] = []
        # every write is waited for first: the later ones, still retrying, drain while
        # the store comes back, and the failed ones are then sent into a store that is up
        failed_batches = []
        for op, batch in self._pending:
            try:
                op.wait()
            except Exception:
                failed_batches.append(batch)
        failed_files = []
        for fut, train_flops, losses in self._file_writes:
            try:
                fut.result()
            except Exception:
                failed_files.append((train_flops, losses))
        for batch in failed_batches:
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as err:
                errors.append(err)
        for train_flops, losses in failed_files:
            try:
                self._write_losses(train_flops, losses)
            except Exception as err:
                errors.append(err)
        self._pending.clear()
        self._file_writes.clear()
        if self._files is not None:
            self._files.shutdown()
            self._files = None
        if errors and raise_errors:
            raise errors[0]
        for failure in errors:
            log.warning("an MLflow write of run %s failed: %s", self.run_id, failure)


class RunWriter:
    """A standalone run (full training, verification): params, metrics, artifacts."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str,
                 tags: Mapping[str, str], params: Mapping[str, Any]) -> None:
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = experiment_id(self.client, experiment)
        self.run_id = create_run(self.client, self.experiment_id, run_name, tags, params)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Several tags of one run (the parent's winner and description) in one batch."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@dataclass(frozen=True)
class Winner:
    """A search's winning trial and its result (its last report: every number from it)."""

    run_id: str
    trial_id: str
    block: str
    objective: float
    val_auc: float
    train_flops: float


def describe_search(name: str, winner: Winner, spent: float, budget: float, n_trials: int,
                    report: str | None = None, lift: list[str] | None = None) -> str:
    """The parent run's description (Markdown): the winner, its lift over the base rate
    and the reference models (``lift``: one sentence each), the budget spent, the report."""
    where = (f"{report} (attached to this run: `report/`, `best.yaml`)" if report else
             f"`recscale analyze {name}` writes it and attaches it here with `best.yaml`")
    parts = [
        f"**Winner:** {winner.block} trial `{winner.trial_id}` (run `{winner.run_id}`): "
        f"{OBJECTIVE} {winner.objective:.4f}, val_auc {winner.val_auc:.4f} at "
        f"{winner.train_flops:.3g} training FLOPs (the trial's last report).",
    ]
    if lift:
        parts.append("**Lift:** " + " ".join(lift))
    parts += [
        f"**Budget:** spent {spent:.3g} of {budget:.3g} training FLOPs over {n_trials} trials.",
        f"**Report:** {where}.",
    ]
    return "\n\n".join(parts)


def set_winner(client: MlflowClient, parent_run_id: str, winner: Winner,
               description: str) -> None:
    """Name the winner on the search's parent run: tags and the run's description."""
    set_tags(client, parent_run_id, {TAG_BEST_RUN: winner.run_id, TAG_BEST_TRIAL: winner.trial_id,
                                     TAG_BEST_BLOCK: winner.block, TAG_DESCRIPTION: description})
