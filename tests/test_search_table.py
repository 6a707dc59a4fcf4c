"""The search's trial table, built from Tune's trial objects (no Ray needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from search.checks import ConfigCheck
from search.runner import _trial_table
from spaces import FeatureSpec
from trainers.data import DataConfig

SPEC = FeatureSpec(cardinalities=(20, 20, 20, 20), n_numeric=1)
CHECK = ConfigCheck(DataConfig(name="synthetic"), SPEC, max_flops_per_example=None,
                    trial_flops=1e12)
CONFIG = {"model.block": "tokenmixer", "model.d_model": 16, "model.n_tokens": 4,
          "model.n_layers": 1, "model.tokenmixer.ffn_mult": 2}


def _trial(trial_id: str, status: str, last_result: dict, error_file: str | None = None):
    return SimpleNamespace(trial_id=trial_id, status=status, config=dict(CONFIG),
                           last_result=last_result, error_file=error_file)


def test_rows_come_from_trials_not_from_results(tmp_path) -> None:
    """A trial that reported, one stopped before its first report (it has an MLflow run),
    one that failed before reporting and one the budget ended while pending."""
    err = tmp_path / "error.txt"
    err.write_text("Failure # 1\nTraceback (most recent call last):\n  ...\nValueError: boom\n")
    reported = {"trial_id": "a", "train_flops": 5e8, "examples_seen": 1000.0,
                "val_logloss": 0.6, "trial_status": "completed", "mlflow_run_id": "run-a"}
    table = _trial_table([
        _trial("a", "TERMINATED", reported),
        _trial("b", "TERMINATED", {"trial_id": "b"}),
        _trial("c", "ERROR", {}, str(err)),
        _trial("d", "TERMINATED", {"trial_id": "d"}),
    ], CHECK, run_ids={"a": "run-a", "b": "run-b", "c": "run-c"})
    assert list(table["trial_id"]) == ["a", "b", "c"]  # d never ran: no row
    assert (table["model.block"] == "tokenmixer").all()
    assert table["flops_per_example"].notna().all()
    assert table["flops_per_example"].nunique() == 1
    assert list(table["train_flops"]) == [5e8, 0.0, 0.0]
    assert list(table["mlflow_run_id"]) == ["run-a", "run-b", "run-c"]
    assert list(table["error"]) == ["", "", "ValueError: boom"]
    assert table.loc[0, "val_logloss"] == pytest.approx(0.6)


def test_a_report_tune_dropped_is_taken_from_mlflow_whole() -> None:
    """The budget stopped trial "a" while its last report was in flight: MLflow has it,
    Tune does not. The row takes that report, every metric of it; "b" is up to date."""
    from search.runner import _with_reports_tune_dropped

    a = {"trial_id": "a", "train_flops": 5e8, "examples_seen": 1000.0, "val_logloss": 0.6,
         "val_auc": 0.7, "mlflow_run_id": "run-a"}
    b = {"trial_id": "b", "train_flops": 4e8, "examples_seen": 800.0, "val_logloss": 0.65,
         "val_auc": 0.69, "mlflow_run_id": "run-b"}
    table = _trial_table([_trial("a", "TERMINATED", a), _trial("b", "TERMINATED", b)], CHECK,
                         run_ids={"a": "run-a", "b": "run-b"})
    logged = {"run-a": {"train_flops": 1e9, "examples_seen": 2000.0, "val_logloss": 0.58,
                        "val_auc": 0.72, "val_logloss_se": 0.01, "flops_per_example": 1.0},
              "run-b": {"train_flops": 4e8, "val_logloss": 0.65, "val_auc": 0.69}}
    out = _with_reports_tune_dropped(table, logged).set_index("trial_id")
    assert out.loc["a", ["train_flops", "examples_seen", "val_logloss", "val_auc",
                         "val_logloss_se"]].tolist() == [1e9, 2000.0, 0.58, 0.72, 0.01]
    assert out.loc["b", ["train_flops", "val_logloss", "val_auc"]].tolist() == [4e8, 0.65, 0.69]
    assert table.loc[0, "train_flops"] == 5e8  # the input is not changed
    assert out.loc["a", "flops_per_example"] == table.loc[0, "flops_per_example"] != 1.0
