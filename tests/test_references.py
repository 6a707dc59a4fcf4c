"""The reference models (logistic regression, factorization machine) and every search
training them first: the blocks against their formulas, the whole reference models'
exact cost, the lift statistics, and (slow) a real search on a linear teacher."""

from __future__ import annotations

import math
import re
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from search.references import (
    REFERENCE_EPOCHS,
    REFERENCE_MAX_EPOCHS,
    auc_delong,
    auc_se,
    base_rate_losses,
    compare,
    is_reference,
    is_reference_id,
    reference_train_config,
)
from spaces import FeatureSpec, build_model, model_cost
from spaces.blocks import get_block
from spaces.blocks.reference import FM_RANK, REFERENCE_FAMILIES, reference_configs
from spaces.flops import fvcore_flops, torch_flops

SPEC = FeatureSpec(cardinalities=(7, 5, 11), n_numeric=2)


def _inputs(n: int, spec: FeatureSpec = SPEC, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in spec.cardinalities], 1)
    return cat, torch.randn(n, spec.n_numeric, generator=g)


def test_fm_block_is_first_order_plus_every_pair() -> None:
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    y = get_block("fm")(get_block("fm").Config(), 5, 4)(x)
    assert y.shape == (3, 1, 4)
    w, v = x[..., 0], x[..., 1:]
    pairs = sum((v[:, i] * v[:, j]).sum(-1) for i, j in combinations(range(5), 2))
    assert torch.allclose(y[:, 0, 0], w.sum(1) + pairs)  # the O(F²) definition
    assert torch.allclose(y[:, 0, 1:], v.sum(1))


def test_fm_block_needs_two_channels_and_passes_one_token_through() -> None:
    fm = get_block("fm")
    with pytest.raises(Exception, match="d_model >= 2"):
        fm.check(fm.Config(), 4, 1)
    x = torch.randn(2, 1, 3)
    assert torch.allclose(fm(fm.Config(), 1, 3)(x), x)  # no pairs: a stacked block is identity


def test_logreg_block_sums_the_tokens() -> None:
    x = torch.randn(4, 6, 3)
    y = get_block("logreg")(get_block("logreg").Config(), 6, 3)(x)
    assert torch.allclose(y, x.sum(1, keepdim=True), atol=1e-6)


def test_reference_models_cost_exactly_the_hand_count() -> None:
    cfgs = reference_configs(SPEC)
    assert list(cfgs) == list(REFERENCE_FAMILIES) == ["logreg", "fm"]
    f, v, n = SPEC.n_fields, SPEC.total_vocab, SPEC.n_numeric
    k1 = FM_RANK + 1
    hand = {  # (FLOPs/example, dense params, embedding params)
        # tokenizer 2·F·1·1, block 2·F·1, head 2·1
        "logreg": (4 * f + 2, 2 * n + 2 * f + 2, v),
        # tokenizer 2·F·e·D, block 2·F·(2D−1), head 2·D
        "fm": (2 * f * k1 * k1 + 2 * f * (2 * k1 - 1) + 2 * k1,
               2 * n * k1 + f * (k1 * k1 + k1) + k1 + 1, v * k1),
    }
    cat, num = _inputs(4)
    for name, cfg in cfgs.items():
        cost = model_cost(cfg, SPEC)
        model = build_model(cfg, SPEC)
        assert (cost.flops_per_example, cost.params_dense, cost.params_embedding) == hand[name]
        assert sum(p.numel() for p in model.parameters()) == sum(hand[name][1:])
        assert fvcore_flops(model, (cat, num)) == 4 * cost.flops_per_example
        # torch runs the 1-wide tokenizer (contraction of length 1) as an element-wise
        # product, so its counter misses those 2·F multiply-adds of logistic regression
        missed = 2 * f if name == "logreg" else 0
        assert torch_flops(model, (cat, num)) == 4 * (cost.flops_per_example - missed)


