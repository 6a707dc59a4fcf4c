"""Reference models in every search, and the best searched model's lift over them.

Before Tune starts, the driver trains the reference families of
:mod:`spaces.blocks.reference` (a logistic regression and a factorization machine) on the
search's split with the same loop (``trainers.loop.train``) and logs each as a child run
of the search's parent, like a trial of its own family (tag ``block = logreg | fm``), plus
:data:`~trainers.contracts.TAG_REFERENCE` and a trial id ``reference-<family>``. They are
cheap: :data:`REFERENCE_EPOCHS` passes over the training split (up to
:data:`REFERENCE_MAX_EPOCHS` on a small split) with a warmup-stable-decay schedule that
ends at the run's end, capped by the search's
``trial_flops`` and together by :data:`REFERENCE_SHARE` of its budget; they are evaluated
on the same fixed validation examples as every trial (``eval_max_examples``), with the
standard error of the log loss. They stop early once an epoch does not improve the
validation log loss (patience 1), and a reference's result is its *best* evaluation
(logged as ``best.*`` metrics of its run), with those weights: a baseline tuned on the
validation set it is compared on, which makes a lift over it only harder to claim. Their
FLOPs (all they trained, not only up to the best) are part of the search's spend.

They run in the driver, not as Ray tasks: the driver already holds the encoded dataset,
and a few epochs of a linear model take seconds. A resumed search finds them in MLflow
(a run whose ``trial_status`` is final) and does not train them again; a reference that
was interrupted mid-way is deleted and trained afresh. The best weights are saved beside
Tune's state (``<storage>/<name>/references/<family>.pt``) so the lift can be paired.

**Lift** (:class:`Comparison`): the best searched model against the base rate (predicting
the training click rate for every example) and against the best reference, in
validation log loss (baseline minus model: positive means the model is better) and AUC
(model minus baseline). Where both models' predictions on the same validation examples
are at hand (the winner's last Tune checkpoint, the references' saved weights, the base
rate always) the standard errors are *paired*: the standard deviation of the per-example
loss difference over sqrt(n), and DeLong's variance of the AUC difference. Otherwise they
are the conservative unpaired ``sqrt(se_a² + se_b²)`` (AUC SE by Hanley & McNeil). A lift
counts only beyond :data:`SIGNIFICANCE` standard errors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from spaces import FeatureSpec, ModelConfig, build_model, model_cost
from spaces.blocks.reference import REFERENCE_FAMILIES, reference_configs
from trainers.contracts import (
    BEST_PREFIX,
    CONSTANT_METRICS,
    LIFT_AGAINST,
    OBJECTIVE,
    REFERENCE_TRIAL_PREFIX,
    SEARCH_PREFIX,
    TAG_BLOCK,
    TAG_REFERENCE,
    TAG_STATUS,
    TAG_TRIAL_ID,
    TIME_ATTR,
    TRIAL_STATUSES,
    VAL_SE,
    VAL_SET_METRICS,
)
from trainers.experiment import ExperimentConfig
from trainers.loop import TrainConfig, predict_logits, train

if TYPE_CHECKING:
    from mlflow.entities import Run

    from search.runner import SearchPlan, Tracking

__all__ = ["REFERENCE_EPOCHS", "REFERENCE_SHARE", "SIGNIFICANCE", "Comparison", "Lift",
           "auc_delong", "auc_se", "base_rate_losses", "base_rate_stats", "best_reference", "compare", "compare_unpaired",
           "is_reference", "is_reference_id", "reference_result", "reference_rows",
           "reference_train_config", "search_lift",
           "train_references"]

log = logging.getLogger(__name__)

#: Passes over the training split each reference gets at least (fewer only when its FLOPs
#: cap binds) and at most: a small split gets more passes, until the run has
#: :data:`REFERENCE_MIN_STEPS` optimiser steps, since a linear model needs steps more
#: than data to converge.
REFERENCE_EPOCHS = 3
REFERENCE_MAX_EPOCHS = 10
REFERENCE_MIN_STEPS = 600
#: Most of the search budget the references may spend, together.
REFERENCE_SHARE = 0.1
#: A lift counts when it exceeds this many standard errors.
SIGNIFICANCE = 2.0
_FLOAT_NOISE = 1e-9  # nats: a log-loss difference below it is rounding, never a lift
_BATCH = 512  # the batch size, smaller on a small split (at least 64 steps an epoch)
_STATE_DIR = "references"
# learning rates (dense, embedding) per family: Adam on a linear model takes large steps
_LR = {"logreg": (1e-2, 3e-2), "fm": (3e-3, 1e-2)}
#: The metrics of a reference's best evaluation that stand as its result (its spend,
#: ``train_flops``, stays what it trained in all).
RESULT_KEYS = (OBJECTIVE, "val_auc", "val_ne", "examples_seen")


def is_reference_id(trial_id: Any) -> bool:
    """Whether ``trial_id`` names a reference run (``reference-<family>``)."""
    return str(trial_id).startswith(REFERENCE_TRIAL_PREFIX)


def is_reference(trial_ids: Iterable[Any]) -> np.ndarray:
    """Which of ``trial_ids`` name reference runs, as a boolean mask."""
    return np.array([is_reference_id(t) for t in trial_ids], dtype=bool)


# ---- statistics ------------------------------------------------------------------------


def base_rate_losses(labels: np.ndarray, rate: float) -> np.ndarray:
    """Per-example log loss of predicting ``rate`` (the training click rate) for all."""
    p = min(max(rate, 1e-7), 1 - 1e-7)
    y = np.asarray(labels, dtype=float)
    return np.asarray(-(y * math.log(p) + (1 - y) * math.log(1 - p)))


def auc_delong(labels: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several scorings of the same examples and their covariance (DeLong et al.
    1988, with mid-ranks for ties). NaN when a class is absent.

    Example:
        >>> aucs, cov = auc_delong(np.array([0, 0, 1, 1]), [np.array([.1, .4, .35, .8])])
        >>> float(aucs[0])
        0.75
    """
    from scipy.stats import rankdata

    y = np.asarray(labels) > 0.5
    m, n = int(y.sum()), int((~y).sum())
    k = len(scores)
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    v10, v01 = [], []
    for s in scores:
        s = np.asarray(s, dtype=float)
        r_all = rankdata(s)
        v10.append((r_all[y] - rankdata(s[y])) / n)  # per positive: share of negatives below
        v01.append(1.0 - (r_all[~y] - rankdata(s[~y])) / m)  # per negative: positives above
    a10, a01 = np.array(v10), np.array(v01)
    cov10 = np.atleast_2d(np.cov(a10)) if m > 1 else np.zeros((k, k))
    cov01 = np.atleast_2d(np.cov(a01)) if n > 1 else np.zeros((k, k))
    return a10.mean(axis=1), cov10 / m + cov01 / n


