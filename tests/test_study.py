"""isoFLOP studies: the design (sizes, D = C/3N, WSD), bad input, and the planted-truth
end-to-end run through Ray Tune + MLflow + analysis + verify."""

from __future__ import annotations

import argparse
import math
import tempfile
import zlib

import numpy as np
import pytest

from search.study import (
    StudyConfig,
    StudyError,
    StudyPoint,
    ladder,
    plan_study,
    size_candidates,
    study_config,
)
from spaces import FeatureSpec
from trainers.contracts import UserError
from trainers.data import DataConfig, SyntheticConfig

SPEC = FeatureSpec(cardinalities=(20,) * 6, n_numeric=0)
DATA = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=3_000, n_cat_fields=6,
                                                              cardinality=20, seed=1))

# the planted law: L(N, D) = E + A·(N/1e4)^-α + B·(D/1e5)^-β; N*(C) ∝ C^(β/(α+β))
E, A, ALPHA, B, BETA, NOISE = 0.45, 0.08, 0.30, 0.10, 0.35, 0.002
A_TRUE = BETA / (ALPHA + BETA)


def planted_loss(n: float, d: float) -> float:
    return E + A * (n / 1e4) ** -ALPHA + B * (d / 1e5) ** -BETA


def planted_n_star(c: float) -> float:
    from scipy.optimize import minimize_scalar

    r = minimize_scalar(lambda x: planted_loss(math.exp(x), c / (3 * math.exp(x))),
                        bounds=(0, 30), method="bounded", options={"xatol": 1e-8})
    return math.exp(r.x)


def planted_trainer(point: StudyPoint, data: dict) -> dict[str, float]:
    """Trains nothing: reports the planted L(N, D) plus seeded noise."""
    rng = np.random.default_rng(zlib.crc32(point.key.encode()))  # stable across processes
    loss = planted_loss(point.N, point.D) + rng.normal(0.0, NOISE)
    return {"val_logloss": loss, "examples_seen": float(point.D),
            "train_flops": 3.0 * point.N * point.D, "flops_per_example": float(point.N)}


def _cfg(**kw: object) -> StudyConfig:
    base: dict[str, object] = dict(name="t", data=DATA, budgets=ladder(1e9, 4, 4.0),
                                   families=("tokenmixer",), sizes=5, span=16.0,
                                   center_ratio=10.0, train={"batch_size": 64, "lr": 3e-3})
    base.update(kw)
    return StudyConfig(**base)  # type: ignore[arg-type]


def test_ladder() -> None:
    assert ladder(1e9, 3, 4.0) == (1e9, 4e9, 1.6e10)
    with pytest.raises(StudyError):
        ladder(0, 3)