def test_the_logreg_reference_has_no_interactions() -> None:
    """Linear in the one-hot inputs: changing two fields moves the logit by the sum of
    changing each alone."""
    model = build_model(reference_configs(SPEC)["logreg"], SPEC).double()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    cat, num = _inputs(32)
    num = num.double()
    cat2 = cat.clone()
    cat2[:, 0] = (cat[:, 0] + 1) % SPEC.cardinalities[0]
    cat3 = cat.clone()
    cat3[:, 2] = (cat[:, 2] + 3) % SPEC.cardinalities[2]
    cat23 = cat2.clone()
    cat23[:, 2] = cat3[:, 2]
    with torch.no_grad():
        f = [model(c, num) for c in (cat, cat2, cat3, cat23)]
    assert torch.allclose(f[3] - f[0], (f[1] - f[0]) + (f[2] - f[0]))


def test_the_fm_reference_is_a_factorization_machine() -> None:
    """logit = h₀·(Σ w + Σ_{i<j} <v_i, v_j>) + <h', Σ v> + c over its field tokens."""
    model = build_model(reference_configs(SPEC)["fm"], SPEC).double()
    cat, num = _inputs(16)
    with torch.no_grad():
        tokens = model.tokens(cat, num.double())  # (B, F, k+1): w and v of each field
        w, v = tokens[..., 0], tokens[..., 1:]
        f = SPEC.n_fields
        pairs = sum((v[:, i] * v[:, j]).sum(-1) for i, j in combinations(range(f), 2))
        lin = model.head[0]
        h = lin.weight[0]
        expect = h[0] * (w.sum(1) + pairs) + v.sum(1) @ h[1:] + lin.bias[0]
        assert torch.allclose(model(cat, num.double()), expect)


def test_no_bundled_space_samples_the_linear_reference() -> None:
    """The logistic regression is only a yardstick. The FM block may be searched inside
    the frame (unified space, issue 11); its trials are still never taken for the
    reference, which is known by its trial id, not its family."""
    from search.space import SPACES_DIR, load_space

    files = sorted(Path(SPACES_DIR).glob("*.yaml"))
    assert files
    for path in files:
        assert "logreg" not in load_space(path).families, path.name
    assert "fm" in REFERENCE_FAMILIES and "fm" in load_space(Path(SPACES_DIR) / "unified.yaml").families
    assert not is_reference_id("a1b2c3d4") and is_reference_id("reference-fm")


