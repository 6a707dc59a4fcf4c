"""The model frame reads behaviour histories: exact accounting at K > 1 for every family,
K = 0 is the history-free model, the serving cap sees K, and a history carries signal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from search.checks import ConfigCheck
from spaces import FeatureSpec, ModelConfig, block_names, build_model, model_cost
from spaces.blocks import BlockDimensionError, get_block
from spaces.blocks.attention import AttentionConfig
from spaces.features import N_GAP_BUCKETS, SequenceSpec
from spaces.flops import fvcore_flops, torch_flops
from trainers.data import DataConfig, Split
from trainers.loop import TrainConfig, train
from trainers.sequences import build_histories

SPEC = FeatureSpec(cardinalities=(50, 20, 7, 3), n_numeric=2,
                   sequence=SequenceSpec(item_field=1))
PLAIN = FeatureSpec(cardinalities=(50, 20, 7, 3), n_numeric=2)


def small_config(family: str, **over: object) -> ModelConfig:
    cfg, t, d = next(iter(get_block(family).variants().values()))
    fields = {"block": family, "d_model": d, "n_tokens": t, "n_layers": 2, "embed_dim": 8,
              family: cfg.model_dump(), **over}
    return ModelConfig(**fields)


def batch(b: int, k: int, spec: FeatureSpec = SPEC) -> tuple[torch.Tensor, ...]:
    cat = torch.stack([torch.randint(0, c, (b,)) for c in spec.cardinalities], dim=1)
    num = torch.randn(b, spec.n_numeric)
    seq = torch.stack([torch.randint(0, spec.cardinalities[1], (b, k)),
                       torch.randint(0, 3, (b, k)),
                       torch.randint(0, N_GAP_BUCKETS + 1, (b, k)),
                       torch.randint(0, 10**8, (b, k))], dim=-1)
    return cat, num, seq


def check_accounting(cfg: ModelConfig) -> None:
    model = build_model(cfg, SPEC)
    cost = model_cost(cfg, SPEC)
    assert cost.params_dense + cost.params_embedding == sum(p.numel() for p in model.parameters())
    inputs = batch(4, cfg.seq_len)
    analytic = cost.flops_per_example * 4 + cost.flops_per_batch
    assert torch_flops(model, inputs) == analytic  # FlopCounterMode: exactly
    assert fvcore_flops(model, inputs) == pytest.approx(analytic, rel=0.02)
    assert model(*inputs).shape == (4,)


@pytest.mark.parametrize("family", block_names())
@pytest.mark.parametrize("pooling", ["mean", "flatten"])
def test_accounting_is_exact_with_a_history(family: str, pooling: str) -> None:
    cfg = small_config(family, seq_len=8, pooling=pooling)
    assert cfg.history_tokens() == (8 if family == "attention" else 4)
    check_accounting(cfg)


@pytest.mark.parametrize(
    "knobs",
    [
        {"kind": "softmax", "n_heads": 2, "partitions": 4, "temperature": "dynamic"},  # ASTRO
        {"kind": "hstu", "n_heads": 2, "partitions": 2, "temperature": "dynamic"},
        {"kind": "hstu", "n_heads": 2, "partitions": 1},
    ],
)
@pytest.mark.parametrize(("k", "seq_tokens", "gap"), [(24, None, True), (16, 4, False)])
def test_attention_over_long_histories_is_exact(knobs: dict[str, object], k: int,
                                                seq_tokens: int | None, gap: bool) -> None:
    cfg = ModelConfig(block="attention", d_model=16, n_tokens=4, embed_dim=8, n_layers=2,
                      seq_len=k, seq_tokens=seq_tokens, seq_gap=gap,
                      attention=AttentionConfig(**knobs).model_dump())  # type: ignore[arg-type]
    check_accounting(cfg)
    # the attention term grows as (K + T)^2 / N_b, the rest linearly in K
    longer = cfg.model_copy(update={"seq_len": 2 * k})
    if seq_tokens is None:
        assert model_cost(longer, SPEC).flops_per_example > model_cost(cfg, SPEC).flops_per_example


@pytest.mark.parametrize("family", block_names())
def test_k0_is_the_history_free_model(family: str) -> None:
    cfg = small_config(family)
    assert cfg.seq_len == 0 and "seq_len" not in cfg.to_dict()
    torch.manual_seed(3)
    plain = build_model(cfg, PLAIN)
    torch.manual_seed(3)
    with_spec = build_model(small_config(family, seq_len=0), SPEC)  # a dataset with histories
    a, b = plain.state_dict(), with_spec.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    cat, num, _ = batch(5, 1)
    assert torch.equal(plain(cat, num), with_spec(cat, num))
    assert model_cost(cfg, PLAIN) == model_cost(cfg, SPEC)
    # a history model draws the history-free weights first: the same initial values
    torch.manual_seed(3)
    hist = build_model(small_config(family, seq_len=4), SPEC).state_dict()
    assert all(torch.equal(a[n], hist[n]) for n in a if hist[n].shape == a[n].shape
               and not n.startswith(("blocks", "head")))


def test_config_errors_are_clear() -> None:
    with pytest.raises(BlockDimensionError, match="dataset has none"):
        model_cost(small_config("attention", seq_len=8), PLAIN)
    with pytest.raises(BlockDimensionError, match="seq_tokens=3 does not divide seq_len=8"):
        model_cost(small_config("tokenmixer", seq_len=8, seq_tokens=3), SPEC)
    with pytest.raises(BlockDimensionError, match="seq_len is 0"):
        model_cost(small_config("wukong", seq_tokens=2), SPEC)
    model = build_model(small_config("attention", seq_len=8), SPEC)
    cat, num, seq = batch(2, 8)
    with pytest.raises(ValueError, match="pass seq"):
        model(cat, num)
    with pytest.raises(ValueError, match="reads 8 history steps, got 4"):
        model(cat, num, seq[:, :4])
    round_trip = ModelConfig(**small_config("wukong", seq_len=16, seq_tokens=2).to_dict())
    assert round_trip.seq_len == 16 and round_trip.seq_tokens == 2


@pytest.mark.parametrize("family", block_names())
def test_the_history_changes_the_output(family: str) -> None:
    torch.manual_seed(0)
    model = build_model(small_config(family, seq_len=8), SPEC).eval()
    cat, num, seq = batch(6, 8)
    out = model(cat, num, seq)
    assert not torch.allclose(out, model(cat, num, torch.zeros_like(seq)))


def test_serving_cap_sees_k() -> None:
    flat = {"model.block": "attention", "model.n_layers": 1, "model.d_model": 16,
            "model.n_tokens": 4, "model.embed_dim": 8, "model.attention.n_heads": 2}
    costs = {k: model_cost(ModelConfig(block="attention", n_layers=1, d_model=16, n_tokens=4,
                                       embed_dim=8, seq_len=k), SPEC).flops_per_example
             for k in (16, 256)}
    check = ConfigCheck(DataConfig(name="synthetic"), SPEC, (costs[16] + costs[256]) / 2, 1e15)
    assert check({**flat, "model.seq_len": 16})[0]
    ok, over, reason = check({**flat, "model.seq_len": 256})
    assert not ok and over > 0 and "cap" in reason
    assert check.flops({**flat, "model.seq_len": 256}) == costs[256]


def test_a_planted_history_signal_is_learnt() -> None:
    """The label is the opposite of the user's previous label (95 %): invisible to the
    field tokens (a user's labels alternate, items are random), read off the history."""
    g = torch.Generator().manual_seed(0)
    n, users = 6_000, 300
    user = torch.randint(0, users, (n,), generator=g).numpy()
    time = torch.randperm(n, generator=g).double().numpy()
    item = torch.randint(1, 40, (n,), generator=g).numpy()
    order = torch.from_numpy(time).argsort().numpy()
    label = torch.zeros(n)
    last: dict[int, float] = {}
    coin = torch.rand(n, generator=g)
    for i in order:  # y_i = 1 - y of the user's previous event (a coin for the first)
        y = 1 - last.get(int(user[i]), float(coin[i] < 0.5))
        label[i] = y if coin[i] > 0.05 else 1 - y
        last[int(user[i])] = float(label[i])
    parts = {"train": torch.arange(5_000).numpy(), "val": torch.arange(5_000, n).numpy()}
    _, hist = build_histories(user, time, item, label.numpy(), parts)
    cat = torch.stack([torch.from_numpy(user) + 1, torch.from_numpy(item)], dim=1)
    spec = FeatureSpec(cardinalities=(users + 1, 40), sequence=SequenceSpec(item_field=1))
    splits = {name: Split(cat[idx], torch.zeros(len(idx), 0), label[idx], hist[name])
              for name, idx in parts.items()}
    aucs = {}
    for k in (0, 4):
        cfg = ModelConfig(block="attention", n_layers=1, d_model=16, n_tokens=2, embed_dim=8,
                          seq_len=k, attention={"n_heads": 2})
        result = train(cfg, TrainConfig(lr=3e-3, batch_size=128, epochs=3, seed=0), spec,
                       splits["train"], splits["val"])
        aucs[k] = result.metrics["val_auc"]
    assert aucs[0] < 0.6 < 0.85 < aucs[4], aucs
    assert math.isfinite(aucs[4])


def test_space_knob_and_a_full_run_with_histories(tmp_path: Path) -> None:
    """``model.seq_len`` is a knob of the shipped sequences space; a config with it
    trains, tests, logs ``model.seq_len`` and saves a model that loads back."""
    import optuna
    import yaml

    from search.space import bundled_space, load_space
    from tests.test_sequences import config, interactions
    from trainers.experiment import ExperimentConfig, experiment_from_flat
    from trainers.full import load_model, train_full

    space = load_space(bundled_space("sequences"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ks = {experiment_from_flat(space.sample(study.ask())).model.seq_len for _ in range(20)}
    assert ks == {0, 16, 64, 256}

    data = config(tmp_path, interactions(n=3_000))
    exp = ExperimentConfig(
        model=ModelConfig(block="attention", n_layers=1, d_model=16, n_tokens=4, embed_dim=8,
                          seq_len=16, attention={"kind": "hstu", "partitions": 4,
                                                 "temperature": "dynamic"}),
        train=TrainConfig(batch_size=256, epochs=1), data=data)
    res = train_full(exp, tmp_path / "out", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                     progress=False)
    assert res.status == "completed" and math.isfinite(res.test["test_logloss"])
    saved = yaml.safe_load((res.model_dir / "config.yaml").read_text())
    assert saved["model"]["seq_len"] == 16 and saved["data"]["sequences"] is True
    model = load_model(res.model_dir)
    assert model.seq_len == 16 and model.spec.sequence == SequenceSpec(item_field=1)
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(res.run_id or "")
    assert run.data.params.get("model.seq_len") == "16"


def hstu_history_config(**over: object) -> ModelConfig:
    fields: dict[str, object] = {
        "block": "attention", "d_model": 16, "n_tokens": 4, "embed_dim": 8, "n_layers": 2,
        "seq_len": 8, "seq_gap": False,
        "attention": {"kind": "hstu", "n_heads": 2, "partitions": 2}, **over}
    return ModelConfig(**fields)  # type: ignore[arg-type]


def test_hstu_time_bias_is_counted_and_only_hstu_over_a_history_has_it() -> None:
    cfg = hstu_history_config()
    model = build_model(cfg, SPEC)
    tables = [n for n, _ in model.named_parameters() if n.endswith("time_bias")]
    assert tables == ["blocks.0.time_bias", "blocks.1.time_bias"]
    assert all(p.shape == (N_GAP_BUCKETS + 1,) for n, p in model.named_parameters()
               if n in tables)
    softmax = cfg.model_copy(update={"mixer": AttentionConfig(kind="softmax")})
    without = model_cost(softmax, SPEC)
    model_softmax = build_model(softmax, SPEC)
    assert not model_softmax.time_bias
    assert sum(p.numel() for p in model_softmax.parameters()) == \
        without.params_dense + without.params_embedding
    assert not build_model(cfg.model_copy(update={"seq_len": 0}), SPEC).time_bias
    check_accounting(cfg)  # the time bias's 2 x 41 scalars are in the count, 0 FLOPs
    off = ModelConfig(**{**cfg.to_dict(), "seq_time_bias": False})  # the knob, as YAML has it
    assert not off.time_bias() and not build_model(off, SPEC).time_bias
    assert model_cost(cfg, SPEC).params_dense - model_cost(off, SPEC).params_dense == \
        cfg.n_layers * (N_GAP_BUCKETS + 1)
    check_accounting(off)


def test_hstu_time_bias_reads_time_gaps_not_positions() -> None:
    """Same items, actions, positions and gap buckets; only the gaps in seconds differ:
    HSTU's relative time bias changes the output, and nothing else reads those gaps."""
    torch.manual_seed(0)
    cfg = hstu_history_config()
    model = build_model(cfg, SPEC).eval()
    cat, num, seq = batch(6, 8)
    seq[:, :2, 1] = 0  # two padding steps: their pairs take bucket 0 whatever their gaps
    other = seq.clone()
    other[..., 3] = torch.randint(0, 10**8, other[..., 3].shape)  # other time gaps only
    with torch.no_grad():
        assert torch.equal(model(cat, num, seq), model(cat, num, other))  # w_t starts at 0
        for blk in model.blocks:
            blk.time_bias.normal_(0.0, 1.0)
        assert not torch.allclose(model(cat, num, seq), model(cat, num, other))
        pads_only = seq.clone()
        pads_only[:, :2, 3] += 12345  # a padding step's gap is never read
        assert torch.equal(model(cat, num, seq), model(cat, num, pads_only))
    softmax = build_model(cfg.model_copy(update={"mixer": AttentionConfig(kind="softmax")}),
                          SPEC).eval()
    with torch.no_grad():
        assert torch.equal(softmax(cat, num, seq), softmax(cat, num, other))
    with pytest.raises(ValueError, match="4 columns"):
        model(cat, num, seq[..., :3])


@pytest.mark.parametrize(("seq_tokens", "partitions"), [(None, 1), (None, 4), (4, 2)])
def test_time_buckets_equal_a_brute_force(seq_tokens: int | None, partitions: int) -> None:
    from spaces.blocks.attention import time_buckets

    cfg = hstu_history_config(seq_tokens=seq_tokens,
                              attention={"kind": "hstu", "n_heads": 2, "partitions": partitions})
    model = build_model(cfg, SPEC)
    _, _, seq = batch(3, 8)
    seq[0, :3, 1] = 0  # padding steps
    got = model.time_buckets(seq)
    th, tf = model.history_tokens, model.n_tokens
    t = th + tf
    step = 8 // th
    for b in range(3):
        times = [-int(seq[b, (i + 1) * step - 1, 3]) for i in range(th)] + [0] * tf
        pad = [bool(seq[b, (i + 1) * step - 1, 1] == 0) for i in range(th)] + [False] * tf
        for i in range(t):
            for j in range(t):
                gi, gj = divmod(i, t // partitions), divmod(j, t // partitions)
                if gi[0] != gj[0]:
                    continue  # another group: never attended, never bucketed
                want = 0 if pad[i] or pad[j] else int(
                    time_buckets(torch.tensor(float(abs(times[i] - times[j])))))
                assert int(got[b, gi[0], gi[1], gj[1]]) == want


def test_the_sequences_space_is_the_unified_space_plus_k() -> None:
    import yaml

    from search.space import bundled_space

    unified = yaml.safe_load(bundled_space("unified").read_text())
    seq = yaml.safe_load(bundled_space("sequences").read_text())
    assert seq["model"].pop("seq_len") == {"choice": [0, 16, 64, 256]}
    for key in ("families", "model", "blocks", "train"):
        assert seq[key] == unified[key], key


def test_time_bias_gradient_and_bucket_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """The time bias's one-pass gradient equals plain indexing's, and the buckets are
    exact at every power-of-two edge (integer gaps up to 2^45 s), from the exponent bits
    and, under a jit trace, from frexp alike."""
    from spaces.blocks.attention import _TakeBias, pair_time_buckets, time_buckets

    torch.manual_seed(0)
    idx = torch.randint(0, N_GAP_BUCKETS + 1, (3, 2, 5, 5), dtype=torch.int32)
    w = torch.randn(N_GAP_BUCKETS + 1, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    (fast,) = torch.autograd.grad((_TakeBias.apply(w, idx) * grad).sum(), w)
    (plain,) = torch.autograd.grad((w[idx.long()] * grad).sum(), w)
    assert torch.allclose(fast, plain)
    assert torch.equal(_TakeBias.apply(w, idx), w[idx.long()])
    edges = torch.tensor([0] + [2**k + d for k in range(1, 46) for d in (-2, -1, 0)])
    want = [1 + min(int(x + 1).bit_length() - 1, N_GAP_BUCKETS - 1) for x in edges.tolist()]
    assert time_buckets(edges.double()).tolist() == want
    time = torch.cat([torch.zeros(1, 1, dtype=torch.long), edges[None]], dim=1)  # (1, T)
    pairs = pair_time_buckets(time, torch.zeros_like(time, dtype=torch.bool), 1)
    assert pairs[0, 0, 0, 1:].tolist() == want  # token 0 (time 0) against every edge
    assert pairs.dtype == torch.int32  # the index every layer keeps for backward
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert time_buckets(edges.double()).tolist() == want
    assert time_buckets(edges.float()[edges < 2**24]).tolist() == want[:len(edges[edges < 2**24])]
