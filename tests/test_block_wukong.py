"""The Wukong family (BLOCKS.md section 3): the optimised FM against the naive product, the
layer against a plain reference, output tokens, identity vs learned residual, and the block
contract (shapes, gradients, seeds, parameter count, FLOPs by two counters)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from spaces.blocks import BlockDimensionError
from spaces.blocks.wukong import Wukong, WukongConfig, fm_naive, fm_optimised
from spaces.flops import torch_flops

VARIANTS = [pytest.param(cfg, t, d, id=name) for name, (cfg, t, d) in Wukong.variants().items()]
BATCH = 4


def _build(cfg: WukongConfig, t: int, d: int, seed: int = 0) -> Wukong:
    torch.manual_seed(seed)
    return Wukong(cfg, t, d)


def _reference(blk: Wukong, x: torch.Tensor) -> torch.Tensor:
    """The layer's formula written plainly, with the naive ``(X Xᵀ) Y``."""
    b, n, d = x.shape
    fm = ((x @ x.transpose(1, 2)) @ blk.y).reshape(b, -1)  # (B, n·k)
    z = F.layer_norm(fm, fm.shape[1:], blk.ln_fm.weight, blk.ln_fm.bias)
    linears = [m for m in blk.mlp if isinstance(m, nn.Linear)]
    for lin in linears[:-1]:
        z = torch.relu(z @ lin.weight.T + lin.bias)
    fmb = (z @ linears[-1].weight.T + linears[-1].bias).view(b, blk.cfg.n_fm, d)
    lcb = blk.w_lc @ x  # (B, n_L, D)
    residual = x if blk.proj is None else blk.proj @ x
    return F.layer_norm(torch.cat([fmb, lcb], 1) + residual, (d,), blk.ln_out.weight,
                        blk.ln_out.bias)


def test_optimised_fm_equals_naive() -> None:
    x, y = torch.randn(3, 7, 16), torch.randn(7, 5)
    assert torch.allclose(fm_optimised(x, y), fm_naive(x, y), atol=1e-5, rtol=1e-5)
    x64, y64 = x.double(), y.double()
    assert torch.allclose(fm_optimised(x64, y64), (x64 @ x64.transpose(1, 2)) @ y64, atol=1e-10)


def test_optimised_fm_costs_n_k_d_not_n_squared() -> None:
    class _Fm(nn.Module):
        def __init__(self, fm: object, y: torch.Tensor) -> None:
            super().__init__()
            self.fm, self.y = fm, y

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fm(x, self.y)  # type: ignore[operator]

    b, n, d, k = 2, 12, 16, 3
    x, y = torch.randn(b, n, d), torch.randn(n, k)
    assert torch_flops(_Fm(fm_optimised, y), (x,)) == b * 4 * n * d * k
    assert torch_flops(_Fm(fm_naive, y), (x,)) == b * (2 * n * n * d + 2 * n * n * k)


@pytest.mark.parametrize(("cfg", "t", "d"), VARIANTS)
def test_every_variant_equals_its_plain_reference(cfg: WukongConfig, t: int, d: int) -> None:
    blk = _build(cfg, t, d)
    x = torch.randn(3, t, d)
    with torch.no_grad():
        assert torch.allclose(blk(x), _reference(blk, x), atol=1e-5)


@pytest.mark.parametrize("n_tokens", [3, 6, 9])
def test_output_tokens_are_n_fm_plus_n_lc(n_tokens: int) -> None:
    cfg = WukongConfig(n_fm=2, n_lc=4, k=3, mlp_hidden=8)
    blk = _build(cfg, n_tokens, 8)
    assert Wukong.output_tokens(cfg, n_tokens, 8) == blk.out_tokens == 6
    assert blk(torch.randn(2, n_tokens, 8)).shape == (2, 6, 8)
    mlp = list(blk.mlp)
    assert sum(isinstance(m, nn.ReLU) for m in mlp) == cfg.mlp_layers
    assert isinstance(mlp[-1], nn.Linear) and mlp[-1].out_features == cfg.n_fm * 8


def test_identity_and_learned_residual() -> None:
    cfg = WukongConfig(n_fm=2, n_lc=2, k=3, mlp_layers=1, mlp_hidden=5)
    d = 6
    same, other = _build(cfg, 4, d), _build(cfg, 3, d)
    # n_i = n_F + n_L: P = I, no parameters, the input is added as it is
    assert same.proj is None
    x = torch.randn(2, 4, d)
    assert torch.allclose(same(x), same.ln_out(same.interactions(x) + x), atol=1e-6)
    # by hand: Y 12 + LN 24 + MLP (12·5+5) + (5·12+12) + W_L 8 + LN 12
    assert Wukong.count_params(cfg, 4, d) == 193 == sum(p.numel() for p in same.parameters())
    # n_i != n_F + n_L: a learned (n_F+n_L) × n_i projection, and its 4·3 parameters
    assert other.proj is not None and other.proj.shape == (4, 3)
    x3 = torch.randn(2, 3, d)
    expected = other.ln_out(other.interactions(x3) + torch.einsum("on,bnd->bod", other.proj, x3))
    assert torch.allclose(other(x3), expected, atol=1e-6)
    # by hand: Y 9 + LN 18 + MLP (9·5+5) + (5·12+12) + W_L 6 + LN 12 + P 12
    assert Wukong.count_params(cfg, 3, d) == 179 == sum(p.numel() for p in other.parameters())
    extra_flops = Wukong.count_flops(cfg, 3, d).per_example - (
        4 * 3 * d * 3 + 2 * (3 * 3 * 5 + 5 * 2 * d) + 2 * 2 * 3 * d)
    assert extra_flops == 2 * 4 * 3 * d


def test_flops_formula_and_its_batch_scaling() -> None:
    cfg = WukongConfig(n_fm=4, n_lc=2, k=8, mlp_layers=3, mlp_hidden=32)
    n, d = 5, 16
    cost = Wukong.count_flops(cfg, n, d)
    assert cost.per_batch == 0
    assert cost.per_example == (4 * n * d * 8 + 2 * (n * 8 * 32 + 2 * 32 * 32 + 32 * 4 * d)
                                + 2 * 2 * n * d + 2 * 6 * n * d)
    blk = _build(cfg, n, d)
    f1, f3 = torch_flops(blk, (torch.randn(1, n, d),)), torch_flops(blk, (torch.randn(3, n, d),))
    assert f1 == cost.per_example and f3 == 3 * cost.per_example


def test_dimension_and_config_errors() -> None:
    with pytest.raises(BlockDimensionError, match="n_tokens=0"):
        Wukong.check(WukongConfig(), 0, 16)
    for bad in ({"mlp_layers": 0}, {"n_fm": 0}, {"n_lc": 0}, {"k": 0}, {"mlp_hidden": 0},
                {"rank": 4}):
        with pytest.raises(ValidationError):
            WukongConfig(**bad)  # type: ignore[arg-type]
    cfg = WukongConfig()
    with pytest.raises(ValidationError):
        cfg.k = 4  # type: ignore[misc]
