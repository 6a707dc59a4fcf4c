"""Attention over feature tokens (BLOCKS.md section 1): softmax and HSTU, with ASTRO-style
partitions and dynamic temperature.

Both kinds are pre-norm. With ``partitions = N_b`` the ``T`` tokens are cut into ``N_b``
contiguous groups of ``T_g = T / N_b`` and every token attends within its own group only.

softmax (Transformer encoder layer, AutoInt)::

    A   = softmax(Q Kᵀ / (√d_h · τ))                       per head and group
    X'  = X + W_O [A V],        [Q, K, V] = LN(X) W_qkv
    X'' = X' + FFN(LN X'),      FFN(z) = W_2 GELU(W_1 z + b_1) + b_2,  hidden k·D

hstu (Zhai et al. 2024, pointwise aggregated attention)::

    [U, V, Q, K] = split(SiLU(LN(X) W_uvqk))                W_uvqk: D × 4D (+ bias)
    A = SiLU(Q Kᵀ / τ + b) / T_g                            per head and group; no softmax
    Y = X + W_o (U ⊙ LN(A V))

``b`` is a learned field-pair bias shared by the heads **(choice: feature tokens have no
order or time, so there is no relative position bias and no causal mask)**. Only the
``N_b`` diagonal ``T_g × T_g`` blocks of the ``T × T`` bias are ever used, so only they are
stored: ``N_b · T_g² = T² / N_b`` parameters.

Over a behaviour history (``ModelConfig.seq_len = K``, ``spaces.model``) the block sees
``T = K + T_f`` tokens laid out ``[history oldest .. newest ‖ field tokens]``: softmax and
HSTU attend over every step with the target item's field tokens in view, and ``b`` is
then a learned *position*-pair bias over that fixed layout (it subsumes HSTU's relative
position bias ``rab^p``) **(choice: no causal mask: a history is all in the past of the
target, and a non-causal pass costs the same matmuls)**. HSTU then also adds the
paper's relative *time* bias ``rab^t``, a learned scalar per bucket of the time
difference of the two tokens (the frame calls :meth:`Attention.use_time_bias` and passes
the buckets, :func:`pair_time_buckets`)::

    A = SiLU(Q Kᵀ / τ + b + w_t[β_ij]) / T_g,   β_ij = time_buckets(|t_i − t_j|)

with ``t`` a token's time (a history step's event time, the target's time for the field
tokens), ``time_buckets(Δ) = 1 + min(⌊log2(1 + Δ)⌋, 39)`` (Δ in seconds; the log
bucketing of the paper) and ``β_ij = 0`` when either token is padding. ``w_t`` has
``1 + N_GAP_BUCKETS`` entries, starts at 0 and is shared by the heads, like ``b``; its
look-up and addition are element-wise: 0 FLOPs. ASTRO's partitions cut that sequence into
``N_b`` contiguous groups, so attention costs ``4T²D/N_b`` and the last group holds the
most recent steps with the field tokens; the dynamic temperature summarises each group
of the history.

Temperature: ``fixed`` is ``τ = 1``. ``dynamic`` is ``τ = softplus(wᵀ c + s) + ε`` per
head, ``w ∈ ℝ^{D×H}`` learned (no bias), ``c`` the mean of the normalised tokens
``LN(X)`` **of the token's group** **(choice: a per-group summary keeps the groups fully
independent, so partitioned attention stays exactly local; with ``N_b = 1`` it is the mean
token of the input)**. The constant shift ``s = log(exp(1 − ε) − 1)`` makes ``τ = 1`` when
``wᵀ c = 0``, so a dynamic block starts near the fixed one.

FLOPs per example (multiply-add = 2, matmuls only)::

    softmax: 8TD² + 4T²D/N_b + 4kTD²     (QKV 6TD², W_O 2TD², QKᵀ and AV 4T²D/N_b, FFN 4kTD²)
    hstu:   10TD² + 4T²D/N_b             (W_uvqk 8TD², W_o 2TD², QKᵀ and AV 4T²D/N_b)
    dynamic temperature: + 2 N_b D H     (one D×H map per group summary)

Parameters::

    softmax: (4 + 2k) D² + (9 + k) D     (2 LNs, W_qkv, W_O, FFN, all with biases)
    hstu:    5 D² + 9 D + T²/N_b         (2 LNs, W_uvqk, W_o with biases, pair bias)
    dynamic temperature: + D H
    hstu time bias (with a history): + 1 + N_GAP_BUCKETS      (counted by the frame)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import register_block
from spaces.features import N_GAP_BUCKETS

__all__ = ["TAU_EPS", "TIME_BIAS_ROWS", "Attention", "AttentionConfig", "hstu_weights",
           "pair_time_buckets", "softmax_attention", "time_buckets"]

TAU_EPS = 1e-2
"""Floor ``ε`` of the dynamic temperature: ``τ ≥ ε`` keeps ``QKᵀ/τ`` finite."""
_TAU_SHIFT = math.log(math.expm1(1.0 - TAU_EPS))  # softplus(_TAU_SHIFT) + TAU_EPS == 1
TIME_BIAS_ROWS = 1 + N_GAP_BUCKETS
"""Entries of HSTU's time-bias table ``w_t``: bucket 0 (a padding token) and 1..40."""


