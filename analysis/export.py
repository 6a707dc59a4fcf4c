"""Export the best (or compute-optimal) config of a search as an experiment YAML that
``recscale train`` accepts as is, with provenance (search, run ids, metrics)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from analysis.report import fit_search, recommend_size, select_best
from analysis.runs import CONFIG_COLUMN, AnalysisError, SearchRuns
from search.settings import SearchConfig
from spaces import FeatureSpec, ModelConfig, model_cost
from trainers.contracts import OBJECTIVE, VAL_SE
from trainers.data import DataConfig
from trainers.experiment import ExperimentConfig, experiment_from_flat
from trainers.loop import TrainConfig, trial_train_config

__all__ = ["export_config", "reproduce_trial", "scale_to_flops"]


def _data_config(runs: SearchRuns) -> DataConfig:
    """The search's data config, its file paths absolute.

    ``recscale search`` records them absolute; a search configured through the API may
    have recorded them relative to the directory it ran in, and those are resolved
    against the working directory here. They must exist, so the exported YAML
    (which stores them relative to itself) trains from anywhere.
    """
    raw = dict(runs.settings.get("data") or {})
    for key in ("path", "schema_path"):
        value = raw.get(key)
        if isinstance(value, str) and value:
            absolute = os.path.abspath(os.path.expanduser(value))
            if not os.path.exists(absolute):
                raise AnalysisError(
                    f"search {runs.name!r} read data.{key}={value!r}, which is not at "
                    f"{absolute}; run export from the directory the search ran in")
            raw[key] = absolute
    return DataConfig(**raw) if raw else DataConfig()


def _search_config(runs: SearchRuns) -> SearchConfig | None:
    """The search's settings, typed (None for a search whose record does not parse)."""
    try:
        return SearchConfig(**runs.settings) if runs.settings else None
    except (ValidationError, TypeError):
        return None


def reproduce_trial(train: TrainConfig, best: pd.Series, search: SearchConfig | None
                    ) -> TrainConfig:
    """The training config that retrains trial ``best`` to its recorded result.

    A trial's result is its last report (``trainers.contracts.RESULT_REPORT``). The
    trial trained for its share of the search (``trial_flops`` in whole batches, the
    length its learning-rate schedule and blocks' progress were planned for) and may
    have been stopped earlier by ASHA or the budget: the config keeps that planned
    length as ``max_examples`` and ends at the result's ``examples_seen``
    (``stop_after_examples``), with the trial's evaluation cadence on the same
    validation subset (``eval_max_examples``), seed, schedule, learning rate and batch.
    Without the search's settings it trains for ``examples_seen``.
    """
    seen = int(float(best["examples_seen"]))
    fpe = float(best["flops_per_example"])
    if search is None or not (fpe > 0):
        return train.model_copy(update={"max_examples": seen, "eval_every": None,
                                        "stop_after_examples": None})
    planned = trial_train_config(train, fpe, search.trial_budget, search.report_every_flops,
                                 search.eval_max_examples)
    stop = seen if seen < int(planned.max_examples or 0) else None
    return planned.model_copy(update={"stop_after_examples": stop})


def scale_to_flops(model: ModelConfig, spec: FeatureSpec, target: float) -> ModelConfig:
    """The config nearest to ``target`` FLOPs/example (from below when possible) among
    the ``d_model`` and ``n_layers`` variations of ``model``; same family and knobs."""
    best, best_gap = model, math.inf
    for layers in range(1, 9):
        for d in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
            fields = model.to_dict() | {"d_model": d, "n_layers": layers}
            try:
                cand = ModelConfig(**fields)
                f = model_cost(cand, spec).flops_per_example
            except ValueError:
                continue
            gap = abs(math.log(f / target)) + (0.0 if f <= target else 0.5)
            if gap < best_gap:
                best, best_gap = cand, gap
    return best


def export_config(runs: SearchRuns, output: str | Path, spec: FeatureSpec | None = None,
                  max_flops_per_example: float | None = None,
                  budget_flops: float | None = None) -> ExperimentConfig:
    """Write the chosen config to ``output`` and return it.

    Without ``budget_flops``: the best trial under the cap, set to retrain to its
    recorded result (:func:`reproduce_trial`); ``provenance`` holds that record
    (``val_logloss``, its standard error ``val_logloss_se``, ``examples_seen``, the
    step). With it: the best trial's family, resized to the joint fit's compute-optimal
    model size ``N*`` (under the cap) and trained on the compute-optimal ``D*``
    examples; a size outside what the search measured is refused
    (:func:`analysis.report.recommend_size`). Data paths are written relative to
    ``output``.

    Raises:
        AnalysisError: no trial qualifies, the data files are not where the search read
            them, or the budget's size is not inside what was measured.
    """
    best = select_best(runs.trials, max_flops_per_example)
    data = _data_config(runs)
    search = _search_config(runs)
    exp = experiment_from_flat(best[CONFIG_COLUMN], data, f"trial {best.get('trial_id')}")
    fpe = float(best["flops_per_example"])

    def number(key: str) -> float | None:
        value = pd.to_numeric(best.get(key), errors="coerce")
        return float(value) if pd.notna(value) else None

    provenance: dict[str, Any] = {
        "search": runs.name, "parent_run_id": runs.parent_run_id, "run_id": best.get("run_id"),
        "trial_id": best.get("trial_id"), "trial_status": best.get("status"),
        # the record: the trial's result, its last report (trainers.contracts)
        OBJECTIVE: float(best[OBJECTIVE]), VAL_SE: number(VAL_SE),
        "val_auc": number("val_auc"), "flops_per_example": fpe,
        "examples_seen": number("examples_seen"), "result_train_flops": number("train_flops"),
        "eval_max_examples": search.eval_max_examples if search else None,
        "tracking_uri": runs.tracking_uri,
    }
    train = reproduce_trial(exp.train, best, search)
    model = exp.model
    if budget_flops is not None:
        joint = fit_search(runs, n_boot=0, joint_boot=0).joint  # the report's fit, unbootstrapped
        try:
            size = recommend_size(joint, runs.history, budget_flops, max_flops_per_example)
        except AnalysisError as err:
            raise AnalysisError(f"cannot size for budget_flops={budget_flops:.3g}: {err}") from err
        if not size.trusted:
            raise AnalysisError(f"cannot size for budget_flops={budget_flops:.3g}: "
                                f"{size.status}: {size.message}")
        if spec is None:
            from trainers.data import load_dataset

            spec = load_dataset(data).spec
        model = scale_to_flops(model, spec, size.flops_per_example)
        fpe = float(model_cost(model, spec).flops_per_example)
        examples = int(budget_flops / (3 * fpe))
        train = exp.train.model_copy(update={
            "max_examples": examples, "eval_every": None, "stop_after_examples": None,
            "eval_max_examples": search.eval_max_examples if search else None})
        provenance.update({"budget_flops": budget_flops,
                           "compute_optimal_flops_per_example": size.flops_per_example,
                           "compute_optimal_examples": size.examples,
                           "predicted_val_logloss": size.predicted_val_logloss,
                           "compute_optimal_limited_by": size.limited_by,
                           "exported_flops_per_example": fpe,
                           "joint_fit": {"E": joint.E, "A": joint.A, "alpha": joint.alpha,
                                         "B": joint.B, "beta": joint.beta, "status": joint.status}})
    out = ExperimentConfig(model=model, train=train, data=data,
                           provenance={k: v for k, v in provenance.items() if v is not None})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    out.to_yaml(output)
    return out