def test_reference_training_is_capped_and_ends_its_schedule() -> None:
    big = reference_train_config("fm", 1_000_000, 1_000, 1e15, 500)
    assert big is not None and big.schedule == "wsd" and big.eval_max_examples == 500
    assert big.max_examples == REFERENCE_EPOCHS * (1_000_000 // 512) * 512
    assert big.eval_every == (1_000_000 // 512) * 512  # one evaluation per epoch
    small = reference_train_config("logreg", 1_000, 30, 1e15, None)
    assert small is not None
    epochs = small.max_examples / ((1_000 // small.batch_size) * small.batch_size)
    assert REFERENCE_EPOCHS <= epochs <= REFERENCE_MAX_EPOCHS
    capped = reference_train_config("fm", 1_000_000, 1_000, 3 * 1_000 * 512 * 10, None)
    assert capped is not None and capped.max_examples == 10 * 512  # the FLOPs cap binds
    assert reference_train_config("fm", 1_000_000, 1_000, 1e3, None) is None


def test_reference_ids() -> None:
    assert list(is_reference(["reference-fm", "a1b2_00001", "reference-logreg"])) == [
        True, False, True]


# ---- statistics ------------------------------------------------------------------------


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    good = 1.5 * (y - 0.3) + rng.normal(size=n)
    worse = good + rng.normal(scale=1.5, size=n)
    return y, good, worse


def test_delong_auc_matches_sklearn_and_its_variance_the_bootstrap() -> None:
    from sklearn.metrics import roc_auc_score

    y, a, b = _scores(3000, 0)
    aucs, cov = auc_delong(y, [a, b])
    assert aucs[0] == pytest.approx(roc_auc_score(y, a))
    assert aucs[1] == pytest.approx(roc_auc_score(y, b))
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(300):
        i = rng.integers(0, len(y), len(y))
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert math.sqrt(var) == pytest.approx(np.std(diffs), rel=0.2)
    # Hanley-McNeil's single-AUC SE is of the same size as DeLong's
    m = int(y.sum())
    assert auc_se(float(aucs[0]), m, len(y) - m) == pytest.approx(math.sqrt(cov[0, 0]), rel=0.3)
    assert auc_delong(np.zeros(5), [a[:5]])[0][0] != auc_delong(np.zeros(5), [a[:5]])[0][0]


def test_paired_comparison_signs_se_and_verdicts() -> None:
    y, good, worse = _scores(4000, 2)
    worse_losses = np.logaddexp(0.0, worse) - y * worse
    c = compare("the worse model", "the good model", y, good, worse_losses, worse)
    good_losses = np.logaddexp(0.0, good) - y * good
    assert c.logloss_lift == pytest.approx(worse_losses.mean() - good_losses.mean())
    diff = worse_losses - good_losses
    assert c.logloss_se == pytest.approx(diff.std(ddof=1) / math.sqrt(len(y)))
    assert c.auc_lift > 0 and c.paired and c.verdict == "better"
    assert c.sentence().startswith("the good model beats the worse model")
    same = compare("itself", "the good model", y, good, good_losses, good)
    assert same.logloss_lift == 0 and same.auc_lift == 0 and same.verdict == "tie"
    assert same.sentence().startswith("no significant lift")
    rate = float(y.mean())
    base = compare("the base rate", "a constant", y, np.full(len(y), math.log(rate / (1 - rate))),
                   base_rate_losses(y, rate), np.zeros(len(y)))
    assert abs(base.logloss_lift) < 1e-9 and base.auc_lift == 0 and base.verdict == "tie"
    back = compare("the good model", "the worse model", y, worse, good_losses, good)
    assert back.verdict == "worse" and "WORSE" in back.sentence()


# ---- a real search on a linear teacher --------------------------------------------------


TINY_SPACE = """\
name: tiny
families: [tokenmixer]
model:
  n_layers: 1
  d_model: {choice: [8, 16]}
  n_tokens: {choice: [2, 4]}
  embed_dim: 4
  tokenizer: grouped
  pooling: mean
  head_hidden: [16]
blocks:
  tokenmixer: {ffn_mult: 1}
train:
  lr: {float: [3.0e-3, 1.0e-2], log: true}
  batch_size: 256
  optimizer: adamw_split
  embedding_lr: {float: [1.0e-2, 3.0e-2], log: true}
"""


@pytest.fixture(scope="module")
def linear_search(tmp_path_factory):
    import ray

    from search.runner import run_search
    from search.settings import SearchConfig
    from trainers.data import DataConfig, SyntheticConfig

    tmp = tmp_path_factory.mktemp("linear")
    space = tmp / "tiny.yaml"
    space.write_text(TINY_SPACE)
    data = DataConfig(name="synthetic", synthetic=SyntheticConfig(
        n_rows=6_000, n_cat_fields=6, cardinality=20, order=1, seed=1))
    cfg = SearchConfig(name="linear-refs", space=str(space), data=data, budget_flops=1e10,
                       trial_flops=2e9, eval_max_examples=2_000, max_concurrent=2, seed=0)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        out = run_search(cfg, tracking_uri=uri, storage=tmp / "ray", verbose=0)
        yield cfg, out, tmp
    finally:
        if started:
            ray.shutdown()


@pytest.mark.slow
def test_references_are_child_runs_charged_to_the_budget(linear_search) -> None:
    from mlflow.tracking import MlflowClient

    cfg, out, _ = linear_search
    client = MlflowClient(out.tracking_uri)
    runs = client.search_runs([out.experiment_id], "tags.`recscale.reference` = 'true'")
    assert sorted(r.data.tags["block"] for r in runs) == ["fm", "logreg"]
    for r in runs:
        tags = r.data.tags
        assert tags["recscale.kind"] == "trial" and tags["mlflow.parentRunId"] == out.parent_run_id
        assert tags["trial_id"] == f"reference-{tags['block']}"
        assert tags["trial_status"] == "COMPLETED" and r.info.status == "FINISHED"
        assert r.data.metrics["val_logloss_se"] > 0
        assert 0 < r.data.metrics["train_flops"] <= cfg.trial_budget
    assert set(out.references["model.block"]) == {"logreg", "fm"}
    assert not set(out.trials["model.block"]) & {"logreg", "fm"}
    refs_spent = float(out.references["train_flops"].sum())
    assert out.spent_flops == pytest.approx(out.trials["train_flops"].sum() + refs_spent)
    parent = client.get_run(out.parent_run_id)
    assert parent.data.metrics["search.spent_flops"] == pytest.approx(out.spent_flops)
    assert parent.data.metrics["search.n_references"] == 2
    # the search's trials had what the references left (and the search stopped on it)
    assert out.spent_flops <= cfg.budget_flops + cfg.max_concurrent * cfg.grace


@pytest.mark.slow
def test_on_a_linear_teacher_no_lift_is_claimed(linear_search, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from recscale.commands import print_best

    _, out, _ = linear_search
    lift = out.lift
    assert lift is not None and lift.reference is not None
    ref = lift.reference
    assert ref.paired and lift.base_rate.paired  # the winner's checkpoint was found
    assert abs(ref.logloss_lift) < 3 * ref.logloss_se, ref.sentence()
    assert ref.verdict != "better"
    assert lift.base_rate.verdict == "better"
    print_best(out)
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if "best reference" in ln)
    assert line.startswith("lift: no significant lift") or "WORSE" in line, line
    parent = MlflowClient(out.tracking_uri).get_run(out.parent_run_id)
    m = parent.data.metrics
    assert m["search.lift.reference.logloss"] == pytest.approx(ref.logloss_lift)
    assert m["search.lift.base_rate.paired"] == 1.0
    assert m["search.base_rate"] == pytest.approx(lift.rate)
    note = parent.data.tags["mlflow.note.content"]
    assert "**Lift:**" in note and ref.sentence() in note


@pytest.mark.slow
def test_a_resumed_search_does_not_train_the_references_again(linear_search) -> None:
    from mlflow.tracking import MlflowClient

    from search.runner import run_search

    cfg, out, tmp = linear_search
    client = MlflowClient(out.tracking_uri)

    def reference_history() -> dict[str, int]:
        runs = client.search_runs([out.experiment_id], "tags.`recscale.reference` = 'true'")
        return {r.data.tags["trial_id"]: len(client.get_metric_history(r.info.run_id,
                                                                       "val_logloss"))
                for r in runs}

    before = reference_history()
    again = run_search(cfg, tracking_uri=out.tracking_uri, storage=tmp / "ray",
                       resume="always", verbose=0)
    assert reference_history() == before and len(before) == 2
    assert again.spent_flops == pytest.approx(out.spent_flops)
    assert again.lift is not None and again.lift.reference is not None
    assert re.sub(r"\s+", " ", again.lift.reference.sentence()) == re.sub(
        r"\s+", " ", out.lift.reference.sentence())


def test_analysis_reads_a_reference_result_at_its_best_evaluation(monkeypatch) -> None:
    """The report and summary show a reference's best evaluation (the weights it keeps),
    as the search's end table and lift do, not its last report."""
    from types import SimpleNamespace

    import analysis.runs as runs_mod
    from search.references import reference_result
    from trainers.contracts import TAG_STATUS, TAG_TRIAL_ID

    metrics = {"val_logloss": 0.5502, "best.val_logloss": 0.5493, "val_auc": 0.7851,
               "best.val_auc": 0.7833, "train_flops": 4.2e9}
    assert reference_result(metrics)["val_logloss"] == 0.5493
    assert reference_result(metrics)["train_flops"] == 4.2e9  # its spend stays all it trained
    monkeypatch.setattr(runs_mod, "run_config", lambda run, client: {"model.block": "fm"})

    def row(trial_id: str) -> dict:
        run = SimpleNamespace(info=SimpleNamespace(run_id="r", status="FINISHED"),
                              data=SimpleNamespace(metrics=dict(metrics), tags={
                                  TAG_TRIAL_ID: trial_id, TAG_STATUS: "COMPLETED"}))
        return runs_mod._trial_row(run, None)  # type: ignore[arg-type]

    ref = row("reference-fm")
    assert (ref["val_logloss"], ref["val_auc"]) == (0.5493, 0.7833)
    searched = row("abc123")  # a searched trial's result is its last report
    assert (searched["val_logloss"], searched["val_auc"]) == (0.5502, 0.7851)
