"""Wukong: a stack of factorization machines (Meta, arXiv 2403.02545; BLOCKS.md section 3).

One block is one Wukong layer. Layer ``i`` maps ``X_i ∈ ℝ^{n_i×D}`` to ``n_F + n_L`` tokens::

    X_{i+1} = LN( concat(FMB(X_i), LCB(X_i)) + P_i X_i )
    FMB(X)  = reshape_{n_F×D}( MLP( LN( flatten( X (Xᵀ Y) ) ) ) ),   Y ∈ ℝ^{n_i×k}
    LCB(X)  = W_L X,                                                  W_L ∈ ℝ^{n_L×n_i}

* The FM is computed in the optimised order: ``Xᵀ Y`` (D×k) first, then ``X (Xᵀ Y)``
  (n_i×k), ``4 n_i D k`` FLOPs instead of ``2 n_i² D + 2 n_i² k`` for ``(X Xᵀ) Y``.
* The MLP has ``m`` hidden layers of width ``h``, each Linear + ReLU, then a Linear to
  ``n_F·D`` (no activation): ``n_i k → h → … → h → n_F D``, ``m + 1`` Linear layers with
  biases. This is the reading under which the FLOPs formula of BLOCKS.md holds.
* ``P_i = I`` (no parameters) when ``n_i = n_F + n_L``, else a learned
  ``(n_F+n_L) × n_i`` matrix. ``Y``, ``W_L`` and ``P_i`` have no bias.
* Both LayerNorms are affine: the FM one over the flattened ``n_i·k`` vector, the output
  one over ``D`` per token.

FLOPs per example (multiply-add = 2, matmuls only)::

    4 n_i D k + 2 (n_i k h + (m−1) h² + h n_F D) + 2 n_L n_i D   (+ 2 (n_F+n_L) n_i D if P ≠ I)

Parameters::

    3 n_i k                                   Y and the FM LayerNorm
    + (n_i k + 1) h + (m−1)(h + 1) h + (h + 1) n_F D     the MLP
    + n_L n_i + 2 D                           W_L and the output LayerNorm
    (+ (n_F+n_L) n_i if P ≠ I)
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import register_block

__all__ = ["Wukong", "WukongConfig", "fm_naive", "fm_optimised"]


class WukongConfig(BlockConfig):
    """Knobs of one Wukong layer.

    Attributes:
        n_fm: ``n_F``, tokens emitted by the factorization-machine block.
        n_lc: ``n_L``, tokens emitted by the linear-compression block.
        k: rank of the FM projection ``Y ∈ ℝ^{n_i×k}``.
        mlp_layers: ``m`` ReLU hidden layers of the FMB's MLP.
        mlp_hidden: ``h``, their width.
    """

    n_fm: int = Field(8, ge=1, le=256)
    n_lc: int = Field(8, ge=1, le=256)
    k: int = Field(16, ge=1, le=256)
    mlp_layers: int = Field(1, ge=1, le=8)
    mlp_hidden: int = Field(128, ge=1, le=8192)


def fm_optimised(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The FM interaction ``X (Xᵀ Y)`` in ``O(n k D)``.

    Args:
        x: ``(B, n, D)`` tokens.
        y: ``(n, k)`` learned projection.

    Returns:
        ``(B, n, k)``, equal to ``(X Xᵀ) Y`` (see ``fm_naive``).

    Example:
        >>> fm_optimised(torch.randn(2, 5, 16), torch.randn(5, 3)).shape
        torch.Size([2, 5, 3])
    """
    xty = torch.einsum("bnd,nk->bdk", x, y)  # (B, D, k)
    return torch.bmm(x, xty)  # (B, n, k)


