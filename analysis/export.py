"""Export the best (or compute-optimal) config of a search as an experiment YAML that
``recscale train`` accepts as is, with provenance (search, run ids, metrics)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from analysis.fits import fit_joint
from analysis.report import recommend_size, select_best
from analysis.runs import CONFIG_COLUMN, AnalysisError, SearchRuns
from spaces import FeatureSpec, ModelConfig, model_cost
from trainers.contracts import OBJECTIVE
from trainers.data import DataConfig
from trainers.experiment import ExperimentConfig, experiment_from_flat

__all__ = ["export_config", "scale_to_flops"]


def _data_config(runs: SearchRuns) -> DataConfig:
    data = runs.settings.get("data")
    return DataConfig(**data) if data else DataConfig()


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

    Without ``budget_flops``: the best trial under the cap, trained for the examples its
    search allowed one trial (``trial_flops``). With it: the best trial's family,
    resized to the joint fit's compute-optimal model size ``N*`` (under the cap) and
    trained on the compute-optimal ``D*`` examples.
    """
    best = select_best(runs.trials, max_flops_per_example)
    data = _data_config(runs)
    exp = experiment_from_flat(best[CONFIG_COLUMN], data, f"trial {best.get('trial_id')}")
    fpe = float(best["flops_per_example"])
    provenance: dict[str, Any] = {
        "search": runs.name, "parent_run_id": runs.parent_run_id, "run_id": best.get("run_id"),
        "trial_id": best.get("trial_id"), OBJECTIVE: float(best[OBJECTIVE]),
        "val_auc": float(best.get("val_auc", float("nan"))), "flops_per_example": fpe,
        # the report these numbers are from: the trial's last (trainers.contracts)
        "result_train_flops": float(best.get("train_flops", float("nan"))),
        "tracking_uri": runs.tracking_uri,
    }
    trial_flops = float(runs.settings.get("trial_flops") or 0) or float(best.get("train_flops", 0))
    examples = int(trial_flops / (3 * fpe)) if fpe > 0 and trial_flops > 0 else None
    model = exp.model
    if budget_flops is not None:
        h = runs.history.dropna(subset=["flops_per_example", "examples_seen", OBJECTIVE])
        joint = fit_joint(h["flops_per_example"], h["examples_seen"], h[OBJECTIVE],
                          n_boot=0, groups=h["run_id"])
        try:
            size = recommend_size(joint, h, budget_flops, max_flops_per_example)
        except AnalysisError as err:
            raise AnalysisError(f"cannot size for budget_flops={budget_flops:.3g}: {err}") from err
        if spec is None:
            from trainers.data import load_dataset

            spec = load_dataset(data).spec
        model = scale_to_flops(model, spec, size.flops_per_example)
        fpe = float(model_cost(model, spec).flops_per_example)
        examples = int(budget_flops / (3 * fpe))
        provenance.update({"budget_flops": budget_flops,
                           "compute_optimal_flops_per_example": size.flops_per_example,
                           "compute_optimal_examples": size.examples,
                           "predicted_val_logloss": size.predicted_val_logloss,
                           "compute_optimal_limited_by": size.limited_by,
                           "exported_flops_per_example": fpe,
                           "joint_fit": {"E": joint.E, "A": joint.A, "alpha": joint.alpha,
                                         "B": joint.B, "beta": joint.beta, "status": joint.status}})
    train = exp.train.model_copy(update={"max_examples": examples, "eval_every": None,
                                         "eval_max_examples": None})
    out = ExperimentConfig(model=model, train=train, data=data,
                           provenance={k: v for k, v in provenance.items() if v is not None})
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    out.to_yaml(output)
    return out
