"""RankMixer's TokenMixer block (arXiv 2507.15551; BLOCKS.md section 2).

Post-norm, two sub-layers::

    S  = LN(TokenMix(X) + X)
    X' = LN(PFFN(S) + S),      PFFN(S)_t = W²_t GELU(W¹_t s_t + b¹_t) + b²_t

* **TokenMix** has no parameters. Each token is cut into ``H = T`` heads of ``D/T``
  channels and head ``h`` of every token becomes new token ``h``: on the flattened
  ``T·D`` vector it is a fixed permutation (the transpose of a ``T×T`` grid of
  ``D/T``-chunks), so it moves data and costs 0 FLOPs. ``H = T`` is what makes the output
  ``T×D`` again, so the residual fits: ``D mod T = 0`` is required.
* **PFFN** gives every token its own two-layer GELU MLP (``W¹_t ∈ ℝ^{D×kD}``,
  ``W²_t ∈ ℝ^{kD×D}``), applied as one batched einsum over tokens, never a loop.

Cost (multiply-add = 2, biases and norms are element-wise and not counted)::

    FLOPs per example = 4·k·T·D²
    params            = 2·k·T·D² + T·(k·D + D) + 4·D     (W¹, W², b¹, b², two LayerNorms)
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import register_block

__all__ = ["TokenMixer", "TokenMixerConfig", "token_mix"]


class TokenMixerConfig(BlockConfig):
    """Knobs of TokenMixer.

    Attributes:
        ffn_mult: ``k``, the per-token FFN's hidden width as a multiple of ``D``.
    """

    ffn_mult: int = Field(2, ge=1, le=16)


def token_mix(x: torch.Tensor) -> torch.Tensor:
    """RankMixer's parameter-free TokenMix with ``H = T`` heads.

    ``out[:, h, t·D/T : (t+1)·D/T] = x[:, t, h·D/T : (h+1)·D/T]``: head ``h`` of every
    token is gathered, in token order, into new token ``h``. Applying it twice is the
    identity (it transposes a ``T×T`` grid of chunks).

    Args:
        x: ``(B, T, D)`` tokens with ``D`` divisible by ``T``.

    Returns:
        ``(B, T, D)``, a permutation of ``x``'s entries within each example.

    Example:
        >>> x = torch.arange(8.0).view(1, 2, 4)   # tokens [0 1 2 3], [4 5 6 7]
        >>> token_mix(x)
        tensor([[[0., 1., 4., 5.],
                 [2., 3., 6., 7.]]])
    """
    b, t, d = x.shape
    if d % t:
        raise ValueError(f"token_mix needs D divisible by T (H = T heads); got T={t}, D={d}")
    heads = x.reshape(b, t, t, d // t)  # (B, T tokens, H heads, D/H)
    return heads.transpose(1, 2).reshape(b, t, d)  # (B, H new tokens, T·D/H = D)


@register_block("tokenmixer")
class TokenMixer(Block):
    """TokenMix + per-token FFN (PFFN), post-norm: see the module docstring for formulas.

    Constructor args:
        cfg: ``TokenMixerConfig``.
        n_tokens: ``T``; also the number of heads ``H``.
        d_model: ``D``; must be divisible by ``T``.

    Forward: ``x (B, T, D) -> (B, T, D)``.

    Example:
        >>> blk = TokenMixer(TokenMixerConfig(ffn_mult=2), n_tokens=4, d_model=16)
        >>> blk(torch.randn(2, 4, 16)).shape
        torch.Size([2, 4, 16])
    """

    Config = TokenMixerConfig

    def __init__(self, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        hidden = cfg.ffn_mult * d_model
        self.norm_mix = nn.LayerNorm(d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        # per-token weights, fan-in scaled: (T, D, kD) and (T, kD, D)
        self.w1 = nn.Parameter(torch.randn(n_tokens, d_model, hidden) * d_model**-0.5)
        self.b1 = nn.Parameter(torch.zeros(n_tokens, hidden))
        self.w2 = nn.Parameter(torch.randn(n_tokens, hidden, d_model) * hidden**-0.5)
        self.b2 = nn.Parameter(torch.zeros(n_tokens, d_model))

    @classmethod
    def check(cls, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> None:
        if n_tokens < 1 or d_model < 1:
            raise BlockDimensionError(
                f"tokenmixer needs n_tokens >= 1 and d_model >= 1; got T={n_tokens}, "
                f"D={d_model}")
        if d_model % n_tokens:
            lo = d_model // n_tokens * n_tokens
            near = f"{lo} or {lo + n_tokens}" if lo else f"{n_tokens}"
            raise BlockDimensionError(
                f"tokenmixer splits each token into H = T = {n_tokens} heads so that the "
                f"mixed output is again T×D: d_model={d_model} must be divisible by "
                f"n_tokens={n_tokens} (nearest valid d_model: {near})")

    @classmethod
    def count_flops(cls, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> BlockCost:
        # PFFN: two per-token matmuls D -> kD -> D; TokenMix is a permutation (0 FLOPs)
        return BlockCost(per_example=4 * cfg.ffn_mult * n_tokens * d_model * d_model)

    @classmethod
    def count_params(cls, cfg: TokenMixerConfig, n_tokens: int, d_model: int) -> int:
        hidden = cfg.ffn_mult * d_model
        weights = 2 * n_tokens * d_model * hidden
        biases = n_tokens * (hidden + d_model)
        norms = 2 * 2 * d_model  # two LayerNorms, weight + bias each
        return weights + biases + norms

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {
            "k2": (TokenMixerConfig(ffn_mult=2), 4, 16),  # 4 heads of 4 channels
            "k1_t8": (TokenMixerConfig(ffn_mult=1), 8, 16),  # 8 heads of 2 channels
            "k3_t1": (TokenMixerConfig(ffn_mult=3), 1, 8),  # one token: TokenMix is identity
        }

    def pffn(self, s: torch.Tensor) -> torch.Tensor:
        """Per-token FFN ``v_t = W²_t GELU(W¹_t s_t + b¹_t) + b²_t``.

        Args:
            s: ``(B, T, D)``.

        Returns:
            ``(B, T, D)``; token ``t`` of the output depends on token ``t`` of ``s`` only.
        """
        h = torch.einsum("btd,tdh->bth", s, self.w1) + self.b1  # (B, T, kD)
        return torch.einsum("bth,thd->btd", F.gelu(h), self.w2) + self.b2  # (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, D) -> (B, T, D)``."""
        s = self.norm_mix(token_mix(x) + x)  # (B, T, D)
        out: torch.Tensor = self.norm_ffn(self.pffn(s) + s)  # (B, T, D)
        return out
