"""The model frame: config validation, exact accounting, counters, and learning."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from pydantic import ValidationError

from spaces import FeatureSpec, ModelConfig, block_names, build_model, model_cost
from spaces.blocks import BlockDimensionError, get_block
from spaces.flops import fvcore_flops, torch_flops
from trainers.loop import TrainConfig, train

SPEC = FeatureSpec(cardinalities=(50, 20, 7, 3), n_numeric=2)


def small_config(family: str, **over) -> ModelConfig:
    """A small valid config of ``family``: its first variant's knobs in the frame."""
    cfg, t, d = next(iter(get_block(family).variants().values()))
    fields = {"block": family, "d_model": d, "n_tokens": t, "n_layers": 2, "embed_dim": 8,
              family: cfg.model_dump()}
    fields.update(over)
    return ModelConfig(**fields)


FAMILIES = block_names()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("tokenizer", "pooling"), [("grouped", "mean"), ("grouped", "flatten"), ("field", "mean")])
def test_accounting_is_exact(family: str, tokenizer: str, pooling: str) -> None:
    over: dict = {"tokenizer": tokenizer, "pooling": pooling}
    if tokenizer == "field":
        over["n_tokens"] = None
    cfg = small_config(family, **over)
    try:
        cfg.check(SPEC)
    except BlockDimensionError:
        # the variant's width need not split into one token per field (TokenMixer cuts D
        # into T slices): the nearest width that does; a family that fits none fails here
        t = SPEC.n_fields if tokenizer == "field" else cfg.n_tokens
        assert t is not None
        cfg = small_config(family, **over, d_model=math.lcm(cfg.d_model, t))
        cfg.check(SPEC)
    model = build_model(cfg, SPEC)
    cost = model_cost(cfg, SPEC)
    assert cost.params_embedding == model.embedding.weight.numel() == SPEC.total_vocab * cfg.embed_dim
    assert cost.params_dense + cost.params_embedding == sum(p.numel() for p in model.parameters())
    b = 4
    cat = torch.stack([torch.randint(0, c, (b,)) for c in SPEC.cardinalities], dim=1)
    num = torch.randn(b, SPEC.n_numeric)
    analytic = cost.flops_per_example * b + cost.flops_per_batch
    assert fvcore_flops(model, (cat, num)) == pytest.approx(analytic, rel=0.02)
    assert torch_flops(model, (cat, num)) == pytest.approx(analytic, rel=0.02)
    assert model(cat, num).shape == (b,)


def test_unknown_block_lists_valid_names() -> None:
    with pytest.raises(ValidationError) as err:
        ModelConfig(block="transformerxl")
    msg = str(err.value)
    assert "transformerxl" in msg
    for name in FAMILIES:
        assert name in msg


def test_unknown_key_and_foreign_section_are_errors() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ModelConfig(block="tokenmixer", d_modle=32)
    with pytest.raises(ValidationError, match="section 'wukong' given"):
        ModelConfig(block="tokenmixer", wukong={})
    with pytest.raises(ValidationError):
        ModelConfig(block="tokenmixer", n_layers=-1)


def test_tokenmixer_needs_d_divisible_by_t() -> None:
    cfg = ModelConfig(block="tokenmixer", d_model=30, n_tokens=4)
    with pytest.raises(BlockDimensionError, match="d_model"):
        cfg.check(SPEC)
    with pytest.raises(BlockDimensionError):
        model_cost(cfg, SPEC)


def test_field_tokenizer_rejects_a_contradicting_token_count() -> None:
    cfg = ModelConfig(block="wukong", tokenizer="field", n_tokens=3)
    with pytest.raises(BlockDimensionError, match="one token per field"):
        cfg.check(SPEC)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_dict(family: str) -> None:
    cfg = small_config(family)
    again = ModelConfig(**cfg.to_dict())
    assert again == cfg


@dataclass(frozen=True)
class _Split:
    cat: torch.Tensor
    num: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.label)


def planted_pairwise(n: int, seed: int) -> tuple[FeatureSpec, _Split]:
    """Labels from a planted sum of pairwise interactions of 4 fields (no main effects)."""
    g = torch.Generator().manual_seed(seed)
    cards = (10, 10, 10, 10)
    teacher = [torch.randn(c, 4, generator=torch.Generator().manual_seed(99 + i)) for i, c in enumerate(cards)]
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], dim=1)
    emb = [teacher[f][cat[:, f]] for f in range(4)]
    logit = sum((emb[i] * emb[j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    label = (logit > logit.median()).float()
    return FeatureSpec(cards, 0), _Split(cat, torch.zeros(n, 0), label)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_learns_a_planted_interaction(family: str) -> None:
    spec, tr = planted_pairwise(6000, seed=0)
    _, va = planted_pairwise(2000, seed=1)
    cfg = small_config(family, embed_dim=8, head_hidden=(32,))
    tc = TrainConfig(lr=3e-3, batch_size=64, max_examples=64 * 400, eval_every=64 * 400, seed=0)
    result = train(cfg, tc, spec, tr, va)
    assert result.status == "completed"
    assert result.metrics["val_auc"] > 0.75, result.metrics
