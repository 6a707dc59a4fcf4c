"""Wukong: stacked factorization machines (Meta, arXiv 2403.02545; BLOCKS.md section 3).

Layer ``i`` maps ``X_i ∈ ℝ^{n_i×D}`` to ``n_F + n_L`` tokens::

    X_{i+1} = LN( concat(FMB(X_i), LCB(X_i)) + P_i X_i )
    FMB(X)  = reshape_{n_F×D}( MLP( LN( flatten( X (Xᵀ Y) ) ) ) ),   Y ∈ ℝ^{n_i×k}
    LCB(X)  = W_L X,                                                  W_L ∈ ℝ^{n_L×n_i}

The FM is computed in the optimised order, ``Xᵀ Y`` (D×k) first, then ``X (Xᵀ Y)``:
``O(n k D)`` instead of ``O(n² D)``. ``P_i = I`` when ``n_i = n_F + n_L``, else a learned
``(n_F+n_L) × n_i`` projection. The MLP has ``m`` ReLU hidden layers of width ``h``.

FLOPs per example: ``4 n_i D k + 2(n_i k h + (m−1) h² + h n_F D) + 2 n_L n_i D``
(+ ``2 (n_F+n_L) n_i D`` when ``P_i ≠ I``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from spaces.blocks.base import Block, BlockConfig, BlockCost
from spaces.blocks.registry import register_block

__all__ = ["Wukong", "WukongConfig", "fm_naive", "fm_optimised"]


class WukongConfig(BlockConfig):
    """Knobs of a Wukong layer: ``n_fm`` (n_F), ``n_lc`` (n_L), rank ``k`` of ``Y``, MLP
    depth ``mlp_layers`` (m) and width ``mlp_hidden`` (h)."""

    n_fm: int = Field(8, ge=1, le=256)
    n_lc: int = Field(8, ge=1, le=256)
    k: int = Field(16, ge=1, le=256)
    mlp_layers: int = Field(1, ge=1, le=8)
    mlp_hidden: int = Field(128, ge=1, le=8192)


def fm_optimised(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``X (Xᵀ Y)`` for ``x (B, n, D)``, ``y (n, k)``: ``(B, n, k)`` in ``O(n k D)``."""
    xty = torch.einsum("bnd,nk->bdk", x, y)  # (B, D, k)
    return torch.matmul(x, xty)  # (B, n, k)


def fm_naive(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(X Xᵀ) Y``: the same product in ``O(n² D)`` (reference for tests)."""
    return torch.matmul(torch.matmul(x, x.transpose(1, 2)), y)


@register_block("wukong")
class Wukong(Block):
    """One Wukong layer over ``(B, n_i, D)`` tokens, emitting ``(B, n_F + n_L, D)``.

    Example:
        >>> blk = Wukong(WukongConfig(n_fm=4, n_lc=4, k=8), n_tokens=6, d_model=16)
        >>> blk(torch.randn(2, 6, 16)).shape
        torch.Size([2, 8, 16])
    """

    Config = WukongConfig

    def __init__(self, cfg: WukongConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        n, d, k, h = n_tokens, d_model, cfg.k, cfg.mlp_hidden
        self.y = nn.Parameter(torch.randn(n, k) / n**0.5)
        self.ln_fm = nn.LayerNorm(n * k)
        dims = [n * k] + [h] * cfg.mlp_layers
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(h, cfg.n_fm * d))
        self.mlp = nn.Sequential(*layers)
        self.w_lc = nn.Parameter(torch.randn(cfg.n_lc, n) / n**0.5)
        n_out = cfg.n_fm + cfg.n_lc
        self.proj = nn.Parameter(torch.randn(n_out, n) / n**0.5) if n_out != n else None
        self.ln_out = nn.LayerNorm(d)

    @classmethod
    def output_tokens(cls, cfg: WukongConfig, n_tokens: int, d_model: int) -> int:
        return cfg.n_fm + cfg.n_lc

    @classmethod
    def count_flops(cls, cfg: WukongConfig, n_tokens: int, d_model: int) -> BlockCost:
        n, d, k, h, m = n_tokens, d_model, cfg.k, cfg.mlp_hidden, cfg.mlp_layers
        n_out = cfg.n_fm + cfg.n_lc
        flops = 4 * n * d * k + 2 * (n * k * h + (m - 1) * h * h + h * cfg.n_fm * d)
        flops += 2 * cfg.n_lc * n * d
        if n_out != n:
            flops += 2 * n_out * n * d
        return BlockCost(flops)

    @classmethod
    def count_params(cls, cfg: WukongConfig, n_tokens: int, d_model: int) -> int:
        n, d, k, h, m = n_tokens, d_model, cfg.k, cfg.mlp_hidden, cfg.mlp_layers
        n_out = cfg.n_fm + cfg.n_lc
        mlp = (n * k * h + h) + (m - 1) * (h * h + h) + (h * cfg.n_fm * d + cfg.n_fm * d)
        params = n * k + 2 * n * k + mlp + cfg.n_lc * n + 2 * d
        if n_out != n:
            params += n_out * n
        return params

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {
            "identity_residual": (WukongConfig(n_fm=4, n_lc=4, k=8, mlp_hidden=32), 8, 16),
            "projected_residual": (WukongConfig(n_fm=4, n_lc=2, k=8, mlp_layers=2,
                                                mlp_hidden=32), 5, 16),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (B, n_i, D)
        fm = fm_optimised(x, self.y).reshape(b, -1)  # (B, n_i·k)
        fmb = self.mlp(self.ln_fm(fm)).view(b, self.cfg.n_fm, d)  # (B, n_F, D)
        lcb = torch.einsum("ln,bnd->bld", self.w_lc, x)  # (B, n_L, D)
        res = x if self.proj is None else torch.einsum("on,bnd->bod", self.proj, x)  # (B, n_F+n_L, D)
        return self.ln_out(torch.cat([fmb, lcb], dim=1) + res)
