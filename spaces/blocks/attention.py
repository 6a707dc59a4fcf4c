"""Attention over feature tokens: softmax (AutoInt/Transformer) and HSTU pointwise,
with ASTRO-style partitions and dynamic temperature (BLOCKS.md section 1).

softmax (pre-norm)::

    A   = softmax(Q Kᵀ / (√d_h · τ))             per head, within each partition
    X'  = X + W_O [A V](LN X)
    X'' = X' + FFN(LN X'),   FFN hidden k·D, GELU

hstu (Zhai et al. 2024, pointwise aggregated attention)::

    [U, V, Q, K] = split(SiLU(LN(X) W_uvqk))
    A = SiLU(Q Kᵀ / τ + b) / T_g                  no softmax, no causal mask
    Y = X + W_o (U ⊙ LN(A V))

``b`` is a learned pair bias over feature tokens (tokens have no order or time), one
``T_g × T_g`` block per partition. ``partitions = N_b`` splits the ``T`` tokens into
``N_b`` contiguous groups of ``T_g = T/N_b`` and attends within groups only.
``temperature = dynamic`` makes ``τ = softplus(wᵀ c) + ε`` per head, ``c`` the mean token.

FLOPs per example (multiply-add = 2): softmax ``8TD² + 4T²D/N_b + 4kTD²``,
hstu ``10TD² + 4T²D/N_b``; dynamic temperature adds ``2DH``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import register_block

__all__ = ["Attention", "AttentionConfig", "partitioned_attention"]


class AttentionConfig(BlockConfig):
    """Knobs of the attention family.

    Attributes:
        kind: ``softmax`` (Transformer encoder layer) or ``hstu`` (pointwise SiLU).
        n_heads: attention heads ``H`` (``d_model`` must divide by it).
        ffn_mult: FFN hidden width multiple ``k`` (softmax only).
        partitions: token groups ``N_b`` attended within (1 = full attention).
        temperature: ``fixed`` (τ = ``tau``) or ``dynamic`` (input-dependent, per head).
        tau: the fixed temperature.
    """

    kind: Literal["softmax", "hstu"] = "softmax"
    n_heads: int = Field(2, ge=1, le=64)
    ffn_mult: int = Field(2, ge=1, le=16)
    partitions: int = Field(1, ge=1, le=64)
    temperature: Literal["fixed", "dynamic"] = "fixed"
    tau: float = Field(1.0, gt=0)


def partitioned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, partitions: int,
                          tau: torch.Tensor | float, kind: str,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``(B, H, T, d_h)`` tensors within ``partitions`` contiguous groups.

    ``tau`` is a float or ``(B, H)``; ``bias`` (hstu) is ``(N_b, T_g, T_g)``.
    Returns ``(B, H, T, d_h)``.
    """
    b, h, t, dh = q.shape
    tg = t // partitions
    q = q.reshape(b, h, partitions, tg, dh)  # (B, H, N_b, T_g, d_h)
    k = k.reshape(b, h, partitions, tg, dh)
    v = v.reshape(b, h, partitions, tg, dh)
    if isinstance(tau, torch.Tensor):
        q = q / tau.view(b, h, 1, 1, 1)  # τ per example and head
    elif tau != 1.0:
        q = q / tau
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, N_b, T_g, T_g)
    if kind == "softmax":
        attn = torch.softmax(scores / math.sqrt(dh), dim=-1)
    else:
        assert bias is not None
        attn = nn.functional.silu(scores + bias) / tg
    out = torch.matmul(attn, v)  # (B, H, N_b, T_g, d_h)
    return out.reshape(b, h, t, dh)


