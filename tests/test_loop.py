"""The training loop: metrics contract, exact resume, divergence, optimiser groups."""

from __future__ import annotations

import io
import math

import pytest
import torch

from spaces import ModelConfig
from tests.test_model import planted_pairwise
from trainers.loop import TrainConfig, normalized_entropy, train

METRICS = {"val_logloss", "val_auc", "val_ne", "train_loss", "examples_seen", "train_flops",
           "flops_per_example", "params_dense", "params_embedding", "examples_per_s"}
CFG = ModelConfig(block="tokenmixer", d_model=16, n_tokens=4, n_layers=1, embed_dim=8,
                  head_hidden=(16,))


@pytest.fixture(scope="module")
def data():
    spec, tr = planted_pairwise(3000, seed=0)
    _, va = planted_pairwise(1000, seed=1)
    return spec, tr, va


def test_reports_every_contract_metric(data) -> None:
    spec, tr, va = data
    seen: list[dict] = []
    tc = TrainConfig(batch_size=100, max_examples=1000, eval_every=250)
    res = train(CFG, tc, spec, tr, va, report=lambda m, s: seen.append(m) or False)
    # each evaluation at the first whole-batch boundary at or after its point
    assert [m["examples_seen"] for m in seen] == [300, 500, 800, 1000]
    for m in seen:
        assert set(m) == METRICS
        assert m["train_flops"] == 3 * m["flops_per_example"] * m["examples_seen"]
    assert res.metrics == seen[-1]
    assert seen[-1]["val_ne"] == pytest.approx(
        normalized_entropy(seen[-1]["val_logloss"], float(tr.label.mean())))


def test_evaluations_land_on_batch_boundaries_and_every_step_is_a_whole_batch(data) -> None:
    """Issue 12: no optimiser step on a sliver of a batch (not at an evaluation point,
    not at an epoch's end), and one evaluation per point, at the next batch boundary."""
    spec, tr, va = data  # 3000 training examples: 23 batches of 128 per epoch, 56 left over
    seen: list[float] = []
    steps: list[int] = []
    tc = TrainConfig(batch_size=128, max_examples=7 * 1024, eval_every=10_000)
    train(CFG, tc, spec, tr, va, report=lambda m, s: seen.append(m["examples_seen"]) or False,
          eval_at=[333, 777, 3 * 1024], on_step=lambda n, loss: steps.append(n))
    assert seen == [384, 896, 3 * 1024, 7 * 1024]
    assert all(b - a == 128 for a, b in zip([0, *steps], steps)), "a step on a partial batch"


def test_evaluations_at_whole_batches_are_hit_exactly(data) -> None:
    spec, tr, va = data
    seen: list[float] = []
    tc = TrainConfig(batch_size=128, max_examples=1024, eval_every=10_000)
    train(CFG, tc, spec, tr, va, report=lambda m, s: seen.append(m["examples_seen"]) or False,
          eval_at=[256, 768, 768])
    assert seen == [256, 768, 1024]


def test_callback_can_stop_the_run(data) -> None:
    spec, tr, va = data
    tc = TrainConfig(batch_size=100, max_examples=2000, eval_every=500)
    res = train(CFG, tc, spec, tr, va, report=lambda m, s: m["examples_seen"] >= 1000)
    assert res.status == "stopped" and res.metrics["examples_seen"] == 1000


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_is_exact(data, schedule: str) -> None:
    """Interrupt at 1800 of 4000 examples (mid-epoch), save through torch.save /
    torch.load(weights_only=True), resume: same weights and metrics as uninterrupted."""
    spec, tr, va = data
    tc = TrainConfig(batch_size=128, max_examples=4000, eval_every=600, schedule=schedule, seed=7)
    full = train(CFG, tc, spec, tr, va)
    saved: dict = {}

    def interrupt(m, state):
        if m["examples_seen"] >= 1800:
            buf = io.BytesIO()
            torch.save(state(), buf)
            saved["state"] = buf.getvalue()
            return True
        return False

    first = train(CFG, tc, spec, tr, va, report=interrupt)
    assert first.status == "stopped"
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    resumed = train(CFG, tc, spec, tr, va, resume=state)
    assert resumed.status == "completed"
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    timing = {"examples_per_s"}
    assert {k: v for k, v in full.metrics.items() if k not in timing} == \
        {k: v for k, v in resumed.metrics.items() if k not in timing}
    assert len(resumed.history) == len(full.history)