#: float dtype -> (its bits as an integer dtype, mantissa bits, exponent bias - 1)
_FLOAT_BITS = {torch.float64: (torch.int64, 52, 1022), torch.float32: (torch.int32, 23, 126)}


def _log2_buckets(x: torch.Tensor) -> torch.Tensor:
    """``min(1 + floor(log2 x), N_GAP_BUCKETS)`` (integer) for float ``x >= 1``, read
    off the float's exponent bits: exact (no rounding of a ``log2`` at bucket edges) and
    one shift instead of a transcendental per element."""
    # a jit trace (fvcore's FLOP count) has no dtype view: the same exponent from frexp
    if torch.jit.is_tracing():  # type: ignore[attr-defined,no-untyped-call]
        return torch.frexp(x).exponent.to(torch.int64).clamp_(max=N_GAP_BUCKETS)
    if x.dtype not in _FLOAT_BITS:
        x = x.to(torch.float32)
    as_int, mantissa, bias = _FLOAT_BITS[x.dtype]
    exponent = x.view(as_int) >> mantissa  # biased exponent: the sign bit is 0 for x >= 1
    return exponent.sub_(bias).clamp_(max=N_GAP_BUCKETS)


def time_buckets(gap: torch.Tensor) -> torch.Tensor:
    """Log time buckets ``1 + min(floor(log2(1 + gap)), N_GAP_BUCKETS - 1)`` (int64).

    ``gap`` is in seconds (any float dtype; negative gaps count as 0). The same buckets
    are the ids of a history step's gap embedding (``trainers.sequences.gap_buckets``)
    and of HSTU's relative time bias.

    Example:
        >>> time_buckets(torch.tensor([0.0, 1.0, 60.0, 86400.0, 1e30])).tolist()
        [1, 2, 6, 17, 40]
    """
    return _log2_buckets(1.0 + gap.clamp(min=0.0)).to(torch.int64)  # int64 for float32 too


