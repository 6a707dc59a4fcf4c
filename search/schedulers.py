"""Trial schedulers by name: a registry, as for blocks, datasets and searchers.

Every scheduler prunes on the one objective (``trainers.contracts.OBJECTIVE``) on the
time axis ``train_flops``, so trials are compared at equal compute spent. With
``objective="multi"`` the searcher (NSGA-II) also minimises ``flops_per_example``; that
second objective is fixed by the config before a trial trains, so there is nothing for
a scheduler to learn from it over time: ASHA prunes on the objective alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from search.settings import SearchConfig, asha_milestones
from trainers.contracts import OBJECTIVE, OBJECTIVE_MODE, TIME_ATTR, UserError

__all__ = ["SCHEDULERS", "make_scheduler", "scheduler_milestones"]


def _asha(cfg: SearchConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=TIME_ATTR, metric=OBJECTIVE, mode=OBJECTIVE_MODE,
                         max_t=cfg.trial_budget,  # type: ignore[arg-type]  # floats work
                         grace_period=cfg.grace,  # type: ignore[arg-type]
                         reduction_factor=cfg.reduction_factor)


def _fifo(cfg: SearchConfig) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()  # type: ignore[no-untyped-call]


def _asha_milestones(cfg: SearchConfig) -> tuple[list[float], float]:
    return asha_milestones(cfg.grace, cfg.reduction_factor, cfg.trial_budget), cfg.grace


def _full_fidelity(cfg: SearchConfig) -> tuple[list[float], float]:
    return [cfg.trial_budget], cfg.trial_budget


#: name -> (build the scheduler, its evaluation milestones and admission cost in FLOPs)
SCHEDULERS: dict[str, tuple[Callable[[SearchConfig], Any],
                            Callable[[SearchConfig], tuple[list[float], float]]]] = {
    "asha": (_asha, _asha_milestones),
    "fifo": (_fifo, _full_fidelity),
}


def _entry(name: str) -> tuple[Callable[[SearchConfig], Any],
                               Callable[[SearchConfig], tuple[list[float], float]]]:
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise UserError(f"unknown scheduler {name!r}; valid: {', '.join(sorted(SCHEDULERS))}") from None


def make_scheduler(cfg: SearchConfig) -> Any:
    """The Tune scheduler ``cfg.scheduler`` names."""
    return _entry(cfg.scheduler)[0](cfg)


def scheduler_milestones(cfg: SearchConfig) -> tuple[list[float], float]:
    """``(milestones, admission)``: the FLOPs at which the scheduler compares trials
    (ending with ``trial_flops``), and what a new trial must be able to spend."""
    return _entry(cfg.scheduler)[1](cfg)