def auc_se(auc: float, positives: int, negatives: int) -> float:
    """Standard error of one AUC from its value and class counts (Hanley & McNeil 1982)."""
    if not (math.isfinite(auc) and positives > 0 and negatives > 0):
        return math.nan
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2)
           + (negatives - 1) * (q2 - auc**2)) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def base_rate_stats(losses: np.ndarray) -> dict[str, float]:
    """The base rate's ``val_logloss``, its SE and ``val_auc`` (0.5) from its per-example
    losses."""
    n = len(losses)
    return {OBJECTIVE: float(np.mean(losses)), "val_auc": 0.5,
            VAL_SE: float(np.std(losses, ddof=1) / math.sqrt(n)) if n > 1 else math.nan}


@dataclass(frozen=True)
class Comparison:
    """A model against one baseline on the fixed validation examples.

    ``logloss_lift = baseline − model`` (positive: the model is better) and ``auc_lift =
    model − baseline``, each with its standard error; ``paired`` says whether the SEs are
    over per-example differences (else the conservative unpaired ``sqrt(se_a² + se_b²)``).
    """

    against: str
    model: str
    model_logloss: float
    baseline_logloss: float
    logloss_lift: float
    logloss_se: float
    model_auc: float
    baseline_auc: float
    auc_lift: float
    auc_se: float
    paired: bool

    @property
    def verdict(self) -> str:
        """``better`` / ``worse`` beyond :data:`SIGNIFICANCE` SEs, else ``tie``."""
        d, se = self.logloss_lift, self.logloss_se
        if not (math.isfinite(d) and math.isfinite(se)):
            return "unknown"
        band = SIGNIFICANCE * se + _FLOAT_NOISE
        if d > band:
            return "better"
        return "worse" if d < -band else "tie"

    def sentence(self) -> str:
        """One plain sentence: the lift, its SE, and whether it is significant."""
        rel = self.logloss_lift / self.baseline_logloss if self.baseline_logloss else math.nan
        kind = "paired SE" if self.paired else "unpaired SE, conservative"
        numbers = (f"val log loss {self.model_logloss:.4f} vs {self.baseline_logloss:.4f}, "
                   f"lift {self.logloss_lift:+.4f} ± {self.logloss_se:.4f} ({rel:+.1%}); "
                   f"AUC {self.model_auc:.4f} vs {self.baseline_auc:.4f}, lift "
                   f"{self.auc_lift:+.4f} ± {self.auc_se:.4f} ({kind})")
        verdict = self.verdict
        if verdict == "better":
            head = f"{self.model} beats {self.against}"
        elif verdict == "worse":
            head = f"{self.model} is WORSE than {self.against}"
        elif verdict == "tie":
            head = (f"no significant lift of {self.model} over {self.against} (within "
                    f"{SIGNIFICANCE:g} SE)")
        else:
            head = f"{self.model} against {self.against}: lift unknown"
        return f"{head}: {numbers}."

    def metrics(self, key: str) -> dict[str, float]:
        """The parent run's ``search.lift.<key>.*`` numbers."""
        values = {"logloss": self.logloss_lift, "logloss_se": self.logloss_se,
                  "auc": self.auc_lift, "auc_se": self.auc_se,
                  "baseline_logloss": self.baseline_logloss,
                  "baseline_auc": self.baseline_auc, "paired": float(self.paired)}
        return {f"{SEARCH_PREFIX}lift.{key}.{k}": v for k, v in values.items()
                if math.isfinite(v)}