def pair_time_buckets(time: torch.Tensor, pad: torch.Tensor, partitions: int) -> torch.Tensor:
    """The time-bias bucket of every token pair within each group.

    Args:
        time: ``(B, T)`` int64 or float token times in seconds (any common origin: only
            differences are used).
        pad: ``(B, T)`` bool, ``True`` for a padding token (its pairs get bucket 0).
        partitions: ``N_b``; must divide ``T``.

    Returns:
        ``(B, N_b, T_g, T_g)`` int32 buckets (kept for backward by every layer: half
        the memory of int64): :func:`time_buckets` of ``|t_i − t_j|``, or
        0 where token ``i`` or ``j`` is padding. Times are subtracted and bucketed in
        float64 (exact for integer seconds below ``2^53``); seven cheap element-wise
        passes over the pairs, once per forward for every layer.

    Example:
        >>> t = torch.tensor([[0, 60, 60, 0]]); pad = torch.tensor([[True, False, False, False]])
        >>> pair_time_buckets(t, pad, 1)[0, 0].tolist()
        [[0, 0, 0, 0], [0, 1, 1, 6], [0, 1, 1, 6], [0, 6, 6, 1]]
    """
    b, t = time.shape
    tg = t // partitions
    time = time.reshape(b, partitions, tg)
    pad = pad.reshape(b, partitions, tg)
    time = time.to(torch.float64)  # (B, N_b, T_g): integer seconds stay exact below 2^53
    delta = (time[..., :, None] - time[..., None, :]).abs_()  # (B, N_b, T_g, T_g)
    out = _log2_buckets(delta.add_(1.0))  # 1 + floor(log2(1 + Δ)), capped
    return out.masked_fill_(pad[..., :, None] | pad[..., None, :], 0).to(torch.int32)