def test_divergence_ends_with_a_status(data) -> None:
    spec, tr, va = data
    tc = TrainConfig(lr=1.0, batch_size=64, max_examples=3000, eval_every=500, grad_clip=None)
    bad = tr.__class__(tr.cat, tr.num, tr.label.clone())
    bad.label[5] = float("nan")  # a poisoned label makes the loss NaN
    res = train(CFG, tc, spec, bad, va)
    assert res.status == "diverged"
    assert "nan" in res.message.lower()


def test_split_optimizer_uses_the_embedding_lr(data) -> None:
    spec, tr, va = data
    tc = TrainConfig(optimizer="adamw_split", lr=1e-3, embedding_lr=1e-3,
                     batch_size=100, max_examples=300)
    torch.manual_seed(tc.seed)
    res = train(CFG, tc.model_copy(update={"embedding_lr": 1e-9}), spec, tr, va)
    from spaces import build_model

    torch.manual_seed(tc.seed)
    init = build_model(CFG, spec)
    delta_emb = (res.model.embedding.weight - init.embedding.weight).abs().max()
    delta_head = max((a - b).abs().max() for (n, a), (_, b) in
                     zip(res.model.state_dict().items(), init.state_dict().items()) if n.startswith("head"))
    assert delta_emb < 1e-6 < delta_head


def _row_norms(res, spec, tr) -> tuple[float, float]:
    """Mean squared norm of the embedding rows the training split uses, and of the
    rows it never looks up (trained only through weight decay)."""
    from spaces import build_model

    offsets = build_model(CFG, spec).offsets
    used = torch.zeros(res.model.embedding.weight.shape[0], dtype=torch.bool)
    used[(tr.cat + offsets).flatten()] = True
    sq = res.model.embedding.weight.detach().pow(2).sum(-1)
    return float(sq[used].mean()), float(sq[~used].mean()) if (~used).any() else float("nan")


def test_embedding_weight_decay_shrinks_the_tables_and_only_them(data) -> None:
    """``embedding_weight_decay`` is the embedding group's AdamW decay: with it the
    tables end smaller; the dense weights' decay stays ``weight_decay``'s."""
    spec, tr, va = data
    tc = TrainConfig(optimizer="adamw_split", lr=3e-3, embedding_lr=1e-2, batch_size=100,
                     max_examples=3000)
    plain = train(CFG, tc, spec, tr, va)
    decayed = train(CFG, tc.model_copy(update={"embedding_weight_decay": 5.0}), spec, tr, va)
    assert _row_norms(decayed, spec, tr)[0] < 0.7 * _row_norms(plain, spec, tr)[0]
    from trainers.loop import _optimizer

    groups = _optimizer(decayed.model, tc.model_copy(update={
        "embedding_weight_decay": 0.5, "weight_decay": 1e-4})).param_groups
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.5]
    assert groups[1]["params"] == [decayed.model.embedding.weight]