def test_plan_spreads_sizes_around_the_centre_and_trains_for_c() -> None:
    cfg = _cfg()
    pts = plan_study(cfg, SPEC, n_train=1_000_000)
    assert len(pts) == 4 * 5
    for c in cfg.budgets:
        ns = sorted(p.N for p in pts if p.budget == c)
        n_c = math.sqrt(c / 30)
        assert len(set(ns)) == 5 and ns[0] < n_c < ns[-1]
        assert 4 < ns[-1] / ns[0] < 64  # about `span`, on the discrete grid
    for p in pts:
        assert int(p.budget // (3 * p.N)) == p.D
        assert 3 * p.N * p.D <= p.budget < 3 * p.N * (p.D + 1)
        assert p.flat["train.schedule"] == "wsd" and p.flat["train.max_examples"] == p.D
        assert p.flat["model.block"] == "tokenmixer"
        assert p.epochs == pytest.approx(p.D / 1_000_000)


def test_sizes_come_from_width_and_depth() -> None:
    cands = size_candidates(_cfg(), "tokenmixer", SPEC)
    widths = {m.d_model for _, m in cands}
    depths = {m.n_layers for _, m in cands}
    assert widths >= {4, 64, 256} and depths == {1, 2, 3, 4}
    assert [n for n, _ in cands] == sorted({n for n, _ in cands})


def test_each_family_of_a_study_gets_its_own_section() -> None:
    """A study of several families with a section for each: every family is built with
    its own knobs (a section for another family would make ModelConfig refuse, and the
    family would have no buildable size)."""
    sections = {"unimixing_lite": {"block_size": 4, "rank": 2}, "wukong": {"k": 4}}
    cfg = _cfg(families=("unimixing_lite", "wukong", "tokenmixer"),
               model={"n_tokens": 2, "embed_dim": 8, "head_hidden": [8], **sections})
    for fam in cfg.families:
        cands = size_candidates(cfg, fam, SPEC)
        assert cands, fam
        for _, m in cands:
            for key, value in sections.get(fam, {}).items():
                assert getattr(m.mixer, key) == value
    # the knobs move the sizes: UniMixing-Lite's default 16-wide blocks need T*D >= 16
    default = size_candidates(_cfg(families=("unimixing_lite",),
                                   model={"n_tokens": 2, "embed_dim": 8, "head_hidden": [8]}),
                              "unimixing_lite", SPEC)
    assert size_candidates(cfg, "unimixing_lite", SPEC)[0][0] < default[0][0]


def test_lr_grid_multiplies_points() -> None:
    assert len(plan_study(_cfg(lrs=(1e-3, 3e-3)), SPEC, None)) == 2 * 4 * 5


def test_bad_input_is_one_line_user_error() -> None:
    with pytest.raises(StudyError, match="unknown block family 'nope'") as e:
        study_config(name="x", budgets=(1e9, 4e9), families=("nope",))
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    with pytest.raises(StudyError, match="strictly ascending"):
        study_config(name="x", budgets=(4e9, 1e9))
    with pytest.raises(StudyError, match="at least 2 budgets"):
        study_config(name="x", budgets=(4e9,))
    # infeasible ladder: the smallest budget cannot train any size for min_steps batches
    with pytest.raises(StudyError, match="budget 1e\\+06 cannot spread") as e2:
        plan_study(_cfg(budgets=(1e6, 4e6)), SPEC, None)
    assert "\n" not in str(e2.value)
    # repetition cap: too few rows for the passes allowed
    with pytest.raises(StudyError, match="epochs"):
        plan_study(_cfg(max_epochs=1.0), SPEC, n_train=500)


def test_add_parsers_registers_scale_and_verify() -> None:
    from recscale.cmd_study import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["scale", "--name", "s", "--budgets", "1e9,4e9,1.6e10",
                              "--families", "tokenmixer,wukong", "--data", "synthetic"])
    assert args.cmd == "scale" and callable(args.func)
    assert args.budgets == "1e9,4e9,1.6e10"
    args = parser.parse_args(["verify", "s", "--budget-flops", "3e11"])
    assert args.name == "s" and args.budget_flops == 3e11 and callable(args.func)


def test_cli_sets_the_frame_and_size_grid() -> None:
    from recscale.cmd_study import _config, add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["scale", "--name", "s", "--budgets", "1e9,4e9", "--data",
                              "synthetic", "--widths", "4,8,16", "--depths", "2",
                              "--n-tokens", "2", "--head-hidden", "8", "--eval-examples", "1000"])
    cfg = _config(args)
    assert cfg.widths == (4, 8, 16) and cfg.depths == (2,)
    assert cfg.model["n_tokens"] == 2 and list(cfg.model["head_hidden"]) == [8]
    assert cfg.model["embed_dim"] == 8 and cfg.model["tokenizer"] == "grouped"  # defaults kept
    assert cfg.eval_max_examples == 1000
    default = _config(parser.parse_args(["scale", "--name", "s", "--budgets", "1e9,4e9"]))
    assert default.model["n_tokens"] == 4 and default.depths == (1, 2, 3, 4)
    with pytest.raises(UserError, match="scale:"):
        _config(parser.parse_args(["scale", "--name", "s", "--budgets", "1e9,4e9",
                                   "--widths", "4,x"]))


