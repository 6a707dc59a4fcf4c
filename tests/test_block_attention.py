"""The attention family (BLOCKS.md section 1): each variant against plain references written
here from the formulas, partition locality, dynamic temperature, HSTU's missing softmax, and
the block contract (shapes, gradients, seeds, parameter count, FLOPs by two counters)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from spaces.blocks import BlockDimensionError
from spaces.blocks.attention import TAU_EPS, Attention, AttentionConfig
from spaces.flops import torch_flops

VARIANTS = [pytest.param(cfg, t, d, id=name) for name, (cfg, t, d) in Attention.variants().items()]
BATCH = 4


def _build(cfg: AttentionConfig, t: int, d: int, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    blk = Attention(cfg, t, d)
    if cfg.kind == "hstu":  # the pair bias starts at 0: make it matter in the comparisons
        with torch.no_grad():
            blk.pair_bias.normal_()
    return blk


def _ffn_linears(blk: Attention) -> tuple[nn.Linear, nn.Linear]:
    w1, w2 = blk.ffn[0], blk.ffn[2]
    assert isinstance(w1, nn.Linear) and isinstance(w2, nn.Linear)
    return w1, w2


def _reference(blk: Attention, x: torch.Tensor) -> torch.Tensor:
    """The block's formula written plainly: loops over groups and heads, explicit products."""
    cfg = blk.cfg
    b, t, d = x.shape
    nh, g = cfg.n_heads, cfg.partitions
    dh, tg = d // nh, t // g
    h = F.layer_norm(x, (d,), blk.ln1.weight, blk.ln1.bias)
    proj = h @ blk.w_in.weight.T + blk.w_in.bias
    if cfg.kind == "softmax":
        q, k, v = proj.split(d, dim=-1)
    else:
        u, v, q, k = F.silu(proj).split(d, dim=-1)
    out = torch.zeros(b, t, d, dtype=x.dtype)
    for gi in range(g):
        rows = slice(gi * tg, (gi + 1) * tg)
        if cfg.temperature == "dynamic":
            c = h[:, rows].mean(dim=1)  # (B, D): the group's mean normalised token
            shift = math.log(math.exp(1.0 - TAU_EPS) - 1.0)
            tau = F.softplus(c @ blk.w_tau.weight.T + shift) + TAU_EPS  # (B, H)
        else:
            tau = torch.ones(b, nh)
        for hi in range(nh):
            cols = slice(hi * dh, (hi + 1) * dh)
            s = q[:, rows, cols] @ k[:, rows, cols].transpose(1, 2) / tau[:, hi, None, None]
            if cfg.kind == "softmax":
                a = torch.softmax(s / math.sqrt(dh), dim=-1)
            else:
                a = F.silu(s + blk.pair_bias[gi]) / tg
            out[:, rows, cols] = a @ v[:, rows, cols]
    if cfg.kind == "hstu":
        av = F.layer_norm(out, (d,), blk.ln_av.weight, blk.ln_av.bias)
        return x + (u * av) @ blk.w_out.weight.T + blk.w_out.bias
    x = x + out @ blk.w_out.weight.T + blk.w_out.bias
    z = F.layer_norm(x, (d,), blk.ln2.weight, blk.ln2.bias)
    w1, w2 = _ffn_linears(blk)
    hidden = F.gelu(z @ w1.weight.T + w1.bias)
    return x + hidden @ w2.weight.T + w2.bias