def test_the_look_up_hook_goes_with_a_run_that_fails(data, monkeypatch) -> None:
    """A run that raises (here from its report) still takes its ``embedding_l2`` hook
    off the model, which outlives it."""
    spec, tr, va = data
    hooked: list[torch.nn.Module] = []
    register = torch.nn.Module.register_forward_hook

    def spy(self, *args, **kwargs):
        hooked.append(self)
        return register(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", spy)

    def fail(m: dict, state) -> bool:
        raise RuntimeError("report failed")

    tc = TrainConfig(batch_size=100, max_examples=1000, eval_every=300, embedding_l2=0.1)
    with pytest.raises(RuntimeError, match="report failed"):
        train(CFG, tc, spec, tr, va, report=fail)
    assert len(hooked) == 1 and not hooked[0]._forward_hooks


def test_embedding_l2_regularises_the_rows_a_batch_uses(data) -> None:
    """``embedding_l2`` penalises the looked-up rows: they end smaller, the rows no
    batch uses keep their initial values (Adam never steps them), ``train_loss`` stays
    the log loss and the FLOPs accounting is unchanged."""
    spec, tr, va = data
    tc = TrainConfig(optimizer="adamw_split", lr=3e-3, embedding_lr=1e-2, batch_size=100,
                     max_examples=3000, eval_every=3000)
    plain = train(CFG, tc, spec, tr, va)
    l2 = train(CFG, tc.model_copy(update={"embedding_l2": 0.1}), spec, tr, va)
    assert not l2.model.embedding._forward_hooks  # the look-up hook is gone with the run
    used_plain, unused_plain = _row_norms(plain, spec, tr)
    used_l2, unused_l2 = _row_norms(l2, spec, tr)
    assert used_l2 < 0.7 * used_plain
    if math.isfinite(unused_plain):
        assert unused_l2 == pytest.approx(unused_plain)
    for key in ("train_flops", "flops_per_example", "params_embedding", "params_dense"):
        assert l2.metrics[key] == plain.metrics[key]
    # train_loss is the log loss alone: with the penalty it is not inflated by it
    penalty = 0.1 * used_l2 * spec.n_categorical
    assert l2.metrics["train_loss"] < plain.metrics["train_loss"] + penalty
    # evaluations do not keep the rows they look up, and a resumed run is exact
    saved: list[bytes] = []

    def save_first(m: dict, state) -> bool:
        if not saved:
            buf = io.BytesIO()
            torch.save(state(), buf)
            saved.append(buf.getvalue())
        return False

    tc2 = tc.model_copy(update={"embedding_l2": 0.1, "eval_every": 1000})
    full = train(CFG, tc2, spec, tr, va, report=save_first)
    resumed = train(CFG, tc2, spec, tr, va,
                    resume=torch.load(io.BytesIO(saved[0]), weights_only=True))
    assert torch.equal(full.model.embedding.weight, resumed.model.embedding.weight)


def test_normalized_entropy_of_the_base_rate_is_one() -> None:
    p = 0.3
    ll = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert normalized_entropy(ll, p) == pytest.approx(1.0)


def test_logloss_standard_error_is_over_the_fixed_validation_examples(data) -> None:
    """The SE the trainable logs with each report: sd of the per-example loss / sqrt(n),
    over exactly the examples the loop's evaluation scores (its mean is val_logloss)."""
    from search.trainable import logloss_se
    from trainers.loop import evaluate, predict_logits

    spec, tr, va = data
    res = train(CFG, TrainConfig(batch_size=100, max_examples=500), spec, tr, va)
    logits = predict_logits(res.model, va, limit=400)
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, va.label[: len(logits)], reduction="none")
    se = logloss_se(res.model, va, 400)
    assert se == pytest.approx(float(losses.std()) / math.sqrt(len(losses)), rel=1e-5)
    assert float(losses.mean()) == pytest.approx(
        evaluate(res.model, va, 0.5, limit=400)["val_logloss"], rel=1e-5)
    assert 0 < se < 0.05


def test_evaluation_scores_exactly_the_first_limit_examples() -> None:
    """``eval_max_examples`` below the scoring batch must not score the whole split."""
    from trainers.loop import predict_logits

    class _Split:
        def __init__(self, n: int) -> None:
            self.cat = torch.zeros(n, 2, dtype=torch.long)
            self.num = torch.zeros(n, 1)
            self.label = torch.zeros(n)

        def __len__(self) -> int:
            return len(self.label)

    model = torch.nn.Sequential()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(1)))
    model.forward = lambda cat, num: cat[:, 0].float()  # type: ignore[method-assign]
    assert len(predict_logits(model, _Split(1000), limit=300)) == 300
    assert len(predict_logits(model, _Split(1000), batch_size=128, limit=300)) == 300
    assert len(predict_logits(model, _Split(100), limit=300)) == 100


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_best_weights_are_the_lowest_validation_loss(data) -> None:
    """keep_best: the weights kept are those of the evaluation with the lowest
    val_logloss; scoring them again gives that evaluation's loss."""
    from trainers.loop import evaluate

    spec, tr, va = data
    tc = TrainConfig(lr=0.03, batch_size=100, max_examples=6000, eval_every=500)
    res = train(CFG, tc, spec, tr, va, keep_best=True)
    losses = [m["val_logloss"] for m in res.history]
    i = min(range(len(losses)), key=losses.__getitem__)
    assert res.best == res.history[i]
    assert res.best_state is not None
    model = res.model
    model.load_state_dict(res.best_state)
    assert evaluate(model, va, 0.5)["val_logloss"] == pytest.approx(losses[i], rel=1e-6)
    # without keep_best no copy is held, but the best evaluation is still named
    assert train(CFG, tc, spec, tr, va).best_state is None