class _TakeBias(torch.autograd.Function):
    """``w[idx]`` for a small table ``w`` and many integer indices, whose gradient is one
    ``bincount`` pass (``index``'s backward, an accumulating scatter, costs several
    times more on CPU over the ``B·T²`` pairs)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = w.shape[0]
        return w.index_select(0, idx.reshape(-1)).view(idx.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        gw = torch.bincount(idx.reshape(-1), grad.reshape(-1), ctx.rows)
        return gw.to(grad.dtype), None


class AttentionConfig(BlockConfig):
    """Knobs of the attention family.

    Attributes:
        kind: ``softmax`` (pre-norm Transformer encoder layer) or ``hstu`` (pointwise SiLU
            attention, no FFN).
        n_heads: attention heads ``H``; ``d_model`` must be divisible by it.
        ffn_mult: FFN hidden width multiple ``k`` (softmax only; hstu has no FFN).
        partitions: ``N_b`` contiguous token groups attended within; must divide ``n_tokens``.
        temperature: ``fixed`` (``τ = 1``) or ``dynamic`` (per group and head, learned).
        dropout: dropout on the attention weights and on each residual branch.
    """

    kind: Literal["softmax", "hstu"] = "softmax"
    n_heads: int = Field(2, ge=1, le=64)
    ffn_mult: int = Field(2, ge=1, le=16)
    partitions: Literal[1, 2, 4] = 1
    temperature: Literal["fixed", "dynamic"] = "fixed"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    conditions: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        "ffn_mult": ("kind", ("softmax",))}  # hstu has no FFN


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      tau: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """``softmax(Q Kᵀ / (√d_h · τ)) V`` within each group.

    Args:
        q, k, v: ``(B, N_b, H, T_g, d_h)``.
        tau: ``(B, N_b, H)`` temperature, or ``None`` for ``τ = 1``.
        dropout: dropout probability on the attention weights (pass 0 in eval).

    Returns:
        ``(B, N_b, H, T_g, d_h)``.

    Example:
        >>> q = k = v = torch.randn(2, 1, 4, 3, 8)
        >>> softmax_attention(q, k, v).shape
        torch.Size([2, 1, 4, 3, 8])
    """
    b, g, h, tg, dh = q.shape
    if tau is not None:
        q = q / tau[..., None, None]  # (B, N_b, H, T_g, d_h): τ folded into Q
    out = F.scaled_dot_product_attention(  # 4-D so the fused kernels apply
        q.reshape(b * g, h, tg, dh), k.reshape(b * g, h, tg, dh), v.reshape(b * g, h, tg, dh),
        dropout_p=dropout)  # (B·N_b, H, T_g, d_h)
    return out.view(b, g, h, tg, dh)


def hstu_weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor,
                 tau: torch.Tensor | None = None) -> torch.Tensor:
    """HSTU pointwise attention weights ``A = SiLU(Q Kᵀ / τ + b) / T_g`` (no softmax).

    Args:
        q, k: ``(B, N_b, T_g, H, d_h)``.
        bias: ``(N_b, T_g, T_g)`` pair bias, or ``(B, N_b, T_g, T_g)`` per example (the
            pair bias plus the time bias); shared by the heads.
        tau: ``(B, N_b, H)`` temperature, or ``None`` for ``τ = 1``.

    Returns:
        ``(B, N_b, H, T_g, T_g)``; rows do not sum to 1 in general.

    Example:
        >>> q = k = torch.randn(2, 2, 3, 4, 8)
        >>> hstu_weights(q, k, torch.zeros(2, 3, 3)).shape
        torch.Size([2, 2, 4, 3, 3])
    """
    tg = q.shape[2]
    scores = torch.einsum("bgihd,bgjhd->bghij", q, k)  # (B, N_b, H, T_g, T_g)
    if tau is not None:
        scores = scores / tau[..., None, None]
    per_head = bias[:, :, None] if bias.dim() == 4 else bias[:, None]  # broadcast over H
    return F.silu(scores + per_head) / tg  # (B, N_b, H, T_g, T_g)


@register_block("attention")
class Attention(Block):
    """Softmax or HSTU attention over ``(B, T, D)`` feature tokens (module docstring).

    Args:
        cfg: the family's knobs.
        n_tokens: ``T``; must be divisible by ``cfg.partitions``.
        d_model: ``D``; must be divisible by ``cfg.n_heads``.

    Example:
        >>> cfg = AttentionConfig(kind="hstu", n_heads=2, partitions=2)
        >>> blk = Attention(cfg, n_tokens=4, d_model=16)
        >>> blk(torch.randn(3, 4, 16)).shape
        torch.Size([3, 4, 16])
        >>> Attention.count_flops(cfg, 4, 16).per_example == 10 * 4 * 16**2 + 4 * 4**2 * 16 // 2
        True
    """

    Config = AttentionConfig
    cfg: AttentionConfig
    w_tau: nn.Linear  # exists only with temperature="dynamic"
    ln2: nn.LayerNorm  # softmax only
    ffn: nn.Sequential  # softmax only
    ln_av: nn.LayerNorm  # hstu only
    pair_bias: nn.Parameter  # hstu only
    time_bias: nn.Parameter | None  # hstu over a history only (use_time_bias)

    def __init__(self, cfg: AttentionConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        d, g = d_model, cfg.partitions
        self.ln1 = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.kind == "softmax":
            self.w_in = nn.Linear(d, 3 * d)  # W_qkv
            self.w_out = nn.Linear(d, d)  # W_O
            self.ln2 = nn.LayerNorm(d)
            hidden = cfg.ffn_mult * d
            self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        else:
            tg = n_tokens // g
            self.w_in = nn.Linear(d, 4 * d)  # W_uvqk
            self.w_out = nn.Linear(d, d)  # W_o
            self.ln_av = nn.LayerNorm(d)
            self.pair_bias = nn.Parameter(torch.zeros(g, tg, tg))  # diagonal blocks of b
        if cfg.temperature == "dynamic":
            self.w_tau = nn.Linear(d, cfg.n_heads, bias=False)
        self.time_bias = None

    def use_time_bias(self) -> None:
        """Give an HSTU block its relative time bias ``w_t`` (:data:`TIME_BIAS_ROWS`
        scalars, zero at the start, so the block starts as the one without it). The frame
        calls it when the block reads a behaviour history and then passes the buckets to
        :meth:`forward`; the frame also counts these parameters (``spaces.model``).

        Raises:
            ValueError: on a softmax block (the time bias is HSTU's).
        """
        if self.cfg.kind != "hstu":
            raise ValueError("the relative time bias belongs to the hstu kind")
        self.time_bias = nn.Parameter(torch.zeros(TIME_BIAS_ROWS))

    @classmethod
    def check(cls, cfg: AttentionConfig, n_tokens: int, d_model: int) -> None:
        if n_tokens < 1 or d_model < 1:
            raise BlockDimensionError(
                f"attention: n_tokens={n_tokens} and d_model={d_model} must be positive")
        if d_model % cfg.n_heads:
            raise BlockDimensionError(
                f"attention: d_model={d_model} is not divisible by n_heads={cfg.n_heads}")
        if n_tokens % cfg.partitions:
            raise BlockDimensionError(
                f"attention: partitions={cfg.partitions} does not divide n_tokens={n_tokens}")

    @classmethod
    def count_flops(cls, cfg: AttentionConfig, n_tokens: int, d_model: int) -> BlockCost:
        t, d, g = n_tokens, d_model, cfg.partitions
        scores = 4 * t * t * d // g  # Q Kᵀ and A V over N_b groups of T_g = T/N_b
        if cfg.kind == "softmax":
            flops = 8 * t * d * d + scores + 4 * cfg.ffn_mult * t * d * d
        else:
            flops = 10 * t * d * d + scores
        if cfg.temperature == "dynamic":
            flops += 2 * g * d * cfg.n_heads  # wᵀ c per group summary
        return BlockCost(per_example=flops)

    @classmethod
    def count_params(cls, cfg: AttentionConfig, n_tokens: int, d_model: int) -> int:
        d, k = d_model, cfg.ffn_mult
        if cfg.kind == "softmax":
            n = (4 + 2 * k) * d * d + (9 + k) * d
        else:
            n = 5 * d * d + 9 * d + n_tokens * n_tokens // cfg.partitions
        if cfg.temperature == "dynamic":
            n += d * cfg.n_heads
        return n

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        c = AttentionConfig
        return {
            "softmax": (c(kind="softmax", n_heads=2), 4, 16),
            "softmax_dynamic": (c(kind="softmax", n_heads=2, temperature="dynamic"), 4, 16),
            "softmax_p2_dynamic": (c(kind="softmax", n_heads=4, partitions=2,
                                     temperature="dynamic"), 8, 16),
            "softmax_p4_k1": (c(kind="softmax", n_heads=1, ffn_mult=1, partitions=4), 8, 8),
            "hstu": (c(kind="hstu", n_heads=2), 4, 16),
            "hstu_p2": (c(kind="hstu", n_heads=4, partitions=2), 8, 16),
            "hstu_p4_dynamic": (c(kind="hstu", n_heads=2, partitions=4,
                                  temperature="dynamic"), 8, 16),
        }

    def temperature(self, h: torch.Tensor) -> torch.Tensor | None:
        """``τ = softplus(wᵀ c + s) + ε`` per group and head, ``c`` the group's mean token.

        Args:
            h: ``(B, T, D)`` normalised tokens ``LN(X)``.

        Returns:
            ``(B, N_b, H)``, or ``None`` with ``temperature="fixed"`` (``τ = 1``).
        """
        if self.cfg.temperature == "fixed":
            return None
        b, t, d = h.shape
        g = self.cfg.partitions
        c = h.view(b, g, t // g, d).mean(dim=2)  # (B, N_b, D)
        return F.softplus(self.w_tau(c) + _TAU_SHIFT) + TAU_EPS  # (B, N_b, H)

    def attention_weights(self, x: torch.Tensor,
                          time_buckets: torch.Tensor | None = None) -> torch.Tensor:
        """The attention matrix ``A`` of every group and head, for inspection.

        Args:
            x: ``(B, T, D)`` block input.
            time_buckets: as for :meth:`forward`.

        Returns:
            ``(B, N_b, H, T_g, T_g)``: softmax rows sum to 1; HSTU rows need not.
        """
        h = self.ln1(x)  # (B, T, D)
        tau = self.temperature(h)
        if self.cfg.kind == "softmax":
            q, k, _ = self._split(self.w_in(h), 3)  # 3 x (B, N_b, T_g, H, d_h)
            scores = torch.einsum("bgihd,bgjhd->bghij", q, k) / math.sqrt(q.shape[-1])
            if tau is not None:
                scores = scores / tau[..., None, None]
            return torch.softmax(scores, dim=-1)
        _, _, q, k = self._split(F.silu(self.w_in(h)), 4)
        return hstu_weights(q, k, self._bias(time_buckets), tau)

    def _bias(self, time_buckets: torch.Tensor | None) -> torch.Tensor:
        """HSTU's bias: ``b`` ``(N_b, T_g, T_g)``, plus ``w_t[β]`` ``(B, N_b, T_g, T_g)``
        when the block has a time bias and the frame passed the buckets ``β``."""
        if self.time_bias is None:
            return self.pair_bias
        if time_buckets is None:
            raise ValueError("this hstu block has a time bias: pass time_buckets")
        taken: torch.Tensor = _TakeBias.apply(  # type: ignore[no-untyped-call]
            self.time_bias, time_buckets)  # (B, N_b, T_g, T_g)
        return self.pair_bias + taken

    def _split(self, z: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """``(B, T, parts·D) -> parts × (B, N_b, T_g, H, d_h)`` (views, no copies)."""
        b, t, _ = z.shape
        g, h = self.cfg.partitions, self.cfg.n_heads
        z = z.view(b, g, t // g, parts, h, self.d_model // h)  # (B, N_b, T_g, parts, H, d_h)
        return z.unbind(dim=3)

    def forward(self, x: torch.Tensor, time_buckets: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``.

        Args:
            x: the tokens.
            time_buckets: ``(B, N_b, T_g, T_g)`` int64 pair buckets
                (:func:`pair_time_buckets`); needed by, and only read by, an HSTU block
                with a time bias (:meth:`use_time_bias`).
        """
        if self.cfg.kind == "softmax":
            return self._softmax(x)
        return self._hstu(x, time_buckets)

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        h = self.ln1(x)  # (B, T, D)
        tau = self.temperature(h)  # (B, N_b, H) or None
        q, k, v = (z.transpose(2, 3) for z in self._split(self.w_in(h), 3))  # (B, N_b, H, T_g, d_h)
        p = self.cfg.dropout if self.training else 0.0
        a = softmax_attention(q, k, v, tau, p)  # (B, N_b, H, T_g, d_h)
        a = a.transpose(2, 3).reshape(b, t, d)  # (B, T, D): heads concatenated per token
        x = x + self.drop(self.w_out(a))  # (B, T, D)
        out: torch.Tensor = x + self.drop(self.ffn(self.ln2(x)))  # (B, T, D)
        return out

    def _hstu(self, x: torch.Tensor, time_buckets: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        h = self.ln1(x)  # (B, T, D)
        tau = self.temperature(h)  # (B, N_b, H) or None
        uvqk = F.silu(self.w_in(h))  # (B, T, 4D)
        u = uvqk[..., :d]  # (B, T, D)
        _, v, q, k = self._split(uvqk, 4)  # (B, N_b, T_g, H, d_h)
        a = hstu_weights(q, k, self._bias(time_buckets), tau)  # (B, N_b, H, T_g, T_g)
        a = F.dropout(a, self.cfg.dropout, self.training)
        av = torch.einsum("bghij,bgjhd->bgihd", a, v).reshape(b, t, d)  # (B, T, D)
        out: torch.Tensor = x + self.drop(self.w_out(u * self.ln_av(av)))  # (B, T, D)
        return out