def compare(against: str, model: str, labels: np.ndarray, model_logits: np.ndarray,
            baseline_losses: np.ndarray, baseline_scores: np.ndarray) -> Comparison:
    """A paired comparison on the same validation examples: per-example log losses and
    scores of both (``baseline_scores`` may be constant: the base rate)."""
    y = np.asarray(labels, dtype=float)
    z = np.asarray(model_logits, dtype=float)
    model_losses = np.logaddexp(0.0, z) - y * z  # BCE with logits, per example
    diff = np.asarray(baseline_losses, dtype=float) - model_losses
    n = len(diff)
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    aucs, cov = auc_delong(y, [z, np.asarray(baseline_scores, dtype=float)])
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return Comparison(against, model, float(model_losses.mean()),
                      float(np.mean(baseline_losses)), float(diff.mean()), se,
                      float(aucs[0]), float(aucs[1]), float(aucs[0] - aucs[1]),
                      math.sqrt(max(float(var), 0.0)) if np.isfinite(var) else math.nan, True)


def compare_unpaired(against: str, model: str, model_stats: Mapping[str, Any],
                     baseline_stats: Mapping[str, Any], positives: int, negatives: int,
                     baseline_auc_se: float | None = None) -> Comparison:
    """A conservative comparison from each model's own numbers (``val_logloss``, its SE,
    ``val_auc``): SE of a difference = ``sqrt(se_a² + se_b²)``; an AUC's SE by Hanley &
    McNeil unless ``baseline_auc_se`` is given (0 for the base rate: a constant score's
    AUC is exactly 0.5)."""
    def get(d: Mapping[str, Any], k: str) -> float:
        v = d.get(k)
        try:
            return float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    m_loss, b_loss = get(model_stats, OBJECTIVE), get(baseline_stats, OBJECTIVE)
    m_auc, b_auc = get(model_stats, "val_auc"), get(baseline_stats, "val_auc")
    se = math.hypot(get(model_stats, VAL_SE), get(baseline_stats, VAL_SE))
    b_auc_se = (baseline_auc_se if baseline_auc_se is not None
                else auc_se(b_auc, positives, negatives))
    a_se = math.hypot(auc_se(m_auc, positives, negatives), b_auc_se)
    return Comparison(against, model, m_loss, b_loss, b_loss - m_loss, se, m_auc, b_auc,
                      m_auc - b_auc, a_se, False)


