"""The Ray Tune trainable: thin glue between Tune, the training loop and MLflow.

Everything heavy lives elsewhere: configs in ``spaces``/``trainers``, the loop in
``trainers.loop``. The dataset arrives once through the Ray object store
(``tune.with_parameters``) as NumPy arrays shared by every trial on a node; a dataset
with behaviour histories also ships its event table once and each split's offsets
(``trainers.sequences``), so a trial with ``model.seq_len = K > 0`` gathers its
histories batch by batch from the shared arrays, whatever ``K`` is.

What a trial does besides training is kept to what a decision needs (issue 15): one
validation pass per report (the loop hands its per-example losses over, for their
standard error and, at ASHA's milestones, the losses MLflow keeps), checkpoints written
atomically (:func:`save_state`; at every report by default, or only where ASHA decides,
at the end and every ``checkpoint_every_s``: :func:`checkpoint_due`), and MLflow writes
off the training thread (``trainers.tracking.TrialTracker``), flushed at the trial's end
or as it fails.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import resource
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from spaces import FeatureSpec, model_cost
from trainers.contracts import CONSTANT_METRICS, OBJECTIVE, STEP_AXIS, TIME_ATTR, VAL_SE, WORK_ATTR
from trainers.data import DataConfig
from trainers.experiment import experiment_from_flat
from trainers.loop import predict_logits, train, trial_train_config
from trainers.sequences import EventTable, Histories

__all__ = ["SharedData", "TrialContext", "WorkMeter", "checkpoint_due", "load_state", "logloss_se", "run_trial",
           "save_state", "share_dataset", "standard_error", "val_losses"]

STATE_FILE = "state.pt"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its config (small; pickled per trial)."""

    search: str
    data: DataConfig
    trial_flops: float
    milestones: tuple[float, ...]
    report_every_flops: float
    eval_max_examples: int | None
    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    #: the longest a trial trains between two checkpoints besides those at ASHA's
    #: milestones and its end (see :func:`checkpoint_due`). 0, the default, checkpoints
    #: every report: a fault then costs at most one report interval per trial, which is
    #: what the budget's overshoot bound (``analysis.audit``) allows for; a longer one
    #: saves the checkpoints' cost but a resume may redo more (counted as spent)
    checkpoint_every_s: float = 0.0
    #: evaluations without a lower validation loss that end a trial (``None``: never)
    patience: int | None = None


@dataclass(frozen=True)
class _SplitView:
    cat: torch.Tensor
    num: torch.Tensor
    label: torch.Tensor
    history: Histories | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])


SharedData = dict[str, Any]

_EVENT_KEYS = ("item", "action", "time")
_HISTORY_KEYS = ("start", "end", "time")


def share_dataset(ds: Any) -> SharedData:
    """The encoded dataset as plain NumPy arrays (zero-copy in Ray's object store).

    ``{"spec", "train": {cat, num, label}, "val": {...}}``; with behaviour histories also
    ``"events": {item, action, time}`` (the one event table, shipped once) and each
    split's ``"history": {start, end, time}`` offsets. A history-free dataset ships
    exactly what it did before histories existed.
    """
    out: SharedData = {"spec": ds.spec}
    for name in ("train", "val"):
        split = getattr(ds, name)
        out[name] = {k: getattr(split, k).numpy() for k in ("cat", "num", "label")}
        history: Histories | None = getattr(split, "history", None)
        if history is not None:
            out[name]["history"] = {k: getattr(history, k).numpy() for k in _HISTORY_KEYS}
            out.setdefault("events", {k: getattr(history.events, k).numpy() for k in _EVENT_KEYS})
    return out


def _view(arrays: dict[str, Any], events: dict[str, np.ndarray] | None = None) -> _SplitView:
    """Tensors over a split's shared arrays (no copy), with its histories when it has
    them and ``events`` (the shared event table) is given; without ``events`` the view
    is history-free (a model that reads histories then says the data has none)."""
    with warnings.catch_warnings():  # object-store arrays are read-only; we never write
        warnings.simplefilter("ignore", UserWarning)
        cat, num, label = (torch.from_numpy(arrays[k]) for k in ("cat", "num", "label"))
        history = None
        if "history" in arrays and events is not None:
            table = EventTable(*(torch.from_numpy(events[k]) for k in _EVENT_KEYS))
            history = Histories(table, *(torch.from_numpy(arrays["history"][k])
                                         for k in _HISTORY_KEYS))
        return _SplitView(cat, num, label, history)


