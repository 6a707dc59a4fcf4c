"""A searched model's lift over the base rate and the reference models, read back from
MLflow, and the export gate built on it.

Every search trains reference models first (``search.references``: a logistic
regression and a factorization machine, child runs with trial ids ``reference-<family>``)
and stores on its parent run the base rate's numbers (``search.base_rate``,
``search.base_rate_val_logloss`` and its SE) and its winner's *paired* lift
(``search.lift.<base_rate|reference>.*``, per-example differences on the same validation
examples). :func:`model_lift` uses those paired numbers when the model asked about is
the search's winner (the parent's ``recscale.best_run_id``); for another trial (the best
under a serving cap, say) it falls back to the conservative unpaired SE
``sqrt(se_model² + se_baseline²)`` and says so.

:func:`export_check` is the gate of ``recscale export``: a model that does not beat the
base rate by more than ``SIGNIFICANCE`` (2) standard errors is refused (``--force``
overrides), one that does not beat the best reference the same way is exported with a
warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from analysis.runs import AnalysisError, SearchRuns
from search.references import (
    SIGNIFICANCE,
    Comparison,
    best_reference,
    compare_unpaired,
    is_reference,
)
from trainers.contracts import (
    LIFT_AGAINST,
    OBJECTIVE,
    SEARCH_PREFIX,
    TAG_BEST_RUN,
    VAL_SE,
    VAL_SET_METRICS,
)

__all__ = ["ExportCheck", "ExportRefused", "ModelLift", "export_check", "model_lift",
           "parent_numbers", "references_of", "without_references"]


class ExportRefused(AnalysisError):
    """An export of a model that does not beat the base rate (``--force`` overrides)."""


def references_of(trials: pd.DataFrame) -> pd.DataFrame:
    """The reference models' rows of a search's ``trials``."""
    if trials.empty or "trial_id" not in trials:
        return trials.iloc[0:0]
    return trials[is_reference(trials["trial_id"])]


def without_references(runs: SearchRuns) -> SearchRuns:
    """``runs`` with the searched trials only (fits, frontiers and the best trial are
    about what the search explored; the references are compared with, not ranked)."""
    refs = references_of(runs.trials)
    if refs.empty:
        return runs
    keep = runs.trials[~runs.trials.index.isin(refs.index)].reset_index(drop=True)
    history = runs.history[~runs.history["run_id"].isin(refs["run_id"])].reset_index(drop=True)
    return replace(runs, trials=keep, history=history)


def parent_numbers(runs: SearchRuns) -> tuple[dict[str, float], dict[str, str]]:
    """The parent run's metrics and tags (empty without a parent in MLflow)."""
    if not (runs.parent_run_id and runs.tracking_uri):
        return {}, {}
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(runs.tracking_uri).get_run(runs.parent_run_id)
    except MlflowException:
        return {}, {}
    return dict(run.data.metrics), dict(run.data.tags)


