"""The typed settings of one search (``search.*`` keys on the parent MLflow run)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.data import DataConfig

__all__ = ["MIN_STARTUP_TRIALS", "ResourceConfig", "SearchConfig", "asha_milestones"]

#: the fewest random trials TPE waits for before it models the results
MIN_STARTUP_TRIALS = 6


class ResourceConfig(BaseModel):
    """What one trial asks Ray for.

    A trial gets ``cpus_per_trial`` CPUs. Where the cluster has GPUs (``gpus="auto"``) or
    the user says so (``gpus="on"``), it also gets a GPU share that grows with the
    config's forward FLOPs: ``flops_per_example / gpu_full_at_flops`` rounded up to a
    power-of-two fraction, between ``gpu_min_fraction`` and 1 GPU.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    cpus_per_trial: float = Field(1.0, gt=0)
    gpus: Literal["auto", "on", "off"] = "auto"
    gpu_full_at_flops: float = Field(5e7, gt=0)
    gpu_min_fraction: float = Field(0.125, gt=0, le=1)


class SearchConfig(BaseModel):
    """One search: what to search, on which data, with which budgets.

    Budgets (ARCHITECTURE.md): ``max_flops_per_example`` caps serving cost (a config over
    it is never trained); ``trial_flops`` is the most one trial may spend (ASHA's
    ``max_t``); ``budget_flops`` is the whole search's training compute. ASHA's time axis
    is ``train_flops``, with milestones ``grace_flops · reduction_factor^k``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field("recscale", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    space: str = "unified"
    data: DataConfig = Field(default_factory=DataConfig)
    budget_flops: float = Field(gt=0)
    trial_flops: float | None = Field(None, gt=0)
    max_flops_per_example: float | None = Field(None, gt=0)
    grace_flops: float | None = Field(None, gt=0)
    reduction_factor: int = Field(3, ge=2)
    searcher: Literal["tpe", "random"] = "tpe"
    #: trials that finish before TPE models the results (sampled at random until then);
    #: ``None``: :attr:`startup` decides from the budget
    startup_trials: int | None = Field(None, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    objective: Literal["single", "multi"] = "single"
    max_concurrent: int = Field(2, ge=1)
    seed: int = 0
    eval_max_examples: int | None = Field(20_000, ge=1)
    reports_per_grace: int = Field(2, ge=1)
    #: a trial ends once this many evaluations in a row have not lowered its validation
    #: loss (``None``: never). A model that has started to overfit does not spend the
    #: rest of its ``trial_flops`` getting worse: its result (its last report) stays
    #: near its best, and the FLOPs it leaves go to other trials
    trial_patience: int | None = Field(3, ge=1)
    # Reusing trial actors saves ~2 s a trial on one machine; on a cluster a fresh actor
    # per trial lets Ray place each trial on whichever node has room.
    reuse_actors: bool = True
    resources: ResourceConfig = Field(default_factory=ResourceConfig)

    @model_validator(mode="after")
    def _budgets(self) -> SearchConfig:
        trial = self.trial_budget
        if trial > self.budget_flops:
            raise ValueError(
                f"trial_flops={trial:.3g} exceeds budget_flops={self.budget_flops:.3g}"
            )
        if self.grace > trial:
            raise ValueError(f"grace_flops={self.grace:.3g} exceeds trial_flops={trial:.3g}")
        if self.startup_trials is not None and (self.searcher != "tpe" or self.objective == "multi"):
            raise ValueError("startup_trials is TPE's random warm-up: it needs searcher tpe "
                             "and objective single")
        return self

    @property
    def trial_budget(self) -> float:
        """``trial_flops``, by default an eighth of the whole budget."""
        return self.trial_flops if self.trial_flops is not None else self.budget_flops / 8

    @property
    def report_every_flops(self) -> float:
        """Training FLOPs between a trial's reports: ``reports_per_grace`` per grace period."""
        return min(self.grace, self.trial_budget) / self.reports_per_grace

    @property
    def grace(self) -> float:
        """ASHA's grace period in FLOPs: by default two rungs below ``trial_flops``."""
        if self.grace_flops is not None:
            return self.grace_flops
        return self.trial_budget / self.reduction_factor**2

    @property
    def startup(self) -> int:
        """TPE's random warm-up: ``startup_trials``, by default a fifth of the trials the
        budget buys under ASHA (about ``2 · budget_flops / trial_flops``: most trials stop
        at a low rung), at least 6. ``bench/search.py`` chose it: 20 startup trials of ~100
        reached random search's final best in a median 0.24 of the budget, against 0.62
        with 6, and ended lower (bench/RESULTS.md, "Search strategies")."""
        if self.startup_trials is not None:
            return self.startup_trials
        return max(MIN_STARTUP_TRIALS, round(0.4 * self.budget_flops / self.trial_budget))


def asha_milestones(grace: float, reduction_factor: int, max_t: float) -> list[float]:
    """ASHA's rungs ``grace · rf^k`` below ``max_t``, then ``max_t`` itself."""
    out: list[float] = []
    k = 0
    while grace * reduction_factor**k < max_t * (1 - 1e-9):
        out.append(grace * reduction_factor**k)
        k += 1
        if k > 64 or math.isinf(out[-1]):
            break
    return [*out, max_t]
