"""Per-trial resources derived from the config: CPUs, and a GPU share that grows with FLOPs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune

from search.settings import ResourceConfig

__all__ = ["TrialResources", "gpu_fraction"]


def gpu_fraction(flops_per_example: float, cfg: ResourceConfig) -> float:
    """GPU share for a model: ``flops/full_at`` rounded up to 1/2^k, in [min_fraction, 1].

    Example:
        >>> gpu_fraction(1e6, ResourceConfig(gpu_full_at_flops=1e8, gpu_min_fraction=0.125))
        0.125
        >>> gpu_fraction(3e7, ResourceConfig(gpu_full_at_flops=1e8))
        0.5
    """
    share = min(1.0, max(cfg.gpu_min_fraction, flops_per_example / cfg.gpu_full_at_flops))
    return min(1.0, 2.0 ** math.ceil(math.log2(share)))


@dataclass(frozen=True)
class TrialResources:
    """Callable for ``tune.with_resources``: a flat config -> ``PlacementGroupFactory``.

    Args:
        cfg: the resource settings.
        use_gpus: whether trials get GPUs at all (resolved from ``cfg.gpus`` and the
            cluster's resources before the search starts).
        flops_of: maps a flat trial config to its forward FLOPs per example.
    """

    cfg: ResourceConfig
    use_gpus: bool
    flops_of: Callable[[dict[str, Any]], float]

    def bundle(self, config: dict[str, Any]) -> dict[str, float]:
        bundle = {"CPU": float(self.cfg.cpus_per_trial)}
        if self.use_gpus:
            bundle["GPU"] = gpu_fraction(self.flops_of(config), self.cfg)
        return bundle

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return tune.PlacementGroupFactory([self.bundle(config)])