@dataclass(frozen=True)
class ModelLift:
    """One model against the base rate and the best reference (None where unknown)."""

    base_rate: Comparison | None
    reference: Comparison | None
    reference_trial: str | None
    notes: tuple[str, ...] = ()

    def sentences(self) -> list[str]:
        out = [c.sentence() for c in (self.base_rate, self.reference) if c is not None]
        return out + list(self.notes)

    def as_dict(self) -> dict[str, Any]:
        def one(c: Comparison | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {"against": c.against, "model_logloss": c.model_logloss,
                    "baseline_logloss": c.baseline_logloss, "logloss_lift": c.logloss_lift,
                    "logloss_se": c.logloss_se, "model_auc": c.model_auc,
                    "baseline_auc": c.baseline_auc, "auc_lift": c.auc_lift,
                    "auc_se": c.auc_se, "paired": c.paired, "verdict": c.verdict}

        return {"base_rate": one(self.base_rate), "reference": one(self.reference),
                "reference_trial": self.reference_trial, "sentences": self.sentences(),
                "significance_se": SIGNIFICANCE}


def _stored(metrics: dict[str, float], against: str, label: str, model: str,
            ) -> Comparison | None:
    """A paired comparison the search stored on its parent run, if complete."""
    key = f"{SEARCH_PREFIX}lift.{against}."
    need = ("logloss", "logloss_se", "auc", "auc_se", "baseline_logloss", "baseline_auc")
    if any(key + q not in metrics for q in need):
        return None
    v = {q: metrics[key + q] for q in (*need, "paired")
         if key + q in metrics}
    return Comparison(label, model, v["baseline_logloss"] - v["logloss"],
                      v["baseline_logloss"], v["logloss"], v["logloss_se"],
                      v["baseline_auc"] + v["auc"], v["baseline_auc"], v["auc"], v["auc_se"],
                      bool(v.get("paired", 0.0)))


def model_lift(runs: SearchRuns, row: pd.Series,
               parent: tuple[dict[str, float], dict[str, str]] | None = None) -> ModelLift:
    """The lift of the trial ``row`` of ``runs`` (see the module docstring).

    ``parent``: the parent run's ``(metrics, tags)`` (read from MLflow when None).
    """
    metrics, tags = parent if parent is not None else parent_numbers(runs)
    model = f"{row.get('block')} trial {row.get('trial_id')}"
    refs = references_of(runs.trials).copy()
    if "status" in refs:
        refs["trial_status"] = refs["status"].fillna("").astype(str).str.lower()
    else:
        refs["trial_status"] = ""
    if "block" in refs:
        refs["model.block"] = refs["block"]
    ref = best_reference(refs)
    ref_label = f"the best reference ({ref['block']})" if ref is not None else ""
    winner = tags.get(TAG_BEST_RUN) == str(row.get("run_id"))
    notes: list[str] = []
    base = ref_cmp = None
    if winner:
        base = _stored(metrics, LIFT_AGAINST[0], "the base rate", model)
        if ref is not None:
            ref_cmp = _stored(metrics, LIFT_AGAINST[1], ref_label, model)
    names = dict(zip(VAL_SET_METRICS, (f"{SEARCH_PREFIX}{k}" for k in VAL_SET_METRICS),
                     strict=True))
    n = int(metrics.get(names["val_examples"], 0))
    pos = int(metrics.get(names["val_positives"], 0))
    stats = row.to_dict()
    if base is None and names["base_rate_val_logloss"] in metrics:
        base_stats = {OBJECTIVE: metrics[names["base_rate_val_logloss"]], "val_auc": 0.5,
                      VAL_SE: metrics.get(names["base_rate_val_logloss_se"], math.nan)}
        base = compare_unpaired("the base rate", model, stats, base_stats, pos, n - pos, 0.0)
    if base is None:
        notes.append("The search stored no base-rate numbers (it predates reference "
                     "models): no lift over the base rate.")
    if ref is not None and ref_cmp is None:
        ref_cmp = compare_unpaired(ref_label, model, stats, ref.to_dict(), pos, n - pos)
    if ref is None:
        notes.append("The search has no finished reference model.")
    return ModelLift(base, ref_cmp, None if ref is None else str(ref.get("trial_id")),
                     tuple(notes))


@dataclass(frozen=True)
class ExportCheck:
    """What the export gate found: ``refusal`` (one line) when the model does not beat the
    base rate by more than ``SIGNIFICANCE`` SEs, ``warning`` when it does not beat the
    best reference that way."""

    lift: ModelLift
    refusal: str | None
    warning: str | None


def export_check(runs: SearchRuns, row: pd.Series) -> ExportCheck:
    """The export gate for the trial ``row`` of ``runs``."""
    lift = model_lift(runs, row)
    refusal = warning = None
    base, ref = lift.base_rate, lift.reference
    model = f"{row.get('block')} trial {row.get('trial_id')}"
    if base is not None and base.verdict != "better":
        refusal = (f"{model} does not beat the base rate by more than {SIGNIFICANCE:g} SE "
                   f"(val log loss {base.model_logloss:.4f} vs {base.baseline_logloss:.4f}, "
                   f"lift {base.logloss_lift:+.4f} ± {base.logloss_se:.4f})")
    elif base is None:
        warning = lift.notes[0] if lift.notes else "no base-rate numbers: the gate is off"
    if ref is not None and ref.verdict != "better":
        warning = (f"{model} does not beat {ref.against} by more than {SIGNIFICANCE:g} SE "
                   f"(val log loss {ref.model_logloss:.4f} vs {ref.baseline_logloss:.4f}, "
                   f"lift {ref.logloss_lift:+.4f} ± {ref.logloss_se:.4f})")
    return ExportCheck(lift, refusal, warning)
