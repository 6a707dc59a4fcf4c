"""Datasets, searchers and schedulers are registries, as blocks are: the typed configs
accept exactly the registered names, and an unknown name fails listing the valid ones."""

from __future__ import annotations

from typing import get_args

import pytest

from search.schedulers import SCHEDULERS, make_scheduler, scheduler_milestones
from search.searcher import SAMPLERS, create_sampler
from search.settings import SearchConfig
from trainers.contracts import OBJECTIVE, TIME_ATTR, UserError
from trainers.data import DATASETS, DataConfig


def _literal(model: type, field: str) -> set[str]:
    return set(get_args(model.model_fields[field].annotation))  # type: ignore[attr-defined]


def test_config_names_are_the_registered_ones() -> None:
    assert _literal(SearchConfig, "scheduler") == set(SCHEDULERS)
    assert _literal(SearchConfig, "searcher") == set(SAMPLERS)
    for name in DATASETS:
        paths = {"path": "x.csv", "schema_path": "s.yaml"} if name == "file" else {}
        assert DataConfig(name=name, **paths).name == name
    with pytest.raises(ValueError, match="unknown dataset 'criteo'; valid names: file, movielens-1m"):
        DataConfig(name="criteo")


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UserError, match="unknown searcher 'cmaes'; valid: random, tpe"):
        create_sampler("cmaes", 0)
    cfg = SearchConfig(budget_flops=1e9).model_copy(update={"scheduler": "hyperband"})
    with pytest.raises(UserError, match="unknown scheduler 'hyperband'; valid: asha, fifo"):
        make_scheduler(cfg)


def test_asha_prunes_on_the_objective_at_equal_compute() -> None:
    """Single and multi objective alike: NSGA-II sees (objective, serving cost), but the
    cost is fixed before training, so ASHA prunes on the objective on train_flops."""
    for objective in ("single", "multi"):
        cfg = SearchConfig(budget_flops=1e9, objective=objective)
        asha = make_scheduler(cfg)
        assert (asha.metric, asha._mode, asha._time_attr) == (OBJECTIVE, "min", TIME_ATTR)
    milestones, admission = scheduler_milestones(SearchConfig(budget_flops=8e9, grace_flops=1e8))
    assert admission == 1e8 and milestones[0] == 1e8 and milestones[-1] == 1e9
    fifo, first = scheduler_milestones(SearchConfig(budget_flops=8e9, scheduler="fifo"))
    assert fifo == [1e9] and first == 1e9


def test_samplers() -> None:
    import optuna

    assert isinstance(create_sampler("tpe", 0), optuna.samplers.TPESampler)
    assert isinstance(create_sampler("tpe", 0, multi_objective=True), optuna.samplers.NSGAIISampler)
    assert isinstance(create_sampler("random", 0), optuna.samplers.RandomSampler)


def test_tpe_samples_at_random_until_its_startup_trials_finished() -> None:
    """``SearchConfig.startup_trials`` reaches TPE: with 20 it still draws exactly what
    a random sampler of the same seed draws after 10 finished trials; with 6 it does not."""
    import optuna

    def draws(sampler: optuna.samplers.BaseSampler) -> list[float]:
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.create_study(sampler=sampler)
        out = []
        for _ in range(12):
            trial = study.ask()
            x = trial.suggest_float("x", -1.0, 1.0)
            study.tell(trial, (x - 0.5) ** 2)
            out.append(x)
        return out

    random = draws(optuna.samplers.RandomSampler(seed=3))
    assert draws(create_sampler("tpe", 3, startup_trials=20)) == random
    assert draws(create_sampler("tpe", 3, startup_trials=6))[6:] != random[6:]


def test_tpe_startup_scales_with_the_trials_the_budget_buys() -> None:
    """A fifth of ~2·budget/trial_flops trials (the strategy benchmark's choice), at
    least 6, unless set; the searcher a search builds gets it."""
    bench = SearchConfig(budget_flops=2.5e11, trial_flops=5e9)  # bench/search.py's setting
    assert bench.startup == 20
    assert SearchConfig(budget_flops=8e11, trial_flops=1.6e11).startup == 6  # the demo's
    assert SearchConfig(budget_flops=2.5e11, trial_flops=5e9, startup_trials=9).startup == 9
    with pytest.raises(ValueError):
        SearchConfig(budget_flops=1e9, startup_trials=0)


def test_a_search_builds_its_tpe_with_that_startup() -> None:
    from types import SimpleNamespace

    from search.runner import make_searcher

    cfg = SearchConfig(budget_flops=2.5e11, trial_flops=5e9)
    space = SimpleNamespace(suggest=lambda trial: {}, families=["wukong"])
    plan = SimpleNamespace(cfg=cfg, space=space, check=lambda flat: (True, -1.0, "ok"),
                           policy=None)
    searcher = make_searcher(plan)  # type: ignore[arg-type]
    assert searcher._sampler._n_startup_trials == 20