def val_losses(model: torch.nn.Module, split: Any, limit: int | None) -> torch.Tensor:
    """Per-example log losses of ``model`` on the examples
    ``trainers.loop.evaluate(..., limit=limit)`` scores (the fixed set every report of
    every trial is evaluated on; their mean is its ``val_logloss``)."""
    logits = predict_logits(model, split, limit=limit)
    labels = split.label[: len(logits)]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels,
                                                                reduction="none")


def standard_error(losses: torch.Tensor) -> float:
    """The standard error of the mean of ``losses``: their standard deviation over sqrt(n)."""
    n = len(losses)
    return float(losses.std() / math.sqrt(n)) if n > 1 else float("nan")


def logloss_se(model: torch.nn.Module, split: Any, limit: int | None) -> float:
    """Standard error of the validation log loss of ``model`` (see :func:`val_losses`)."""
    return standard_error(val_losses(model, split, limit))


def _read_state(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The loop state saved in a checkpoint directory, or None when it is missing or
    unreadable (a file truncated by a kill during the write)."""
    try:
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        why = (str(err).splitlines() or [type(err).__name__])[0][:200]
        log.warning("checkpoint %s unreadable (%s)", directory, why)
        return None
    return state if isinstance(state, dict) else None


def load_state(path: str) -> dict[str, Any] | None:
    """The training state to resume from: the checkpoint Tune restores (``path``) or,
    when that one is unreadable, the newest older checkpoint of the same trial that is
    readable (Tune keeps the last few, ``CheckpointConfig.num_to_keep``); None (start
    over) when none is. The fallback looks beside ``path`` on the local file system."""
    state = _read_state(path)
    if state is not None:
        return state
    here = Path(path)
    older = sorted((p for p in here.parent.glob("checkpoint_*")
                    if p.is_dir() and p.name < here.name), reverse=True)
    for candidate in older:
        state = _read_state(candidate)
        if state is not None:
            log.warning("resuming from the older checkpoint %s", candidate.name)
            return state
    log.warning("no readable checkpoint for this trial: it starts over")
    return None


def save_state(state: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``state`` as ``<directory>/state.pt`` atomically: to a temporary name first,
    then renamed, so the file is either whole or absent (a kill mid-write leaves no cut
    file under the real name; one cut later, in the copy to the storage, is caught by
    :func:`load_state`, which falls back to an older checkpoint)."""
    path = Path(directory) / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def checkpoint_due(examples_seen: int, done: bool, milestones: set[int] | frozenset[int],
                   since_last: float, every_s: float) -> bool:
    """Whether a report carries a checkpoint: at the trial's end (its result: the
    weights the lift and an export read), at each of ASHA's milestones (where ASHA
    decides; a trial it stops ends there), and otherwise once ``every_s`` seconds have
    passed since the last one, which bounds the training a fault costs (a trial
    restored, or retried after its worker died, resumes from its last checkpoint). The
    reports between only count the budget and draw the curves.

    Example:
        >>> checkpoint_due(300, False, {100, 300}, 1.0, 60.0)
        True
        >>> checkpoint_due(200, False, {100, 300}, 1.0, 60.0)
        False
        >>> checkpoint_due(200, False, {100, 300}, 61.0, 60.0)
        True
    """
    return done or examples_seen in milestones or since_last >= every_s


@dataclass(frozen=True)
class WorkMeter:
    """A trial's cost so far (``WORK_ATTR``) at each of its reports.

    A trial restored from its checkpoint at ``at_checkpoint`` (``train_flops``) trains
    again from there up to the point it had reached: that segment is work too. ``base``
    is what it had cost when it was interrupted: the work of its last logged report (its
    last step, for a run logged before work was), at least ``at_checkpoint``. A fresh
    trial has both 0, so its work is its ``train_flops``.

    Example:
        >>> meter = WorkMeter(base=900.0, at_checkpoint=300.0)  # killed at 900, restored at 300
        >>> meter.at(600.0), meter.at(1200.0)
        (1200.0, 1800.0)
        >>> WorkMeter().at(600.0)
        600.0
    """

    base: float = 0.0
    at_checkpoint: float = 0.0

    @classmethod
    def resumed(cls, logged_work: float, at_checkpoint: float) -> WorkMeter:
        return cls(max(logged_work, at_checkpoint), at_checkpoint)

    def at(self, train_flops: float) -> float:
        return self.base + max(0.0, train_flops - self.at_checkpoint)


class _TrialClock:
    """Where a trial's time goes, reported to Tune beside the metrics (not to MLflow):
    ``startup_seconds`` (trial start to the first training step), ``eval_seconds`` (the
    time between reports outside the optimiser steps: validation, mostly),
    ``report_seconds`` (inside the reports before this one: logging, the checkpoint,
    Tune's hand-over to the driver and back) and ``checkpoints`` (how many reports,
    this one included, carried one)."""

    def __init__(self, started: float, loop: float = 0.0) -> None:
        self.started = started
        self.startup = self.eval = self.in_report = 0.0
        self.loop = loop  # the loop's own step time at the last report (or the resume)
        self.checkpoints = 0
        self._mark = self._last_checkpoint = started
        self._report_start = started

    def training(self) -> None:
        now = time.perf_counter()
        self.startup = now - self.started
        self._mark = self._last_checkpoint = now

    def reported(self, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        rate = metrics.get("examples_per_s", 0.0)
        loop = metrics["examples_seen"] / rate if rate > 0 else self.loop
        self.eval += max(0.0, (now - self._mark) - (loop - self.loop))
        self.loop, self._report_start = loop, now

    def since_checkpoint(self) -> float:
        return time.perf_counter() - self._last_checkpoint

    def checkpointed(self) -> None:
        self.checkpoints += 1
        self._last_checkpoint = time.perf_counter()

    def report_done(self) -> None:
        self._mark = time.perf_counter()
        self.in_report += self._mark - self._report_start

    def figures(self) -> dict[str, float]:
        return {"startup_seconds": self.startup, "eval_seconds": self.eval,
                "report_seconds": self.in_report, "checkpoints": float(self.checkpoints)}


def _trial_resources() -> dict[str, float]:
    """CPUs and GPU share Tune gave this trial (1 CPU outside Tune)."""
    try:
        bundles = tune.get_context().get_trial_resources().bundles
    except Exception:  # outside Tune (direct calls in tests)
        return {"CPU": 1.0, "GPU": 0.0}
    return {k: float(sum(b.get(k, 0) for b in bundles)) for k in ("CPU", "GPU")}


#: Seconds Tune waits for a finished trial's thread before it reuses the actor.
ACTOR_REUSE_WAIT_S = 60


def run_trial(config: dict[str, Any], ctx: TrialContext, data: SharedData) -> None:
    """Train one sampled config, reporting at ASHA milestones and every report interval."""
    import ray

    started = time.perf_counter()
    # Tune reuses this actor for the next trial only once this function's thread has
    # ended (it ends the MLflow run, which waits for the server); Tune waits 2 s by
    # default, then drops the next trial as ERROR (ray 2.60 FunctionTrainable.reset_config,
    # read there at each reset; search.budget.tune_view)
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(ACTOR_REUSE_WAIT_S))
    resources = _trial_resources()
    torch.set_num_threads(max(1, int(resources["CPU"])))
    spec: FeatureSpec = data["spec"]
    exp = experiment_from_flat(config, ctx.data)
    cost = model_cost(exp.model, spec)
    # every point in whole batches (the loop never steps on part of one): the trial's
    # budget rounded down, report points to the nearest, ASHA's milestones up (so the
    # report at a milestone has reached it; FLOPs count the examples actually seen)
    train_cfg = trial_train_config(exp.train, cost.flops_per_example, ctx.trial_flops,
                                   ctx.report_every_flops, ctx.eval_max_examples, ctx.patience)
    train_split = _view(data["train"], data.get("events"))
    # the planned length: the trial's FLOPs, or its max_epochs passes if fewer
    bs, max_examples = train_cfg.batch_size, train_cfg.total_examples(len(train_split))
    per_batch = 3 * cost.flops_per_example * bs
    eval_at = [min(max_examples, bs * math.ceil(m / per_batch)) for m in ctx.milestones]
    milestone_examples = set(eval_at)
    trial_id = tune.get_context().get_trial_id() or "local"
    device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"

    tracker = None
    if ctx.tracking_uri and ctx.experiment_id and ctx.parent_run_id:
        from trainers.tracking import TrialTracker

        params = {k: v for k, v in exp.flat().items() if not k.startswith("data.")}
        constants = {k: float(getattr(cost, k)) for k in CONSTANT_METRICS}
        tracker = TrialTracker(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id,
                               trial_id, exp.model.block, params, ctx.search,
                               config=exp.to_dict(), constants=constants,
                               node_id=ray.get_runtime_context().get_node_id())

    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        import pyarrow.fs

        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            resume = load_state(checkpoint.path)  # older siblings reachable on failure
        else:
            with checkpoint.as_directory() as d:
                resume = load_state(d)

    # what the trial had cost when it was interrupted (read before the gap below is
    # filled); a retried trial with no checkpoint starts over from 0
    meter = WorkMeter.resumed(
        tracker.logged_work if tracker is not None else 0.0,
        float(cost.train_flops(int(resume["examples_seen"]))) if resume is not None else 0.0)
    if tracker is not None and resume is not None and tracker.finished is None:
        # reports the checkpoint holds but MLflow lacks: a trial's writes are batched off
        # its thread, and a worker killed (out of memory, a lost node) takes the unsent
        # ones with it, or one still retrying through an MLflow outage while a later one
        # landed; the resume starts past them, so they are logged now, each in its place
        # (tracker.log skips what MLflow has), leaving no gap
        for past in resume.get("history", []):
            if STEP_AXIS in past:
                tracker.log(dict(past))

    extra = {
        "mlflow_run_id": tracker.run_id if tracker else "", "device": device,
        "gpu_share": resources["GPU"], "gpu_ids": len(ray.get_gpu_ids()),
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    if tracker is not None and tracker.finished is not None:
        # Tune finished this trial (ASHA stopped it, or it completed) after its last saved
        # experiment state, and restores it as unfinished: its run says how it ended, so
        # it reports that result again instead of training on
        if OBJECTIVE in tracker.final_metrics:  # else it ended before its first report
            tune.report({**tracker.final_metrics, **extra,
                         "trial_status": tracker.finished.lower()})
        return

    val = _view(data["val"], data.get("events"))
    # the loop's evaluation hands over its per-example losses: their standard error and,
    # at ASHA's milestones, the losses themselves need no second validation pass
    latest: dict[str, torch.Tensor] = {}
    clock = _TrialClock(started, float(resume["elapsed"]) if resume is not None else 0.0)

    def report(metrics: dict[str, float], state: Any) -> bool:
        clock.reported(metrics)
        seen = int(metrics["examples_seen"])
        done = seen >= max_examples
        losses = latest.pop("losses")
        metrics = {**metrics, VAL_SE: standard_error(losses),
                   WORK_ATTR: meter.at(metrics[TIME_ATTR]),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "trial_seconds": time.perf_counter() - started}
        if tracker is not None:
            tracker.log(metrics)
            if seen in milestone_examples:  # what ASHA compares
                tracker.log_val_losses(int(metrics[STEP_AXIS]), losses.numpy())
        due = checkpoint_due(seen, done, milestone_examples, clock.since_checkpoint(),
                             ctx.checkpoint_every_s)
        if due:
            clock.checkpointed()
        result = {**metrics, **extra, **clock.figures(),
                  "trial_status": "completed" if done else "running"}
        if due:
            with tempfile.TemporaryDirectory() as d:
                save_state(state(), d)
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(result)
        clock.report_done()
        return False

    clock.training()
    try:
        result = train(exp.model, train_cfg, spec, train_split,
                       val, report=report, resume=resume, eval_at=eval_at, device=device,
                       on_eval_losses=lambda losses: latest.__setitem__("losses", losses))
    except BaseException:
        # what the trial logged before failing is written out (a retry resumes from its
        # checkpoint and does not log those reports again); the failure is the trial's
        if tracker is not None:
            tracker.flush(raise_errors=False)
        raise
    if result.status == "diverged":
        last = result.history[-1] if result.history else {
            OBJECTIVE: float("inf"), TIME_ATTR: 0.0, STEP_AXIS: 0.0}
        tune.report({**last, **extra, WORK_ATTR: meter.at(float(last[TIME_ATTR])),
                     "trial_status": "diverged", "message": result.message})
    if tracker is not None:
        tracker.flush()