def test_early_stopping_stops_after_patience_evaluations_without_improvement(data) -> None:
    spec, tr, va = data
    # a high learning rate on 3000 examples over-fits within a few epochs
    tc = TrainConfig(lr=0.05, batch_size=100, epochs=20, eval_every=500, seed=3)
    full = train(CFG, tc, spec, tr, va)
    losses = [m["val_logloss"] for m in full.history]
    patience = 2
    # the first evaluation followed by `patience` ones that do not beat the best so far
    stop, best, stale = None, math.inf, 0
    for i, loss in enumerate(losses):
        stale = 0 if loss < best else stale + 1
        best = min(best, loss)
        if stale >= patience:
            stop = i
            break
    assert stop is not None and stop < len(losses) - 1, losses  # the data must over-fit
    res = train(CFG, tc.model_copy(update={"early_stopping_patience": patience}), spec, tr, va,
                keep_best=True)
    assert res.status == "stopped" and res.early_stopped
    assert "early stopping" in res.message
    assert len(res.history) == stop + 1
    assert res.metrics == res.history[-1]
    assert res.best["val_logloss"] == min(losses[: stop + 1])
    # min_delta: an improvement smaller than it does not reset the patience
    lax = train(CFG, tc.model_copy(update={"early_stopping_patience": patience, "min_delta": 1.0}),
                spec, tr, va)
    assert len(lax.history) == patience + 1 and lax.early_stopped
    assert lax.best["val_logloss"] == min(losses[: patience + 1])  # the best is still the lowest


def test_stop_after_examples_ends_the_run_where_a_scheduler_would(data) -> None:
    """A run cut at ``stop_after_examples`` is the run a callback stopped there: the same
    weights and metrics, since the schedule (cosine here) is planned for the whole length."""
    spec, tr, va = data
    tc = TrainConfig(batch_size=128, max_examples=4096, eval_every=512, schedule="cosine", seed=5)
    stopped = train(CFG, tc, spec, tr, va, report=lambda m, s: m["examples_seen"] >= 1536)
    assert stopped.status == "stopped" and stopped.metrics["examples_seen"] == 1536
    cut = train(CFG, tc.model_copy(update={"stop_after_examples": 1536}), spec, tr, va)
    assert cut.status == "completed" and cut.metrics["examples_seen"] == 1536
    assert _weights_equal(stopped.model.state_dict(), cut.model.state_dict())
    timing = {"examples_per_s"}
    assert {k: v for k, v in stopped.metrics.items() if k not in timing} == \
        {k: v for k, v in cut.metrics.items() if k not in timing}
    # a run *planned* for 1536 examples decays its learning rate earlier: another model
    short = train(CFG, tc.model_copy(update={"max_examples": 1536}), spec, tr, va)
    assert not _weights_equal(short.model.state_dict(), cut.model.state_dict())


def test_resume_keeps_the_best_weights_and_the_patience_count(data) -> None:
    """The best weights and early-stopping counters travel in the resume state: a run
    interrupted after its best evaluation and resumed stops at the same evaluation with
    the same best weights as one never interrupted."""
    spec, tr, va = data
    tc = TrainConfig(lr=0.05, batch_size=100, epochs=20, eval_every=500, seed=3,
                     early_stopping_patience=2)
    full = train(CFG, tc, spec, tr, va, keep_best=True)
    assert full.early_stopped
    best_at = full.best["examples_seen"]
    cut_at = full.history[-2]["examples_seen"]  # after the best, before the stop
    assert best_at < cut_at
    saved: dict = {}

    def interrupt(m, state):
        if m["examples_seen"] >= cut_at:
            buf = io.BytesIO()
            torch.save(state(), buf)
            saved["state"] = buf.getvalue()
            return True
        return False

    first = train(CFG, tc, spec, tr, va, report=interrupt, keep_best=True)
    assert first.status == "stopped" and not first.early_stopped
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    assert state["stale"] >= 1 and state["best"]["examples_seen"] == best_at
    resumed = train(CFG, tc, spec, tr, va, resume=state, keep_best=True)
    assert resumed.early_stopped
    assert resumed.metrics["examples_seen"] == full.metrics["examples_seen"]
    timing = {"examples_per_s"}
    assert {k: v for k, v in resumed.best.items() if k not in timing} == \
        {k: v for k, v in full.best.items() if k not in timing}
    assert _weights_equal(resumed.best_state, full.best_state)
    assert _weights_equal(resumed.model.state_dict(), full.model.state_dict())