def test_one_partition_equals_torch_multi_head_attention() -> None:
    cfg = AttentionConfig(kind="softmax", n_heads=4, partitions=1)
    blk = _build(cfg, 6, 16)
    x = torch.randn(3, 6, 16)
    h = F.layer_norm(x, (16,), blk.ln1.weight, blk.ln1.bias).transpose(0, 1)  # (T, B, D)
    attn, _ = F.multi_head_attention_forward(
        h, h, h, 16, 4, blk.w_in.weight, blk.w_in.bias, None, None, False, 0.0,
        blk.w_out.weight, blk.w_out.bias, training=False, need_weights=False)
    x1 = x + attn.transpose(0, 1)
    w1, w2 = _ffn_linears(blk)
    z = F.layer_norm(x1, (16,), blk.ln2.weight, blk.ln2.bias)
    expected = x1 + F.gelu(z @ w1.weight.T + w1.bias) @ w2.weight.T + w2.bias
    assert torch.allclose(blk(x), expected, atol=1e-5)


@pytest.mark.parametrize(("cfg", "t", "d"), VARIANTS)
def test_every_variant_equals_its_plain_reference(cfg: AttentionConfig, t: int, d: int) -> None:
    blk = _build(cfg, t, d)
    x = torch.randn(3, t, d)
    with torch.no_grad():
        assert torch.allclose(blk(x), _reference(blk, x), atol=1e-5)


@pytest.mark.parametrize(("kind", "temperature"),
                         list(itertools.product(("softmax", "hstu"), ("fixed", "dynamic"))))
def test_partitioned_attention_is_plain_attention_within_each_group(kind: str,
                                                                    temperature: str) -> None:
    cfg = AttentionConfig(kind=kind, n_heads=2, partitions=2, temperature=temperature)
    blk = _build(cfg, 8, 16)
    x = torch.randn(3, 8, 16)
    y = blk(x)
    # locality: perturbing group 2 leaves group 1 unchanged
    x2 = x.clone()
    x2[:, 4:] += torch.randn(3, 4, 16)
    y2 = blk(x2)
    assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6)
    assert not torch.allclose(y[:, 4:], y2[:, 4:], atol=1e-3)
    # and each group is exactly a one-partition block over that group's tokens
    plain = Attention(cfg.model_copy(update={"partitions": 1}), 4, 16)
    for gi in range(2):
        state = dict(blk.state_dict())
        if kind == "hstu":
            state["pair_bias"] = blk.pair_bias[gi : gi + 1]
        plain.load_state_dict(state)
        assert torch.allclose(y[:, 4 * gi : 4 * gi + 4], plain(x[:, 4 * gi : 4 * gi + 4]),
                              atol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "hstu"])
def test_dynamic_temperature_follows_the_input(kind: str) -> None:
    fixed = _build(AttentionConfig(kind=kind, temperature="fixed"), 4, 16)
    dyn = _build(AttentionConfig(kind=kind, temperature="dynamic"), 4, 16)
    # the fixed block has no temperature parameters; the dynamic one has exactly w: D×H
    assert not any("tau" in name for name, _ in fixed.named_parameters())
    extra = sum(p.numel() for p in dyn.parameters()) - sum(p.numel() for p in fixed.parameters())
    assert extra == 16 * 2 == dyn.w_tau.weight.numel()
    # τ depends on the input, is positive, one per example, group and head
    a, b = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    tau_a, tau_b = dyn.temperature(dyn.ln1(a)), dyn.temperature(dyn.ln1(b))
    assert fixed.temperature(fixed.ln1(a)) is None
    assert tau_a is not None and tau_b is not None
    assert tau_a.shape == (2, 1, 2) and (tau_a >= TAU_EPS).all()
    assert not torch.allclose(tau_a, tau_b)
    # with the same weights, the attention matrix differs from the fixed one by τ alone
    fixed.load_state_dict({k: v for k, v in dyn.state_dict().items() if "tau" not in k})
    assert not torch.allclose(dyn.attention_weights(a), fixed.attention_weights(a), atol=1e-4)
    with torch.no_grad():
        dyn.w_tau.weight.zero_()  # wᵀc = 0 gives τ = 1: the fixed block exactly
    assert torch.allclose(dyn(a), fixed(a), atol=1e-6)