@register_block("attention")
class Attention(Block):
    """Softmax or HSTU attention block over ``(B, T, D)`` feature tokens.

    Example:
        >>> blk = Attention(AttentionConfig(kind="hstu", partitions=2), n_tokens=4, d_model=16)
        >>> blk(torch.randn(3, 4, 16)).shape
        torch.Size([3, 4, 16])
    """

    Config = AttentionConfig

    def __init__(self, cfg: AttentionConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        d, h = d_model, cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        if cfg.kind == "softmax":
            self.w_in = nn.Linear(d, 3 * d)
            self.w_out = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(),
                                     nn.Linear(cfg.ffn_mult * d, d))
        else:
            tg = n_tokens // cfg.partitions
            self.w_in = nn.Linear(d, 4 * d)
            self.w_out = nn.Linear(d, d)
            self.ln_av = nn.LayerNorm(d)
            self.pair_bias = nn.Parameter(torch.zeros(cfg.partitions, tg, tg))
        if cfg.temperature == "dynamic":
            self.w_tau = nn.Linear(d, h)

    @classmethod
    def check(cls, cfg: AttentionConfig, n_tokens: int, d_model: int) -> None:
        if d_model % cfg.n_heads:
            raise BlockDimensionError(
                f"attention: d_model={d_model} is not divisible by n_heads={cfg.n_heads}")
        if n_tokens % cfg.partitions:
            raise BlockDimensionError(
                f"attention: partitions={cfg.partitions} does not divide n_tokens={n_tokens}")

    @classmethod
    def count_flops(cls, cfg: AttentionConfig, n_tokens: int, d_model: int) -> BlockCost:
        t, d = n_tokens, d_model
        attn = 4 * t * t * d // cfg.partitions  # Q Kᵀ and A V within groups
        if cfg.kind == "softmax":
            flops = 8 * t * d * d + attn + 4 * cfg.ffn_mult * t * d * d
        else:
            flops = 10 * t * d * d + attn
        if cfg.temperature == "dynamic":
            flops += 2 * d * cfg.n_heads
        return BlockCost(flops)

    @classmethod
    def count_params(cls, cfg: AttentionConfig, n_tokens: int, d_model: int) -> int:
        d, k = d_model, cfg.ffn_mult
        if cfg.kind == "softmax":
            n = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * k * d + k * d) + (k * d * d + d)
        else:
            tg = n_tokens // cfg.partitions
            n = 2 * d + (4 * d * d + 4 * d) + (d * d + d) + 2 * d + cfg.partitions * tg * tg
        if cfg.temperature == "dynamic":
            n += d * cfg.n_heads + cfg.n_heads
        return n

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {
            "softmax": (AttentionConfig(kind="softmax", n_heads=2), 4, 16),
            "softmax_p2_dynamic": (AttentionConfig(kind="softmax", n_heads=4, partitions=2,
                                                   temperature="dynamic"), 8, 16),
            "hstu": (AttentionConfig(kind="hstu", n_heads=2), 4, 16),
            "hstu_p4_dynamic": (AttentionConfig(kind="hstu", n_heads=2, partitions=4,
                                                temperature="dynamic"), 8, 16),
        }

    def _tau(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.cfg.temperature == "dynamic":
            c = x.mean(dim=1)  # (B, D) summary of the input
            return nn.functional.softplus(self.w_tau(c)) + 1e-2  # (B, H)
        return float(self.cfg.tau)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        return z.view(b, t, self.cfg.n_heads, d // self.cfg.n_heads).transpose(1, 2)  # (B, H, T, d_h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        tau = self._tau(x)
        h = self.ln1(x)
        if self.cfg.kind == "softmax":
            q, k, v = self.w_in(h).chunk(3, dim=-1)  # 3 x (B, T, D)
            a = partitioned_attention(self._heads(q), self._heads(k), self._heads(v),
                                      self.cfg.partitions, tau, "softmax")  # (B, H, T, d_h)
            x = x + self.w_out(a.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
            return x + self.ffn(self.ln2(x))
        u, v, q, k = nn.functional.silu(self.w_in(h)).chunk(4, dim=-1)  # 4 x (B, T, D)
        a = partitioned_attention(self._heads(q), self._heads(k), self._heads(v),
                                  self.cfg.partitions, tau, "hstu", self.pair_bias)
        av = self.ln_av(a.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
        return x + self.w_out(u * av)
