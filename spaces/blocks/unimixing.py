"""UniMixer's UniMixing and UniMixing-Lite (arXiv 2604.00590; BLOCKS.md section 4).

TokenMixer is a fixed permutation of the flattened ``T·D`` vector; UniMixing learns it.
Flatten ``X`` to ``L = T·D`` (token-major, or channel-major: transpose to ``D×T``
first), cut into ``n = L/B`` blocks ``x_i ∈ ℝ^B``::

    h_i            = x_i W̄_B^i                   local,  W̄_B^i ∈ ℝ^{B×B}
    UniMixing(X)   = reshape_{T×D}(W̄_G H)        global, W̄_G ∈ ℝ^{n×n}
    W̄              = Sinkhorn(((W + Wᵀ)/2) / τ)    symmetric, doubly stochastic

τ anneals geometrically from ``tau_start`` to ``tau_end`` over training
(``set_progress``). In eval mode the matrices are normalised once and cached until a
parameter changes. The block::

    O = RMSNorm(X + UniMixing(X));   Y = O + W_down^t[(W_up^t o_t) ⊙ Swish(W_gate^t o_t)]

with per-token SwiGLU weights. **Lite** builds the local matrices from ``b`` shared
bases, ``W̄_B^i = Sinkhorn(Σ_ℓ ω_ℓ^i Z_ℓ)``, and the global one from a low-rank product,
``W̄_G = Sinkhorn(A_G B_G)``: mixing parameters drop from ``n² + nB²`` to
``2nr + bB² + nb``; building them costs ``2nbB² + 2n²r`` FLOPs once per forward pass.

FLOPs per example: ``2LB + 2L²/B + 6 T D d_ff`` (``d_ff = ffn_mult · D``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import register_block

__all__ = [
    "UniMixing",
    "UniMixingConfig",
    "UniMixingLite",
    "UniMixingLiteConfig",
    "perfect_shuffle",
    "sinkhorn",
    "unimix",
]


class UniMixingConfig(BlockConfig):
    """Knobs of UniMixing: ``block_size`` B, SwiGLU ``ffn_mult``, ``flatten`` order,
    temperature schedule ``tau_start → tau_end`` and ``sinkhorn_iters``."""

    block_size: int = Field(16, ge=1, le=4096)
    ffn_mult: int = Field(2, ge=1, le=16)
    flatten: Literal["token", "channel"] = "token"
    tau_start: float = Field(1.0, gt=0)
    tau_end: float = Field(0.05, gt=0)
    sinkhorn_iters: int = Field(10, ge=1, le=100)


class UniMixingLiteConfig(UniMixingConfig):
    """UniMixing-Lite adds ``n_bases`` (b shared local bases) and ``rank`` (r of W_G)."""

    n_bases: int = Field(4, ge=1, le=256)
    rank: int = Field(8, ge=1, le=1024)


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Doubly-stochastic ``exp`` of ``logits (..., n, n)`` by log-space row/column norms."""
    z = logits
    for _ in range(iters):
        z = z - z.logsumexp(dim=-1, keepdim=True)  # rows sum to 1
        z = z - z.logsumexp(dim=-2, keepdim=True)  # columns sum to 1
    return z.exp()