@dataclass(frozen=True)
class Lift:
    """The best searched model against the base rate and the best reference."""

    base_rate: Comparison
    reference: Comparison | None
    rate: float
    val_examples: int
    val_positives: int
    base_rate_se: float
    notes: list[str] = field(default_factory=list)

    def sentences(self) -> list[str]:
        out = [self.base_rate.sentence()]
        if self.reference is not None:
            out.append(self.reference.sentence())
        return out + self.notes

    def metrics(self) -> dict[str, float]:
        """Every number for the parent run (``search.`` prefix)."""
        values = (float(self.val_examples), float(self.val_positives), self.rate,
                  self.base_rate.baseline_logloss, self.base_rate_se)
        out = {f"{SEARCH_PREFIX}{k}": v for k, v in zip(VAL_SET_METRICS, values, strict=True)
               if math.isfinite(v)}
        out.update(self.base_rate.metrics(LIFT_AGAINST[0]))
        if self.reference is not None:
            out.update(self.reference.metrics(LIFT_AGAINST[1]))
        return out


# ---- training the references -------------------------------------------------------------


def reference_train_config(family: str, n_train: int, flops_per_example: float,
                           cap_flops: float, eval_max_examples: int | None,
                           seed: int = 0) -> TrainConfig | None:
    """How a reference trains: :data:`REFERENCE_EPOCHS` epochs in whole batches (more on
    a small split, see the module docstring), at most ``cap_flops`` training FLOPs, a
    ``wsd`` schedule ending at the run's end, one evaluation per epoch; None when not one
    batch fits in ``cap_flops``.

    Example:
        >>> tc = reference_train_config("logreg", 4800, 26, 1e12, 2000)
        >>> tc.batch_size, tc.max_examples // tc.batch_size, tc.schedule
        (75, 640, 'wsd')
    """
    bs = max(1, min(_BATCH, max(32, n_train // 64), n_train))
    per_batch = 3 * flops_per_example * bs
    per_epoch = max(1, n_train // bs)  # the loop drops an epoch's last partial batch
    epochs = min(REFERENCE_MAX_EPOCHS,
                 max(REFERENCE_EPOCHS, math.ceil(REFERENCE_MIN_STEPS / per_epoch)))
    batches = min(epochs * per_epoch, int(cap_flops // per_batch))
    if batches < 1:
        return None
    lr, emb_lr = _LR[family]
    return TrainConfig(lr=lr, optimizer="adamw_split", embedding_lr=emb_lr, batch_size=bs,
                       max_examples=batches * bs, eval_every=per_epoch * bs,
                       eval_max_examples=eval_max_examples, schedule="wsd",
                       warmup_frac=0.0, decay_frac=0.3, seed=seed,
                       early_stopping_patience=1)


def _finished(run: Run) -> bool:
    return run.data.tags.get(TAG_STATUS) in TRIAL_STATUSES


def train_references(plan: SearchPlan, tracking: Tracking) -> float:
    """Train (or find in MLflow) every reference of the search; their training FLOPs.

    A reference whose run holds a final status is not trained again; one without (an
    interrupted run) is deleted and trained afresh.
    """
    from mlflow.tracking import MlflowClient

    from trainers.tracking import trial_runs

    client = MlflowClient(tracking.uri)
    logged = {r.data.tags.get(TAG_TRIAL_ID): r
              for r in trial_runs(client, tracking.experiment_id, tracking.parent_run_id)}
    cfg, ds = plan.cfg, plan.dataset
    configs = reference_configs(ds.spec)
    available = max(0.0, plan.policy.budget_flops - plan.policy.grace_flops)
    cap = min(cfg.trial_budget, REFERENCE_SHARE * cfg.budget_flops / len(configs),
              available / len(configs))
    spent = 0.0
    for family in REFERENCE_FAMILIES:
        trial_id = f"{REFERENCE_TRIAL_PREFIX}{family}"
        run = logged.get(trial_id)
        if run is not None and _finished(run):
            spent += float(run.data.metrics.get(TIME_ATTR, 0.0))
            continue
        if run is not None:
            client.delete_run(run.info.run_id)
        spent += _train_one(plan, tracking, family, configs[family], trial_id, cap)
    return spent


def _train_one(plan: SearchPlan, tracking: Tracking, family: str, model_cfg: ModelConfig,
               trial_id: str, cap: float) -> float:
    from search.trainable import logloss_se
    from trainers.tracking import TrialTracker, finish_run, log_metrics

    cfg, ds = plan.cfg, plan.dataset
    spec: FeatureSpec = ds.spec
    cost = model_cost(model_cfg, spec)
    tc = reference_train_config(family, len(ds.train), cost.flops_per_example, cap,
                                cfg.eval_max_examples, cfg.seed)
    if tc is None:
        log.warning("reference %s skipped: one batch costs more than its %.3g FLOPs", family,
                    cap)
        return 0.0
    exp = ExperimentConfig(model=model_cfg, train=tc, data=cfg.data)
    params = {k: v for k, v in exp.flat().items() if not k.startswith("data.")}
    tracker = TrialTracker(tracking.uri, tracking.experiment_id, tracking.parent_run_id,
                           trial_id, family, params, cfg.name, config=exp.to_dict(),
                           constants={k: float(getattr(cost, k)) for k in CONSTANT_METRICS},
                           tags={TAG_REFERENCE: "true"})
    probe = build_model(model_cfg, spec)
    ses: dict[float, float] = {}  # train_flops -> val log loss SE of that report

    def report(metrics: dict[str, float], state: Any) -> bool:
        probe.load_state_dict(state()["model"])
        ses[metrics[TIME_ATTR]] = logloss_se(probe, ds.val, cfg.eval_max_examples)
        tracker.log({**metrics, VAL_SE: ses[metrics[TIME_ATTR]]})
        return False

    result = train(model_cfg, tc, spec, ds.train, ds.val, report=report, keep_best=True)
    tracker.flush()
    if result.best:  # the reference's result: its best evaluation (module docstring)
        best = {k: result.best[k] for k in RESULT_KEYS if k in result.best}
        best[VAL_SE] = ses.get(result.best.get(TIME_ATTR, -1.0), float("nan"))
        log_metrics(tracker.client, tracker.run_id,
                    {f"{BEST_PREFIX}{k}": v for k, v in best.items()}, step=0)
    if result.status == "diverged":
        finish_run(tracker.client, tracker.run_id, "DIVERGED")
        log.warning("reference %s diverged: %s", family, result.message)
    else:
        folder = plan.exp_path / _STATE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"model": result.best_state or result.model.state_dict(),
                    "examples_seen": result.best.get("examples_seen",
                                                     result.metrics.get("examples_seen", 0.0))},
                   folder / f"{family}.pt")
        finish_run(tracker.client, tracker.run_id, "COMPLETED")
    last = result.history[-1] if result.history else {}
    return float(last.get(TIME_ATTR, 0.0))


def reference_result(metrics: Mapping[str, float]) -> dict[str, float]:
    """A reference run's metrics with its result in place: the best evaluation (its
    ``best.*`` metrics, the weights it keeps) rather than its last report."""
    out = dict(metrics)
    for key in (*RESULT_KEYS, VAL_SE):
        if f"{BEST_PREFIX}{key}" in out:
            out[key] = out[f"{BEST_PREFIX}{key}"]
    return out


def reference_rows(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per reference run among ``runs`` (a search's child runs): its trial id,
    family (``model.block``), status and last report (MLflow's latest metrics)."""
    rows = []
    for run in runs:
        tags = run.data.tags
        trial_id = str(tags.get(TAG_TRIAL_ID, ""))
        if not trial_id.startswith(REFERENCE_TRIAL_PREFIX):
            continue
        rows.append({"trial_id": trial_id, "model.block": tags.get(TAG_BLOCK),
                     **reference_result(run.data.metrics),
                     "trial_status": str(tags.get(TAG_STATUS, "")).lower(),
                     "mlflow_run_id": run.info.run_id, "reference": True})
    return pd.DataFrame(rows)


# ---- the lift at the end of a search ---------------------------------------------------


def _logits(model_cfg: ModelConfig, spec: FeatureSpec, weights: Mapping[str, Any],
            split: Any, limit: int | None) -> np.ndarray:
    model = build_model(model_cfg, spec)
    model.load_state_dict(weights)
    return predict_logits(model, split, limit=limit).numpy().astype(float)


def _checkpoint_states(trial: Any) -> Iterable[Path]:
    """The state files of a Tune trial's checkpoints, newest first: the one Tune
    registered, then any on disk in the trial's folder (the experiment state may have been
    saved before the trial's last checkpoint)."""
    from search.trainable import STATE_FILE

    registered = getattr(trial, "checkpoint", None)
    if registered is not None:
        yield Path(registered.path) / STATE_FILE
    folder = getattr(trial, "path", None)  # the trial's folder in the search's storage
    if folder:
        yield from sorted(Path(folder).glob(f"checkpoint_*/{STATE_FILE}"), reverse=True)


def _winner_logits(plan: SearchPlan, tune_trials: list[Any], winner: pd.Series,
                   split: Any) -> np.ndarray | None:
    """The winner's validation logits from the Tune checkpoint of the report that is its
    result; None when no checkpoint on this machine holds that report."""
    trial = next((t for t in tune_trials if t.trial_id == winner["trial_id"]), None)
    if trial is None:
        return None
    for path in _checkpoint_states(trial):
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except (OSError, RuntimeError):
            continue  # not on this machine (remote storage), or unreadable
        if float(state.get("examples_seen", -1)) == float(winner.get("examples_seen", -2)):
            exp = plan.check.experiment(dict(trial.config))
            return _logits(exp.model, plan.dataset.spec, state["model"], split,
                           plan.cfg.eval_max_examples)
    return None


def _reference_logits(plan: SearchPlan, family: str, row: pd.Series,
                      split: Any) -> np.ndarray | None:
    path = plan.exp_path / _STATE_DIR / f"{family}.pt"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError):
        return None  # moved or unreadable: the comparison is unpaired
    if float(state.get("examples_seen", -1)) != float(row.get("examples_seen", -2)):
        return None
    return _logits(reference_configs(plan.dataset.spec)[family], plan.dataset.spec,
                   state["model"], split, plan.cfg.eval_max_examples)


def best_reference(references: pd.DataFrame) -> pd.Series | None:
    """The reference with the lowest validation loss (not diverged), if any."""
    if references.empty or OBJECTIVE not in references:
        return None
    ok = references[references["trial_status"] != "diverged"]
    values = pd.to_numeric(ok[OBJECTIVE], errors="coerce")
    ok = ok[np.isfinite(values)]
    return None if ok.empty else ok.loc[pd.to_numeric(ok[OBJECTIVE]).idxmin()]


def search_lift(plan: SearchPlan, tune_trials: list[Any], winner: pd.Series | None,
                references: pd.DataFrame) -> Lift | None:
    """The winner's lift over the base rate and the best reference, paired where the
    predictions can be recomputed (see the module docstring); None without a winner."""
    if winner is None:
        return None
    ds, limit = plan.dataset, plan.cfg.eval_max_examples
    n = len(ds.val) if limit is None else min(limit, len(ds.val))
    labels = ds.val.label[:n].numpy().astype(float)
    positives = int(labels.sum())
    rate = float(ds.train.label.float().mean())
    base_losses = base_rate_losses(labels, rate)
    name = f"the best searched model ({winner.get('model.block')} trial {winner['trial_id']})"
    notes: list[str] = []
    z = _winner_logits(plan, tune_trials, winner, ds.val)
    if z is not None:
        base = compare("the base rate", name, labels, z, base_losses, np.zeros(n))
    else:
        notes.append("The winner's checkpoint does not hold its result: unpaired SEs.")
        base = compare_unpaired("the base rate", name, winner.to_dict(),
                                base_rate_stats(base_losses), positives, n - positives, 0.0)
    ref = best_reference(references)
    against = None
    if ref is not None:
        family = str(ref["model.block"])
        label = f"the best reference ({family})"
        zr = _reference_logits(plan, family, ref, ds.val)
        if z is not None and zr is not None:
            ref_losses = np.logaddexp(0.0, zr) - labels * zr
            against = compare(label, name, labels, z, ref_losses, zr)
        else:
            against = compare_unpaired(label, name, winner.to_dict(), ref.to_dict(), positives,
                                       n - positives)
    else:
        notes.append("No reference model finished, so there is no lift over one.")
    return Lift(base, against, rate, n, positives, base_rate_stats(base_losses)[VAL_SE], notes)