def fm_naive(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(X Xᵀ) Y`` in ``O(n² D)``: the plain reference for ``fm_optimised``.

    Args:
        x: ``(B, n, D)``; y: ``(n, k)``.

    Returns:
        ``(B, n, k)``.
    """
    gram = torch.bmm(x, x.transpose(1, 2))  # (B, n, n)
    return torch.einsum("bnm,mk->bnk", gram, y)  # (B, n, k)


@register_block("wukong")
class Wukong(Block):
    """One Wukong layer: ``(B, n_i, D) -> (B, n_F + n_L, D)`` (module docstring).

    Args:
        cfg: the layer's knobs.
        n_tokens: ``n_i``, input tokens.
        d_model: ``D``.

    Example:
        >>> cfg = WukongConfig(n_fm=4, n_lc=4, k=8, mlp_hidden=32)
        >>> blk = Wukong(cfg, n_tokens=6, d_model=16)
        >>> blk(torch.randn(2, 6, 16)).shape
        torch.Size([2, 8, 16])
        >>> blk.proj is None  # 6 != 4 + 4: a learned residual projection
        False
    """

    Config = WukongConfig
    cfg: WukongConfig

    def __init__(self, cfg: WukongConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        n, d, h = n_tokens, d_model, cfg.mlp_hidden
        self.y = nn.Parameter(torch.randn(n, cfg.k) / n**0.5)  # Y: (n_i, k)
        self.ln_fm = nn.LayerNorm(n * cfg.k)
        widths = [n * cfg.k] + [h] * cfg.mlp_layers
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers.append(nn.Linear(h, cfg.n_fm * d))
        self.mlp = nn.Sequential(*layers)
        self.w_lc = nn.Parameter(torch.randn(cfg.n_lc, n) / n**0.5)  # W_L: (n_L, n_i)
        n_out = cfg.n_fm + cfg.n_lc
        # P_i: (n_F+n_L, n_i), or None for the identity residual
        self.proj = nn.Parameter(torch.randn(n_out, n) / n**0.5) if n_out != n else None
        self.ln_out = nn.LayerNorm(d)

    @classmethod
    def check(cls, cfg: WukongConfig, n_tokens: int, d_model: int) -> None:
        if n_tokens < 1 or d_model < 1:
            raise BlockDimensionError(
                f"wukong: n_tokens={n_tokens} and d_model={d_model} must be positive")

    @classmethod
    def output_tokens(cls, cfg: WukongConfig, n_tokens: int, d_model: int) -> int:
        return cfg.n_fm + cfg.n_lc

    @classmethod
    def count_flops(cls, cfg: WukongConfig, n_tokens: int, d_model: int) -> BlockCost:
        n, d, k, h, m = n_tokens, d_model, cfg.k, cfg.mlp_hidden, cfg.mlp_layers
        n_out = cfg.n_fm + cfg.n_lc
        fm = 4 * n * d * k  # Xᵀ Y, then X (Xᵀ Y)
        mlp = 2 * (n * k * h + (m - 1) * h * h + h * cfg.n_fm * d)
        lcb = 2 * cfg.n_lc * n * d
        residual = 2 * n_out * n * d if n_out != n else 0
        return BlockCost(per_example=fm + mlp + lcb + residual)

    @classmethod
    def count_params(cls, cfg: WukongConfig, n_tokens: int, d_model: int) -> int:
        n, d, k, h, m = n_tokens, d_model, cfg.k, cfg.mlp_hidden, cfg.mlp_layers
        n_out = cfg.n_fm + cfg.n_lc
        fm = n * k + 2 * n * k  # Y, LN over the flattened n_i·k
        mlp = (n * k + 1) * h + (m - 1) * (h + 1) * h + (h + 1) * cfg.n_fm * d
        rest = cfg.n_lc * n + 2 * d  # W_L, output LN
        residual = n_out * n if n_out != n else 0
        return fm + mlp + rest + residual

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        c = WukongConfig
        return {
            "identity_residual": (c(n_fm=4, n_lc=4, k=8, mlp_hidden=32), 8, 16),
            "projected_residual": (c(n_fm=4, n_lc=2, k=8, mlp_layers=2, mlp_hidden=32), 5, 16),
            "projected_expand_m3": (c(n_fm=3, n_lc=3, k=4, mlp_layers=3, mlp_hidden=16), 3, 8),
        }

    def interactions(self, x: torch.Tensor) -> torch.Tensor:
        """``concat(FMB(X), LCB(X))``: ``(B, n_i, D) -> (B, n_F + n_L, D)``."""
        b, n, d = x.shape  # (B, n_i, D)
        fm = fm_optimised(x, self.y).reshape(b, n * self.cfg.k)  # (B, n_i·k)
        fmb = self.mlp(self.ln_fm(fm)).view(b, self.cfg.n_fm, d)  # (B, n_F, D)
        lcb = torch.einsum("ln,bnd->bld", self.w_lc, x)  # (B, n_L, D)
        return torch.cat([fmb, lcb], dim=1)  # (B, n_F+n_L, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_i, D) -> (B, n_F + n_L, D)``."""
        res = x if self.proj is None else torch.einsum("on,bnd->bod", self.proj, x)  # (B, n_F+n_L, D)
        out: torch.Tensor = self.ln_out(self.interactions(x) + res)  # (B, n_F+n_L, D)
        return out
