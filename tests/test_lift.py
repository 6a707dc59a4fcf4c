"""The lift read back from MLflow, the report's References section and the export gate,
on small searches written to SQLite by hand (no Ray, no training)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from analysis.lift import export_check, model_lift, references_of, without_references
from analysis.report import build_report, select_best
from analysis.runs import load_search
from recscale.cli import main
from spaces import ModelConfig
from spaces.blocks.reference import reference_configs
from spaces.features import FeatureSpec
from trainers.contracts import (
    REFERENCE_TRIAL_PREFIX,
    SEARCH_ARTIFACT,
    TAG_REFERENCE,
    TAG_TRIAL_ID,
)
from trainers.data import DataConfig
from trainers.experiment import ExperimentConfig
from trainers.loop import TrainConfig
from trainers.tracking import (
    TrialTracker,
    Winner,
    find_or_create_parent,
    finish_run,
    log_metrics,
    set_winner,
)

BASE = 0.6931  # the base rate's val log loss on the fixed validation set
SPEC = FeatureSpec(cardinalities=(20,) * 6)


def _trial(uri: str, exp_id: str, parent: str, name: str, trial_id: str, model: ModelConfig,
           loss: float, se: float, auc: float, reference: bool = False) -> str:
    exp = ExperimentConfig(model=model, train=TrainConfig(), data=DataConfig(name="synthetic"))
    tracker = TrialTracker(uri, exp_id, parent, trial_id, model.block,
                           {k: v for k, v in exp.flat().items() if not k.startswith("data.")},
                           name, config=exp.to_dict(),
                           constants={"flops_per_example": 1000.0, "params_dense": 10.0,
                                      "params_embedding": 100.0},
                           tags={TAG_REFERENCE: "true"} if reference else None)
    for step, frac in ((1e8, 1.2), (2e8, 1.0)):
        tracker.log({"val_logloss": loss * frac, "val_auc": auc, "val_logloss_se": se,
                     "train_flops": step, "examples_seen": step / 3000, "train_loss": loss,
                     "val_ne": loss / BASE, "examples_per_s": 1.0})
    tracker.flush()
    finish_run(tracker.client, tracker.run_id, "COMPLETED")
    return tracker.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (each test writes its own search into it)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('lift') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables once
    return uri


def fake_search(uri: str, name: str, best: tuple[float, float, float],
                refs: dict[str, tuple[float, float, float]],
                stored_lift: dict[str, float] | None = None) -> str:
    """A search in SQLite: two searched tokenmixer trials (the better one ``best`` =
    (loss, SE, AUC)), reference runs ``refs``, and the base-rate numbers on the parent."""
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, name, {}, {})
    client.log_dict(parent, {"name": name, "budget_flops": 1e9, "trial_flops": 2e8,
                             "data": {"name": "synthetic"}, "eval_max_examples": 10_000},
                    SEARCH_ARTIFACT)
    tm = ModelConfig(block="tokenmixer", d_model=8, n_tokens=2, n_layers=1, embed_dim=4)
    winner = _trial(uri, exp_id, parent, name, "aaaa_00000", tm, *best)
    _trial(uri, exp_id, parent, name, "aaaa_00001", tm.model_copy(update={"d_model": 16}),
           best[0] + 0.05, best[1], best[2] - 0.02)
    for family, stats in refs.items():
        _trial(uri, exp_id, parent, name, f"{REFERENCE_TRIAL_PREFIX}{family}",
               reference_configs(SPEC)[family], *stats, reference=True)
    metrics = {"search.base_rate": 0.5, "search.base_rate_val_logloss": BASE,
               "search.base_rate_val_logloss_se": 0.0005, "search.val_examples": 10_000.0,
               "search.val_positives": 5_000.0, **(stored_lift or {})}
    log_metrics(client, parent, metrics, step=0)
    set_winner(client, parent, Winner(winner, "aaaa_00000", "tokenmixer", best[0], best[2], 2e8),
               "test")
    return uri


def test_export_refuses_a_model_that_ties_the_base_rate(store, tmp_path, capsys) -> None:
    uri = fake_search(store, "tie", best=(BASE + 1e-4, 0.004, 0.5),
                      refs={"logreg": (BASE, 0.004, 0.5)})
    out = tmp_path / "best.yaml"
    args = ["export", "tie", "--tracking-uri", uri, "-o", str(out)]
    capsys.readouterr()  # MLflow's own log lines while the store was made
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recscale: error:"), lines
    assert "does not beat the base rate" in lines[0] and "--force" in lines[0]
    assert not out.exists()
    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    assert out.exists() and "recscale: warning:" in err and "exported anyway (--force)" in err


def test_export_warns_when_the_model_ties_the_best_reference(store, tmp_path, capsys) -> None:
    uri = fake_search(store, "ref-tie", best=(0.600, 0.003, 0.70),
                      refs={"logreg": (0.640, 0.003, 0.66), "fm": (0.602, 0.003, 0.70)})
    out = tmp_path / "best.yaml"
    capsys.readouterr()
    assert main(["export", "ref-tie", "--tracking-uri", uri, "-o", str(out)]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("recscale:")]
    assert len(err) == 1 and err[0].startswith("recscale: warning:"), err
    assert "does not beat the best reference (fm) by more than 2 SE" in err[0]
    assert out.exists()
    clear = fake_search(store, "clear", best=(0.550, 0.003, 0.75),
                        refs={"logreg": (0.640, 0.003, 0.66)})
    capsys.readouterr()
    assert main(["export", "clear", "--tracking-uri", clear, "-o", str(tmp_path / "c.yaml")]) == 0
    assert "recscale:" not in capsys.readouterr().err


def test_references_are_never_the_best_and_the_report_states_the_lift(store, tmp_path) -> None:
    uri = fake_search(store, "refs-win", best=(0.600, 0.003, 0.70),
                      refs={"logreg": (0.580, 0.003, 0.72), "fm": (0.590, 0.003, 0.71)})
    runs = load_search("refs-win", uri)
    assert set(references_of(runs.trials)["block"]) == {"logreg", "fm"}
    assert len(without_references(runs).trials) == 2
    best = select_best(runs.trials)
    assert best["trial_id"] == "aaaa_00000"  # the references' lower losses do not count
    lift = model_lift(runs, best)
    assert lift.reference is not None and lift.reference_trial == "reference-logreg"
    assert lift.reference.verdict == "worse" and not lift.reference.paired
    assert lift.reference.logloss_se == pytest.approx((0.003**2 + 0.003**2) ** 0.5)
    assert "WORSE than the best reference (logreg)" in lift.reference.sentence()
    assert lift.base_rate is not None and lift.base_rate.verdict == "better"
    res = build_report(runs, tmp_path / "report", n_boot=4)
    refs = res.summary["references"]
    assert {r["block"] for r in refs["trials"]} == {"logreg", "fm"}
    assert refs["lift"]["model_trial"] == "aaaa_00000"
    assert refs["lift"]["reference"]["verdict"] == "worse"
    assert res.summary["recommendation"]["best_overall"]["trial_id"] == "aaaa_00000"
    assert res.summary["n_trials"] == 2
    page = res.html.read_text()
    assert "<h2>References</h2>" in page and "WORSE than the best reference" in page
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["references"]


def test_the_winner_uses_the_searchs_paired_numbers(store, tmp_path) -> None:
    stored = {"search.lift.base_rate.logloss": 0.0931, "search.lift.base_rate.logloss_se": 0.001,
              "search.lift.base_rate.auc": 0.2, "search.lift.base_rate.auc_se": 0.004,
              "search.lift.base_rate.baseline_logloss": BASE,
              "search.lift.base_rate.baseline_auc": 0.5, "search.lift.base_rate.paired": 1.0,
              "search.lift.reference.logloss": 0.001, "search.lift.reference.logloss_se": 0.0004,
              "search.lift.reference.auc": 0.002, "search.lift.reference.auc_se": 0.001,
              "search.lift.reference.baseline_logloss": 0.601,
              "search.lift.reference.baseline_auc": 0.698, "search.lift.reference.paired": 1.0}
    uri = fake_search(store, "paired", best=(0.600, 0.003, 0.70),
                      refs={"fm": (0.601, 0.003, 0.698)}, stored_lift=stored)
    runs = load_search("paired", uri)
    trials = without_references(runs).trials
    winner = trials[trials["trial_id"] == "aaaa_00000"].iloc[0]
    lift = model_lift(runs, winner)
    assert lift.reference is not None and lift.reference.paired
    # paired, the 0.001 lift is 2.5 SE: significant, where unpaired (SE 0.0042) it is not
    assert lift.reference.logloss_se == 0.0004 and lift.reference.verdict == "better"
    other = trials[trials["trial_id"] == "aaaa_00001"].iloc[0]
    unpaired = model_lift(runs, other)
    assert unpaired.reference is not None and not unpaired.reference.paired
    assert export_check(runs, winner).warning is None
    assert "does not beat the best reference" in (export_check(runs, other).warning or "")


def test_a_search_without_references_keeps_export_open(store, tmp_path) -> None:
    uri = store
    client = MlflowClient(uri)
    exp_id, parent, _ = find_or_create_parent(client, "old", {}, {})
    tm = ModelConfig(block="tokenmixer", d_model=8, n_tokens=2, n_layers=1, embed_dim=4)
    _trial(uri, exp_id, parent, "old", "bbbb_00000", tm, 0.6, 0.003, 0.7)
    runs = load_search("old", uri)
    check = export_check(runs, select_best(runs.trials))
    assert check.refusal is None and check.lift.base_rate is None
    assert check.warning is not None and "no base-rate numbers" in check.warning
    assert all(not str(t).startswith(REFERENCE_TRIAL_PREFIX) for t in runs.trials[TAG_TRIAL_ID])