def test_hstu_weights_are_pointwise_not_softmax() -> None:
    x = torch.randn(3, 8, 16)
    hstu = _build(AttentionConfig(kind="hstu", n_heads=2, partitions=2), 8, 16)
    a = hstu.attention_weights(x)
    assert a.shape == (3, 2, 2, 4, 4)  # (B, N_b, H, T_g, T_g)
    assert not torch.allclose(a.sum(-1), torch.ones(3, 2, 2, 4), atol=1e-2)
    assert a.min() >= -0.2785 / 4  # min SiLU(z) ≈ −0.2785, divided by T_g
    soft = _build(AttentionConfig(kind="softmax", n_heads=2, partitions=2), 8, 16)
    assert torch.allclose(soft.attention_weights(x).sum(-1), torch.ones(3, 2, 2, 4), atol=1e-5)
    # the pair bias enters A: changing it changes the weights
    with torch.no_grad():
        hstu.pair_bias.add_(1.0)
    assert not torch.allclose(hstu.attention_weights(x), a)


def test_flops_formula_and_its_batch_scaling() -> None:
    cfg = AttentionConfig(kind="softmax", n_heads=4, ffn_mult=2, partitions=2)
    t, d = 8, 16
    assert Attention.count_flops(cfg, t, d).per_example == (
        8 * t * d * d + 4 * t * t * d // 2 + 4 * 2 * t * d * d)
    hstu = AttentionConfig(kind="hstu", n_heads=4, partitions=4, temperature="dynamic")
    cost = Attention.count_flops(hstu, t, d)
    assert cost == Attention.count_flops(hstu, t, d)
    assert cost.per_example == 10 * t * d * d + 4 * t * t * d // 4 + 2 * 4 * d * 4
    assert cost.per_batch == 0
    blk = _build(hstu, t, d)
    f1, f3 = torch_flops(blk, (torch.randn(1, t, d),)), torch_flops(blk, (torch.randn(3, t, d),))
    assert f3 - f1 == 2 * cost.per_example and f1 == cost.per_example


@pytest.mark.parametrize(("kind", "temperature", "partitions", "n_heads"),
                         list(itertools.product(("softmax", "hstu"), ("fixed", "dynamic"),
                                                (1, 2, 4), (1, 4))))
def test_param_count_formula_over_the_grid(kind: str, temperature: str, partitions: int,
                                           n_heads: int) -> None:
    cfg = AttentionConfig(kind=kind, temperature=temperature, partitions=partitions,
                          n_heads=n_heads, ffn_mult=3)
    blk = Attention(cfg, 8, 8)
    assert sum(p.numel() for p in blk.parameters()) == Attention.count_params(cfg, 8, 8)


def test_dimension_and_config_errors() -> None:
    with pytest.raises(BlockDimensionError, match="n_heads=3"):
        Attention(AttentionConfig(n_heads=3), 4, 16)
    with pytest.raises(BlockDimensionError, match="partitions=4 does not divide n_tokens=6"):
        Attention.check(AttentionConfig(partitions=4), 6, 16)
    for bad in ({"partitions": 3}, {"kind": "linear"}, {"temperature": "annealed"},
                {"dropout": 1.0}, {"n_heads": 0}, {"n_head": 2}):
        with pytest.raises(ValidationError):
            AttentionConfig(**bad)  # type: ignore[arg-type]
    cfg = AttentionConfig()
    with pytest.raises(ValidationError):
        cfg.n_heads = 4  # type: ignore[misc]


def test_dropout_only_in_training() -> None:
    x = torch.randn(2, 4, 16)
    for kind in ("softmax", "hstu"):
        torch.manual_seed(0)
        drop = Attention(AttentionConfig(kind=kind, dropout=0.5), 4, 16)
        torch.manual_seed(0)
        plain = Attention(AttentionConfig(kind=kind), 4, 16)
        assert not torch.allclose(drop(x), plain(x))
        drop.eval()
        assert torch.allclose(drop(x), plain(x), atol=1e-6)
