"""One contract over every registered block family and variant (STYLE.md).

shapes; finite, non-zero gradients into every parameter; seed determinism; parameter
count = formula exactly; analytic FLOPs within 2% of fvcore (x2) and FlopCounterMode.
"""

from __future__ import annotations

import pytest
import torch

from spaces.blocks import block_names, get_block
from spaces.flops import fvcore_flops, torch_flops

VARIANTS = [
    pytest.param(name, vname, cfg, t, d, id=f"{name}-{vname}")
    for name in block_names()
    for vname, (cfg, t, d) in get_block(name).variants().items()
]
BATCH = 4


def _build(name: str, cfg, t: int, d: int, seed: int = 0):
    torch.manual_seed(seed)
    return get_block(name)(cfg, t, d)


def test_every_family_is_registered() -> None:
    assert set(block_names()) >= {"attention", "tokenmixer", "wukong", "unimixing", "unimixing_lite"}


@pytest.mark.parametrize(("name", "vname", "cfg", "t", "d"), VARIANTS)
def test_shapes_and_gradients(name: str, vname: str, cfg, t: int, d: int) -> None:
    block = _build(name, cfg, t, d)
    x = torch.randn(BATCH, t, d, requires_grad=True)
    y = block(x)
    assert y.shape == (BATCH, block.out_tokens, d)
    assert block.out_tokens == get_block(name).output_tokens(cfg, t, d)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in block.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize(("name", "vname", "cfg", "t", "d"), VARIANTS)
def test_seed_determinism(name: str, vname: str, cfg, t: int, d: int) -> None:
    x = torch.randn(BATCH, t, d)
    a, b = _build(name, cfg, t, d, seed=3), _build(name, cfg, t, d, seed=3)
    assert torch.equal(a(x), b(x))
    c = _build(name, cfg, t, d, seed=4)
    if sum(p.numel() for p in c.parameters()):
        assert not torch.equal(a(x), c(x))


@pytest.mark.parametrize(("name", "vname", "cfg", "t", "d"), VARIANTS)
def test_param_count_is_the_formula(name: str, vname: str, cfg, t: int, d: int) -> None:
    block = _build(name, cfg, t, d)
    assert sum(p.numel() for p in block.parameters()) == get_block(name).count_params(cfg, t, d)


@pytest.mark.parametrize(("name", "vname", "cfg", "t", "d"), VARIANTS)
def test_flops_match_two_counters(name: str, vname: str, cfg, t: int, d: int) -> None:
    block = _build(name, cfg, t, d)
    cost = get_block(name).count_flops(cfg, t, d)
    assert cost.per_example > 0
    x = torch.randn(BATCH, t, d)
    analytic = cost.per_example * BATCH + cost.per_batch
    # torch's counter sees exactly the matmuls the formula counts; fvcore rounds some ops
    assert torch_flops(block, (x,)) == analytic
    assert fvcore_flops(block, (x,)) == pytest.approx(analytic, rel=0.02)
