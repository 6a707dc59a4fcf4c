"""RankMixer's TokenMixer block (arXiv 2507.15551; BLOCKS.md section 2).

Post-norm::

    S  = LN(TokenMix(X) + X)
    X' = LN(PFFN(S) + S),     PFFN_t(s) = W²_t GELU(W¹_t s + b¹_t) + b²_t

TokenMix has no parameters: split each token into ``H = T`` heads of ``D/T`` and make
head ``h`` of every token into new token ``h`` (a fixed permutation of the flattened
``T·D`` vector). PFFN has its own weights per token, applied as one batched einsum.

Params ``2kTD² + T(kD + D) + 4D``; FLOPs per example ``4kTD²`` (TokenMix moves data: 0).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import register_block

__all__ = ["TokenMixer", "TokenMixerConfig", "token_mix"]


class TokenMixerConfig(BlockConfig):
    """Knobs of TokenMixer: ``ffn_mult`` (k), the per-token FFN's hidden multiple."""

    ffn_mult: int = Field(2, ge=1, le=16)


def token_mix(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, D) -> (B, T, D)``: head ``h`` of every token becomes token ``h`` (H = T)."""
    b, t, d = x.shape
    return x.view(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)


@register_block("tokenmixer")
class TokenMixer(Block):
    """TokenMix + per-token FFN, post-norm.

    Example:
        >>> blk = TokenMixer(TokenMixerConfig(ffn_mult=2), n_tokens=4, d_model=16)
        >>> blk(torch.randn(2, 4, 16)).shape
        torch.Size([2, 4, 16])
    """

    Config = TokenMixerConfig

    def __init__(self, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        h = cfg.ffn_mult * d_model
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.w1 = nn.Parameter(torch.randn(n_tokens, d_model, h) / d_model**0.5)
        self.b1 = nn.Parameter(torch.zeros(n_tokens, h))
        self.w2 = nn.Parameter(torch.randn(n_tokens, h, d_model) / h**0.5)
        self.b2 = nn.Parameter(torch.zeros(n_tokens, d_model))

    @classmethod
    def check(cls, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> None:
        if d_model % n_tokens:
            raise BlockDimensionError(
                f"tokenmixer needs H = T heads: d_model={d_model} must be divisible by "
                f"n_tokens={n_tokens}")

    @classmethod
    def count_flops(cls, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> BlockCost:
        return BlockCost(4 * cfg.ffn_mult * n_tokens * d_model * d_model)

    @classmethod
    def count_params(cls, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> int:
        h = cfg.ffn_mult * d_model
        return 2 * n_tokens * d_model * h + n_tokens * (h + d_model) + 4 * d_model

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {"k2": (TokenMixerConfig(ffn_mult=2), 4, 16),
                "k1_t8": (TokenMixerConfig(ffn_mult=1), 8, 16)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.ln1(token_mix(x) + x)  # (B, T, D)
        h = nn.functional.gelu(torch.einsum("btd,tdh->bth", s, self.w1) + self.b1)  # (B, T, kD)
        return self.ln2(torch.einsum("bth,thd->btd", h, self.w2) + self.b2 + s)  # (B, T, D)
