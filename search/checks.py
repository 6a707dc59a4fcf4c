"""Decide, from a sampled config alone, whether it may be trained in this search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from spaces import FeatureSpec, model_cost
from spaces.blocks import BlockDimensionError
from trainers.data import DataConfig
from trainers.experiment import ExperimentConfig, experiment_from_flat, validation_message

__all__ = ["ConfigCheck"]


@dataclass(frozen=True)
class ConfigCheck:
    """Feasibility of a flat sampled config: valid, buildable, under the serving cap,
    and able to train at least one grace period within ``trial_flops``.

    Calling it returns ``(ok, constraint, reason)`` where ``constraint <= 0`` means
    feasible (Optuna's convention) and grows with how far over the cap a config is.
    """

    data: DataConfig
    spec: FeatureSpec
    max_flops_per_example: float | None
    trial_flops: float

    def experiment(self, flat: dict[str, Any]) -> ExperimentConfig:
        return experiment_from_flat(flat, self.data)

    def flops(self, flat: dict[str, Any]) -> float:
        exp = self.experiment(flat)
        return float(model_cost(exp.model, self.spec).flops_per_example)

    def try_flops(self, flat: dict[str, Any]) -> float | None:
        """``flops(flat)``, or None for a config that cannot be built."""
        try:
            return self.flops(flat)
        except (ValidationError, BlockDimensionError, ValueError):
            return None

    def __call__(self, flat: dict[str, Any]) -> tuple[bool, float, str]:
        try:
            exp = self.experiment(flat)
            fpe = model_cost(exp.model, self.spec).flops_per_example
        except (ValidationError, BlockDimensionError, ValueError) as err:
            return False, 1.0, validation_message(err, "sampled config")
        cap = self.max_flops_per_example
        if cap is not None and fpe > cap:
            return False, fpe / cap - 1.0, f"flops_per_example {fpe:.3g} > cap {cap:.3g}"
        if 3 * fpe > self.trial_flops:
            return False, 1.0, f"one example costs {3 * fpe:.3g} > trial_flops {self.trial_flops:.3g}"
        return True, (fpe / cap - 1.0) if cap else -1.0, "ok"