def _symmetric(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * (w + w.transpose(-1, -2))


def perfect_shuffle(n_tokens: int) -> torch.Tensor:
    """The ``T²×T²`` permutation matrix of TokenMix with ``H = T`` heads on ``B = D/T``
    blocks: block ``t·T + h`` goes to ``h·T + t``. Symmetric (an involution)."""
    n = n_tokens * n_tokens
    idx = torch.arange(n)
    dest = (idx % n_tokens) * n_tokens + idx // n_tokens
    p = torch.zeros(n, n)
    p[dest, idx] = 1.0
    return p


def unimix(x: torch.Tensor, w_global: torch.Tensor, w_local: torch.Tensor,
           flatten: str = "token") -> torch.Tensor:
    """UniMixing of ``x (B, T, D)`` with given matrices ``w_global (n, n)`` and
    ``w_local (n, B, B)``; returns ``(B, T, D)``."""
    b, t, d = x.shape
    n, bs, _ = w_local.shape
    flat = x if flatten == "token" else x.transpose(1, 2)  # (B, T, D) or (B, D, T)
    blocks = flat.reshape(b, n, bs)  # (B, n, B_s)
    h = torch.einsum("bni,nij->bnj", blocks, w_local)  # local: (B, n, B_s)
    g = torch.einsum("mn,bnj->bmj", w_global, h)  # global: (B, n, B_s)
    if flatten == "token":
        return g.reshape(b, t, d)
    return g.reshape(b, d, t).transpose(1, 2)


class _Mixer(Block):
    """Shared body: mixing (matrices from ``_matrices``), RMSNorm, per-token SwiGLU."""

    def __init__(self, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        self.n_blocks = n_tokens * d_model // cfg.block_size
        d_ff = cfg.ffn_mult * d_model
        self.norm = nn.RMSNorm(d_model)
        scale_in, scale_ff = d_model**-0.5, d_ff**-0.5
        self.w_up = nn.Parameter(torch.randn(n_tokens, d_model, d_ff) * scale_in)
        self.w_gate = nn.Parameter(torch.randn(n_tokens, d_model, d_ff) * scale_in)
        self.w_down = nn.Parameter(torch.randn(n_tokens, d_ff, d_model) * scale_ff)
        self.progress = 0.0
        self._cache: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def check(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> None:
        if (n_tokens * d_model) % cfg.block_size:
            raise BlockDimensionError(
                f"{cls.__name__.lower()}: block_size={cfg.block_size} does not divide "
                f"n_tokens*d_model={n_tokens * d_model}")

    @classmethod
    def _swiglu(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> tuple[int, int]:
        d_ff = cfg.ffn_mult * d_model
        return 6 * n_tokens * d_model * d_ff, 3 * n_tokens * d_model * d_ff + d_model

    @classmethod
    def _mix_flops(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> int:
        length, bs = n_tokens * d_model, cfg.block_size
        return 2 * length * bs + 2 * length * length // bs

    @property
    def tau(self) -> float:
        """Geometric annealing from ``tau_start`` (progress 0) to ``tau_end`` (1)."""
        c = self.cfg
        return float(c.tau_start * (c.tau_end / c.tau_start) ** self.progress)

    def set_progress(self, fraction: float) -> None:
        self.progress = min(max(float(fraction), 0.0), 1.0)

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def mixing_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W̄_G (n, n), W̄_B (n, B, B))``; cached in eval mode until a parameter changes."""
        if self.training:
            self._cache = None
            return self._matrices()
        key = (round(self.tau, 12).__hash__(),
               *(p._version for p in self.parameters()))  # in-place updates bump _version
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                wg, wb = self._matrices()
            self._cache = (key, wg, wb)
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_global, w_local = self.mixing_matrices()
        o = self.norm(x + unimix(x, w_global, w_local, self.cfg.flatten))  # (B, T, D)
        up = torch.einsum("btd,tdf->btf", o, self.w_up)  # (B, T, d_ff)
        gate = torch.einsum("btd,tdf->btf", o, self.w_gate)  # (B, T, d_ff)
        return o + torch.einsum("btf,tfd->btd", up * nn.functional.silu(gate), self.w_down)


def _identity_logits(n: int, size: int, strength: float) -> torch.Tensor:
    """Logits whose Sinkhorn image starts near the identity (a residual-friendly near
    no-op that gradients move off), with a little noise to break symmetry."""
    return strength * torch.eye(size).expand(n, size, size).clone() + 0.01 * torch.randn(n, size, size)


@register_block("unimixing")
class UniMixing(_Mixer):
    """UniMixing block with full global (``n×n``) and per-block local (``B×B``) matrices.

    Example:
        >>> blk = UniMixing(UniMixingConfig(block_size=8), n_tokens=4, d_model=16)
        >>> blk(torch.randn(2, 4, 16)).shape
        torch.Size([2, 4, 16])
    """

    Config = UniMixingConfig

    def __init__(self, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        n, bs = self.n_blocks, cfg.block_size
        self.global_logits = nn.Parameter(_identity_logits(1, n, 2.0)[0])  # (n, n)
        self.local_logits = nn.Parameter(_identity_logits(n, bs, 2.0))  # (n, B, B)

    @classmethod
    def count_flops(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> BlockCost:
        return BlockCost(cls._mix_flops(cfg, n_tokens, d_model) + cls._swiglu(cfg, n_tokens, d_model)[0])

    @classmethod
    def count_params(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> int:
        n = n_tokens * d_model // cfg.block_size
        return n * n + n * cfg.block_size**2 + cls._swiglu(cfg, n_tokens, d_model)[1]

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {
            "token_major": (UniMixingConfig(block_size=8), 4, 16),
            "channel_major": (UniMixingConfig(block_size=4, flatten="channel"), 4, 8),
        }

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        it = self.cfg.sinkhorn_iters
        return (sinkhorn(_symmetric(self.global_logits) / self.tau, it),
                sinkhorn(_symmetric(self.local_logits) / self.tau, it))


@register_block("unimixing_lite")
class UniMixingLite(_Mixer):
    """UniMixing-Lite: local matrices from shared bases, low-rank global matrix.

    Example:
        >>> blk = UniMixingLite(UniMixingLiteConfig(block_size=8, rank=4), 4, 16)
        >>> blk(torch.randn(2, 4, 16)).shape
        torch.Size([2, 4, 16])
    """

    Config = UniMixingLiteConfig

    def __init__(self, cfg: UniMixingLiteConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        n, bs, r, nb = self.n_blocks, cfg.block_size, cfg.rank, cfg.n_bases
        self.a_g = nn.Parameter(torch.randn(n, r) / math.sqrt(r))
        self.b_g = nn.Parameter(torch.randn(r, n) / math.sqrt(r))
        self.bases = nn.Parameter(_identity_logits(nb, bs, 2.0))  # (b, B, B)
        self.coef = nn.Parameter(torch.full((n, nb), 1.0 / nb) + 0.01 * torch.randn(n, nb))

    @classmethod
    def check(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> None:
        super().check(cfg, n_tokens, d_model)

    @classmethod
    def count_flops(cls, cfg: UniMixingLiteConfig, n_tokens: int, d_model: int) -> BlockCost:
        n, bs = n_tokens * d_model // cfg.block_size, cfg.block_size
        per_batch = 2 * n * cfg.n_bases * bs * bs + 2 * n * n * cfg.rank
        return BlockCost(cls._mix_flops(cfg, n_tokens, d_model) + cls._swiglu(cfg, n_tokens, d_model)[0],
                         per_batch)

    @classmethod
    def count_params(cls, cfg: UniMixingLiteConfig, n_tokens: int, d_model: int) -> int:
        n, bs = n_tokens * d_model // cfg.block_size, cfg.block_size
        mixing = 2 * n * cfg.rank + cfg.n_bases * bs * bs + n * cfg.n_bases
        return mixing + cls._swiglu(cfg, n_tokens, d_model)[1]

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {
            "lite": (UniMixingLiteConfig(block_size=8, n_bases=3, rank=4), 4, 16),
            "lite_channel": (UniMixingLiteConfig(block_size=4, n_bases=2, rank=2,
                                                 flatten="channel"), 4, 8),
        }

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        it, tau = self.cfg.sinkhorn_iters, self.tau
        w_g = torch.matmul(self.a_g, self.b_g)  # (n, n), rank r
        w_b = torch.einsum("nl,lij->nij", self.coef, self.bases)  # (n, B, B)
        return sinkhorn(_symmetric(w_g) / tau, it), sinkhorn(_symmetric(w_b) / tau, it)
