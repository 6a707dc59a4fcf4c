"""The private Ray and Optuna attributes recscale relies on, for want of a public API.

Each is named, with the version it was checked against, where it is used
(``search/searcher.py``). If an upgrade moves one, these tests fail with its name
rather than the search failing mid-run.
"""

from __future__ import annotations

import optuna
import ray
from ray.tune.search.optuna import OptunaSearch

CHECKED = {"ray": "2.60.0", "optuna": "5.0.0"}


def test_versions_are_the_ones_checked() -> None:
    assert ray.__version__ == CHECKED["ray"], "re-check the private attributes below, then bump"
    assert optuna.__version__ == CHECKED["optuna"], "re-check the private attributes below"


def test_optuna_search_keeps_its_study_and_trials() -> None:
    def space(trial: optuna.Trial) -> dict[str, int]:
        trial.suggest_int("x", 0, 3)
        return {}

    search = OptunaSearch(space=space, metric="loss", mode="min", seed=0)
    params = search.suggest("t1")
    assert params is not None
    assert isinstance(search._ot_study, optuna.Study)
    ot_trial = search._ot_trials["t1"]
    assert isinstance(ot_trial, optuna.Trial)
    assert isinstance(ot_trial._trial_id, int)
    attrs = ot_trial.storage.get_trial_system_attrs(ot_trial._trial_id)
    assert isinstance(attrs, dict)


def test_enqueued_points_carry_fixed_params() -> None:
    study = optuna.create_study()
    study.enqueue_trial({"x": 2})
    trial = study.ask()
    attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    assert attrs.get("fixed_params") == {"x": 2}


def test_a_restored_trial_the_searcher_never_suggested_does_not_end_the_search() -> None:
    """Tune saves the experiment state before the searcher state; a driver killed between
    the two resumes a trial the restored searcher does not know."""
    from tests.searchers import small_searcher

    search = small_searcher()
    assert search.suggest("known") is not None
    search.on_trial_result("ghost", {"train_flops": 5e6, "loss": 0.5})
    search.on_trial_complete("ghost", {"train_flops": 6e6, "loss": 0.4})
    search.on_trial_complete("known", {"train_flops": 1e6, "loss": 0.3})
    assert search.spent == 7e6
    assert search._ot_study.trials[0].value == 0.3


def test_tune_reads_the_actor_reuse_wait_at_each_reset() -> None:
    """``search.trainable.run_trial`` sets ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` in the trial
    process: ray 2.60's ``FunctionTrainable.reset_config`` reads it at each reset."""
    import inspect

    from ray.tune.trainable.function_trainable import FunctionTrainable

    assert "TUNE_FUNCTION_THREAD_TIMEOUT_S" in inspect.getsource(FunctionTrainable.reset_config)