def test_cli_bad_input_raises_user_error(tmp_path) -> None:
    from recscale.cmd_study import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="cmd"))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = parser.parse_args(["verify", "missing", "--tracking-uri", uri])
    with pytest.raises(UserError, match="no MLflow store at"):
        args.func(args)  # and no empty store is created for it
    assert not (tmp_path / "m.db").exists()
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # an existing store without the study
    with pytest.raises(UserError, match="no study 'missing'"):
        args.func(args)
    args = parser.parse_args(["scale", "--name", "s", "--budgets", "1e9", "--data", "synthetic",
                              "--tracking-uri", uri])
    with pytest.raises(UserError, match="at least 2 budgets"):
        args.func(args)
    args = parser.parse_args(["scale", "--name", "s", "--families", "nope", "--data",
                              "synthetic", "--tracking-uri", uri])
    with pytest.raises(UserError, match="unknown block family"):
        args.func(args)


@pytest.mark.slow
def test_planted_truth_end_to_end(tmp_path) -> None:
    """Design -> Ray Tune -> MLflow -> isoFLOP fits -> verify recover a planted law."""
    import ray

    from analysis.isoflop import analyze_study
    from analysis.study_report import build_study_report
    from analysis.verify import rescore_verify, run_verify
    from search.study import load_study, run_study
    from trainers.data import load_dataset

    ds = load_dataset(DATA, cache_dir=tmp_path / "cache")
    # centre the spreads near the planted optimum (D/N ≈ 30 here)
    cfg = _cfg(name="planted", sizes=6, span=12.0, center_ratio=30.0, eval_max_examples=100)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    try:
        out = run_study(cfg, tracking_uri=uri, storage=tmp_path / "ray", trainer=planted_trainer,
                        dataset=ds)
        assert len(out.results) == 24 and (out.results["error"] == "").all()
        rec = load_study("planted", uri)
        assert len(rec.points) == 24
        # the synthetic teacher's Bayes loss on validation is kept with the study
        assert rec.floor_loss == pytest.approx(ds.meta["teacher_logloss"]["val"])
        # the planted trainer reads no rows: its D is not passes over the 2.4k-row
        # stand-in dataset, so the fit is told the data are fresh (n_train=None)
        fit = analyze_study(rec.points, n_train=None)
        fam = fit.families["tokenmixer"]
        assert fam.status == "converged", fam.message
        assert abs(fam.a - A_TRUE) / A_TRUE < 0.10, (fam.a, A_TRUE)
        assert fam.ci["a"][0] < A_TRUE < fam.ci["a"][1]
        target = 10 * cfg.budgets[-1]
        truth = planted_n_star(target)
        assert abs(float(fam.n_star(target)) / truth - 1) < 0.20
        assert fit.pick.status == "ok" and fit.pick.family == "tokenmixer"
        pred = fit.pick.prediction
        assert pred is not None
        assert abs(pred.loss - planted_loss(pred.N, pred.D)) < 0.005
        # verify at 10x: three runs under the study's parent, tagged verify
        ver = run_verify("planted", tracking_uri=uri, storage=tmp_path / "ray",
                         trainer=planted_trainer, dataset=ds)
        assert [r.role for r in ver.rows] == ["N*/2", "N*", "2N*"]
        for r in ver.rows:
            assert abs(r.measured - r.predicted) < 0.01
        print(f"\nplanted: a={fam.a:.4f} {fam.ci['a']} (true {A_TRUE:.4f}); N*(10x)="
              f"{float(fam.n_star(target)):.4g} (true {truth:.4g}); predicted loss "
              f"{pred.loss:.4f} vs law {planted_loss(pred.N, pred.D):.4f}")
        print(ver.table())
        rec2 = load_study("planted", uri)
        assert len(rec2.verify) == 3 and set(rec2.verify["role"]) == {"N*", "N*/2", "2N*"}
        # the recorded runs, read back and scored against the same fit, are the same table
        again = rescore_verify(rec2, fit, target)
        assert again is not None and [r.role for r in again.rows] == ["N*/2", "N*", "2N*"]
        for r, s in zip(ver.rows, again.rows):
            assert (s.N, s.measured) == (r.N, pytest.approx(r.measured, abs=1e-6))
            assert s.predicted == pytest.approx(r.predicted, abs=1e-9) and s.ci == r.ci
        assert rescore_verify(rec2, fit, 2 * target) is None
    finally:
        ray.shutdown()
    report = build_study_report(rec2, fit, ver, tmp_path / "report")
    assert (report / "summary.json").exists() and (report / "isoflop.png").exists()
