"""UniMixer's UniMixing and UniMixing-Lite blocks (arXiv 2604.00590; BLOCKS.md section 4).

TokenMixer is a fixed permutation of the flattened ``T·D`` vector; UniMixing learns the
mixing. Flatten each example to ``L = T·D`` (token-major ``x.reshape(B, T·D)``, or
channel-major: transpose to ``D×T`` first), cut it into ``n = L / B_s`` blocks
``x_i ∈ ℝ^{B_s}`` (``B_s`` = ``block_size``) and mix::

    h_i          = x_i W̄_B^i                   local,  W̄_B^i ∈ ℝ^{B_s×B_s}
    UniMixing(X) = reshape_{T×D}(W̄_G H)        global, W̄_G ∈ ℝ^{n×n},  H = [h_1; …; h_n]

Every mixing matrix is constrained to be symmetric and doubly stochastic::

    W̄ = Sinkhorn(((W + Wᵀ) / 2) / τ)        (log-space, alternate row / column normalisation)

so TokenMix itself (``B_s = D/T``, ``W̄_G`` = the perfect shuffle, ``W̄_B = I``) lies in the
constrained set, and the ``H = T`` restriction disappears (the output is always
``n × B_s = T × D``). The temperature ``τ`` anneals from ``tau_start`` to ``tau_end`` as
training progresses (``set_progress``; geometric by default, i.e. ``1/τ`` grows by equal
factors); low ``τ`` pushes ``W̄`` towards a permutation.

The block::

    O = RMSNorm(X + UniMixing(X))
    Y = O + W_down^t [(W_up^t o_t) ⊙ Swish(W_gate^t o_t)]        per-token SwiGLU, d_ff = k·D

**UniMixing-Lite** compresses the mixing parameters::

    W̄_B^i = Sinkhorn(sym(Σ_ℓ ω_ℓ^i Z_ℓ) / τ)     b shared bases Z_ℓ ∈ ℝ^{B_s×B_s}, ω ∈ ℝ^{n×b}
    W̄_G   = Sinkhorn(sym(A_G B_G) / τ)          A_G ∈ ℝ^{n×r}, B_G ∈ ℝ^{r×n}

Cost (multiply-add = 2; symmetrising, Sinkhorn, norms and gating are element-wise and not
counted)::

    FLOPs per example = 2·L·B_s + 2·L²/B_s + 6·T·D·d_ff        (local, global, SwiGLU)
    Lite, per batch   = 2·n·b·B_s² + 2·n²·r                   (building W̄_B and A_G B_G)
    params            = n² + n·B_s² + 3·T·D·d_ff + D            (UniMixing)
                        2·n·r + b·B_s² + n·b + 3·T·D·d_ff + D   (Lite)

A ``1×1`` doubly-stochastic matrix is the constant 1, so when ``B_s = 1`` (no local mixing)
or ``n = 1`` (no global mixing) that side is the identity: it has no parameters, is skipped
in the forward pass and costs nothing (its term drops out of the FLOPs above).

In training mode the matrices are rebuilt every forward pass (the per-batch cost above).
In eval mode they are built once, without gradient, and cached until ``τ`` or a mixing
parameter changes (an optimizer step, ``load_state_dict``, a dtype/device move).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

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

Flatten = Literal["token", "channel"]

# Initialisation (see ``_MixerBase._init_local_logits`` and ``_global_logits_noise``).
LOCAL_INIT_DIAGONAL = 0.9  # W̄_B^i starts at 0.9·I + 0.1·(off-diagonal mass): near identity
GLOBAL_INIT_STD = 0.1  # W̄_G starts near uniform 1/n (logits ≈ 0 ± 0.1)


class UniMixingConfig(BlockConfig):
    """Knobs shared by UniMixing and UniMixing-Lite.

    Attributes:
        block_size: ``B_s``, the length of each mixed block; must divide ``T·D``.
        ffn_mult: ``k``; the per-token SwiGLU's hidden width is ``d_ff = k·D``.
        flatten: ``token`` (token-major ``x.reshape(B, T·D)``) or ``channel`` (transpose
            each example to ``D×T`` first, so blocks run across tokens).
        tau_start: Sinkhorn temperature at the start of training.
        tau_end: temperature at the end of training (``<= tau_start``).
        tau_schedule: ``geometric`` (``τ = τ_s (τ_e/τ_s)^p``, equal ratio per step) or
            ``linear`` (``τ = τ_s + (τ_e − τ_s) p``), ``p`` the training progress.
        sinkhorn_iters: row + column normalisation rounds. Columns always sum to 1 (the
            last pass); rows converge more slowly the sharper ``logits/τ`` is: near
            ``τ_end`` with logits spread over ±1, 10 rounds leave rows off by up to ~0.5.
    """

    block_size: int = Field(16, ge=1, le=65536)
    ffn_mult: int = Field(2, ge=1, le=16)
    flatten: Flatten = "token"
    tau_start: float = Field(1.0, gt=0.0, le=100.0)
    tau_end: float = Field(0.05, gt=0.0, le=100.0)
    tau_schedule: Literal["geometric", "linear"] = "geometric"
    sinkhorn_iters: int = Field(10, ge=1, le=200)

    @model_validator(mode="after")
    def _anneals_downwards(self) -> UniMixingConfig:
        if self.tau_end > self.tau_start:
            raise ValueError(
                f"tau_end={self.tau_end} must not exceed tau_start={self.tau_start}: the "
                "temperature anneals downwards")
        return self


class UniMixingLiteConfig(UniMixingConfig):
    """UniMixing-Lite's knobs: the shared ones plus

    Attributes:
        n_bases: ``b``, the number of shared ``B_s×B_s`` bases of the local matrices.
        rank: ``r``, the rank of the global logits ``A_G B_G``.
    """

    n_bases: int = Field(4, ge=1, le=1024)
    rank: int = Field(8, ge=1, le=4096)


# ---------------------------------------------------------------------------------------
# pure functions


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn normalisation of ``exp(logits)`` in log space.

    Alternates row and column normalisation by ``logsumexp`` (stable however sharp the
    logits, e.g. at ``τ = 0.05``), ending with columns: columns sum to 1 exactly, rows to
    within the convergence of ``iters`` rounds. A symmetric input gives a symmetric limit.

    Args:
        logits: ``(..., n, n)``.
        iters: normalisation rounds (each one row + one column pass).

    Returns:
        ``(..., n, n)``, non-negative, approximately doubly stochastic.

    Example:
        >>> w = sinkhorn(torch.randn(3, 5, 5), iters=30)
        >>> bool(torch.allclose(w.sum(-1), torch.ones(3, 5), atol=1e-4))
        True
    """
    log_p = logits
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    return log_p.exp()


def _sym(w: torch.Tensor) -> torch.Tensor:
    """``(W + Wᵀ) / 2`` over the last two dims."""
    return 0.5 * (w + w.transpose(-1, -2))


def perfect_shuffle(n_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """TokenMix as a global mixing matrix over ``n = T²`` blocks of ``B_s = D/T``.

    Token-major block ``i = t·T + h`` (token ``t``, head ``h``) moves to position
    ``h·T + t``: ``P[h·T + t, t·T + h] = 1``. It transposes a ``T×T`` grid, so it is a
    symmetric permutation (an involution), hence also doubly stochastic.

    Args:
        n_tokens: ``T`` (= the number of heads ``H``).
        dtype: dtype of the result.

    Returns:
        ``(T², T²)`` 0/1 matrix, for ``unimix(x, P, I)`` with ``B_s = D/T``.

    Example:
        >>> perfect_shuffle(2)
        tensor([[1., 0., 0., 0.],
                [0., 0., 1., 0.],
                [0., 1., 0., 0.],
                [0., 0., 0., 1.]])
    """
    n = n_tokens * n_tokens
    src = torch.arange(n)
    dst = (src % n_tokens) * n_tokens + src // n_tokens
    p = torch.zeros(n, n, dtype=dtype)
    p[dst, src] = 1
    return p


def unimix(x: torch.Tensor, w_global: torch.Tensor | None, w_local: torch.Tensor | None,
           flatten: Flatten = "token") -> torch.Tensor:
    """UniMixing with given matrices: ``reshape_{T×D}(W̄_G [x_i W̄_B^i]_i)``.

    Args:
        x: ``(B, T, D)``.
        w_global: ``(n, n)``, ``W̄_G``; output block ``m`` is ``Σ_i W̄_G[m, i] h_i``.
            ``None`` means the identity (skipped, e.g. the constant ``1×1`` when ``n = 1``).
        w_local: ``(n, B_s, B_s)``, ``W̄_B^i``, with ``n·B_s = T·D``. ``None`` means
            identities (skipped, e.g. the constant ``1×1`` matrices when ``B_s = 1``).
        flatten: ``token`` (blocks cut from ``x.reshape(B, T·D)``) or ``channel``
            (from ``x.transpose(1, 2).reshape(B, D·T)``; the result is transposed back).

    Returns:
        ``(B, T, D)``.

    Example:
        >>> x = torch.randn(2, 4, 16)
        >>> eye = torch.eye(4).expand(16, 4, 4)
        >>> bool(torch.equal(unimix(x, torch.eye(16), eye), x))
        True
    """
    b, t, d = x.shape
    if flatten not in ("token", "channel"):
        raise ValueError(f"unimix: flatten must be 'token' or 'channel', got {flatten!r}")
    if w_local is not None:
        n, bs = w_local.shape[0], w_local.shape[-1]
    elif w_global is not None:
        n, bs = w_global.shape[0], t * d // max(w_global.shape[0], 1)
    else:
        return x  # both sides are identities
    ok_local = w_local is None or tuple(w_local.shape) == (n, bs, bs)
    ok_global = w_global is None or tuple(w_global.shape) == (n, n)
    if n * bs != t * d or not ok_local or not ok_global:
        shapes = [None if w is None else tuple(w.shape) for w in (w_global, w_local)]
        raise ValueError(
            f"unimix: x {tuple(x.shape)} needs w_global (n, n) and w_local (n, B_s, B_s) "
            f"with n·B_s = T·D = {t * d}; got {shapes[0]} and {shapes[1]}")
    seq = x if flatten == "token" else x.transpose(1, 2)  # (B, T, D) or (B, D, T)
    h = seq.reshape(b, n, bs)  # (B, n, B_s)
    if w_local is not None:
        h = torch.einsum("bnk,nkj->bnj", h, w_local)  # local: (B, n, B_s)
    if w_global is not None:
        h = torch.einsum("mn,bnj->bmj", w_global, h)  # global: (B, n, B_s)
    out = h.reshape(seq.shape)  # (B, T, D) or (B, D, T)
    return out if flatten == "token" else out.transpose(1, 2)  # (B, T, D)


# ---------------------------------------------------------------------------------------
# shared block body


def _local_identity_logit(block_size: int, tau: float) -> float:
    """Diagonal logit ``s`` with ``Sinkhorn(s·I / τ)`` having diagonal ``LOCAL_INIT_DIAGONAL``.

    ``exp(s/τ · I)`` already has equal row and column sums ``e^{s/τ} + B_s − 1``, so its
    Sinkhorn image has diagonal ``e^{s/τ} / (e^{s/τ} + B_s − 1)``; solve for ``s``.
    """
    p = LOCAL_INIT_DIAGONAL
    return tau * math.log(p * (block_size - 1) / (1.0 - p))


class _MixerBase(Block):
    """UniMixing's frame, shared by both families: the mixing (with matrices from
    ``_build_matrices``), RMSNorm, the per-token SwiGLU, τ annealing and the eval cache."""

    cfg: UniMixingConfig

    def __init__(self, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        self.block_size = cfg.block_size
        self.n_blocks = n_tokens * d_model // cfg.block_size
        d_ff = cfg.ffn_mult * d_model
        self.norm = nn.RMSNorm(d_model)
        # per-token SwiGLU; up and gate are fused: w_in[t] = [W_up^t | W_gate^t]
        self.w_in = nn.Parameter(torch.randn(n_tokens, d_model, 2 * d_ff) * d_model**-0.5)
        self.w_down = nn.Parameter(torch.randn(n_tokens, d_ff, d_model) * d_ff**-0.5)
        self._progress = 0.0
        self._cache: tuple[tuple[Any, ...], torch.Tensor | None, torch.Tensor | None] | None
        self._cache = None

    # -- dimensions and cost ------------------------------------------------------------

    @classmethod
    def check(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> None:
        name = cls.__name__
        if n_tokens < 1 or d_model < 1:
            raise BlockDimensionError(
                f"{name} needs n_tokens >= 1 and d_model >= 1; got T={n_tokens}, D={d_model}")
        length = n_tokens * d_model
        if length % cfg.block_size:
            valid = [s for s in (8, 16, 32, 64, 128) if length % s == 0]
            raise BlockDimensionError(
                f"{name} cuts the flattened T·D = {n_tokens}·{d_model} = {length} vector into "
                f"blocks of block_size={cfg.block_size}, which does not divide it"
                + (f" (e.g. block_size in {valid} would)" if valid else ""))

    @staticmethod
    def _dims(cfg: UniMixingConfig, n_tokens: int, d_model: int) -> tuple[int, int, int]:
        """``(L, n, d_ff)``."""
        length = n_tokens * d_model
        return length, length // cfg.block_size, cfg.ffn_mult * d_model

    @classmethod
    def _per_example_flops(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> int:
        _, n, d_ff = cls._dims(cfg, n_tokens, d_model)
        bs = cfg.block_size
        local = 2 * n * bs * bs if bs > 1 else 0  # = 2·L·B_s (identity when B_s = 1)
        global_ = 2 * n * n * bs if n > 1 else 0  # = 2·L²/B_s (identity when n = 1)
        swiglu = 2 * n_tokens * d_model * (2 * d_ff) + 2 * n_tokens * d_ff * d_model
        return local + global_ + swiglu

    @classmethod
    def _frame_params(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> int:
        """SwiGLU (``3·T·D·d_ff``) + RMSNorm weight (``D``)."""
        return 3 * n_tokens * d_model * cfg.ffn_mult * d_model + d_model

    # -- temperature --------------------------------------------------------------------

    @property
    def progress(self) -> float:
        """Training progress in ``[0, 1]`` last given to ``set_progress``."""
        return self._progress

    @property
    def tau(self) -> float:
        """The Sinkhorn temperature at the current progress (see ``tau_schedule``)."""
        c, p = self.cfg, self._progress
        if c.tau_schedule == "linear":
            return c.tau_start + (c.tau_end - c.tau_start) * p
        return float(c.tau_start * (c.tau_end / c.tau_start) ** p)

    def set_progress(self, fraction: float) -> None:
        """Anneal ``τ``: ``fraction`` in ``[0, 1]`` (clamped) of training done."""
        self._progress = min(max(float(fraction), 0.0), 1.0)

    def get_extra_state(self) -> torch.Tensor:
        """The progress travels with ``state_dict`` so a reloaded model mixes at its ``τ``."""
        return torch.tensor(self._progress, dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        self.set_progress(float(state))

    # -- mixing matrices ----------------------------------------------------------------

    def _build_matrices(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(W̄_G (n, n), W̄_B (n, B_s, B_s))`` at the current ``τ``, with gradient; ``None``
        for a side that is the identity (``n = 1`` or ``B_s = 1``)."""
        raise NotImplementedError

    def _constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """Symmetrise, divide by ``τ``, Sinkhorn."""
        return sinkhorn(_sym(logits) / self.tau, self.cfg.sinkhorn_iters)

    def _mixing_parameters(self) -> list[nn.Parameter]:
        frame = {id(self.w_in), id(self.w_down), *(id(p) for p in self.norm.parameters())}
        return [p for p in self.parameters() if id(p) not in frame]

    def mixing_matrices(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(W̄_G (n, n), W̄_B (n, B_s, B_s))``; ``None`` for an identity side.

        Training mode: rebuilt on every call (differentiable). Eval mode: built once under
        ``no_grad`` and cached; the cache is keyed on ``τ`` and on every mixing
        parameter's storage, version counter (bumped by any in-place update: optimizer
        steps, ``load_state_dict``), dtype and device, and dropped in training mode. So in
        eval mode the mixing parameters get no gradient, even with autograd enabled.
        """
        if self.training:
            self._cache = None
            return self._build_matrices()
        key = (self.tau, *((p.data_ptr(), p._version, p.dtype, p.device)
                           for p in self._mixing_parameters()))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                w_global, w_local = self._build_matrices()
            self._cache = (key, w_global, w_local)
        return self._cache[1], self._cache[2]

    # -- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, D) -> (B, T, D)``."""
        w_global, w_local = self.mixing_matrices()  # (n, n), (n, B_s, B_s)
        o = self.norm(x + unimix(x, w_global, w_local, self.cfg.flatten))  # (B, T, D)
        up, gate = torch.einsum("btd,tdf->btf", o, self.w_in).chunk(2, dim=-1)  # 2×(B, T, d_ff)
        out: torch.Tensor = o + torch.einsum("btf,tfd->btd", up * F.silu(gate), self.w_down)
        return out  # (B, T, D)


# ---------------------------------------------------------------------------------------
# the two families


@register_block("unimixing")
class UniMixing(_MixerBase):
    """UniMixing block: a full ``n×n`` global matrix and one ``B_s×B_s`` matrix per block.

    See the module docstring for the formulas and costs.

    Constructor args:
        cfg: ``UniMixingConfig``.
        n_tokens: ``T``.
        d_model: ``D``; ``block_size`` must divide ``T·D``.

    Initialisation: local logits ``s·I`` with ``s`` chosen so each ``W̄_B^i`` starts as
    exactly ``0.9·I + 0.1/(B_s−1)·(11ᵀ − I)`` at ``tau_start`` (``LOCAL_INIT_DIAGONAL``;
    ``exp(s·I)`` is already doubly stochastic up to scale, so Sinkhorn is exact here): the
    local maps start close to a no-op, so no block loses its features before the global
    mix. No noise is needed: each block's matrix gets its own gradient from its own data.
    Global logits ``N(0, GLOBAL_INIT_STD²)``: ``W̄_G`` starts near the uniform ``1/n``,
    the centre of the doubly-stochastic (Birkhoff) polytope, so every block hears every
    other block from the first step and annealing commits to a sparse routing only as the
    logits learn one.

    Example:
        >>> blk = UniMixing(UniMixingConfig(block_size=8), n_tokens=4, d_model=16)
        >>> blk(torch.randn(2, 4, 16)).shape
        torch.Size([2, 4, 16])
    """

    Config = UniMixingConfig

    def __init__(self, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        n, bs = self.n_blocks, cfg.block_size
        self.global_logits: nn.Parameter | None = None
        self.local_logits: nn.Parameter | None = None
        if n > 1:
            self.global_logits = nn.Parameter(GLOBAL_INIT_STD * torch.randn(n, n))  # (n, n)
        if bs > 1:
            s = _local_identity_logit(bs, cfg.tau_start)
            self.local_logits = nn.Parameter(s * torch.eye(bs).repeat(n, 1, 1))  # (n, B_s, B_s)

    @classmethod
    def count_flops(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> BlockCost:
        return BlockCost(per_example=cls._per_example_flops(cfg, n_tokens, d_model))

    @classmethod
    def count_params(cls, cfg: UniMixingConfig, n_tokens: int, d_model: int) -> int:
        _, n, _ = cls._dims(cfg, n_tokens, d_model)
        bs = cfg.block_size
        mixing = (n * n if n > 1 else 0) + (n * bs * bs if bs > 1 else 0)
        return mixing + cls._frame_params(cfg, n_tokens, d_model)

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {
            "token_major": (UniMixingConfig(block_size=8), 4, 16),  # n = 8
            "channel_major": (UniMixingConfig(block_size=4, flatten="channel"), 4, 8),
            "linear_tau": (UniMixingConfig(block_size=2, ffn_mult=1, tau_schedule="linear",
                                           sinkhorn_iters=5), 3, 6),  # n = 9, B_s < D/T
            "scalar_blocks": (UniMixingConfig(block_size=1, ffn_mult=1), 2, 4),  # no local
            "one_block": (UniMixingConfig(block_size=8, ffn_mult=1), 2, 4),  # no global
        }

    def _build_matrices(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w_global = None if self.global_logits is None else self._constrain(self.global_logits)
        w_local = None if self.local_logits is None else self._constrain(self.local_logits)
        return w_global, w_local  # (n, n), (n, B_s, B_s)


@register_block("unimixing_lite")
class UniMixingLite(_MixerBase):
    """UniMixing-Lite: local matrices from ``b`` shared bases, a rank-``r`` global matrix.

    See the module docstring for the formulas and costs; the matrix construction is
    input-independent and reported as ``BlockCost.per_batch``.

    Constructor args:
        cfg: ``UniMixingLiteConfig``.
        n_tokens: ``T``.
        d_model: ``D``; ``block_size`` must divide ``T·D``.

    Initialisation: every basis ``Z_ℓ = s·I`` and ``ω = (1 + N(0, 0.1²))/b``, so
    ``Σ_ℓ ω_ℓ^i Z_ℓ = c_i·s·I`` with ``c_i ≈ 1``: each ``W̄_B^i`` starts exactly doubly
    stochastic with diagonal ≈ 0.9 (0.87–0.93), as in UniMixing. The noise on ``ω`` is
    needed: with equal weights every basis would get the same gradient and the ``b``
    identical bases would stay one; with it, ``∂L/∂Z_ℓ = Σ_i ω_ℓ^i G_i`` differ. ``A_G, B_G ~ N(0, σ²)`` with ``σ² = GLOBAL_INIT_STD / √r``, so the entries
    of ``A_G B_G`` have std ``GLOBAL_INIT_STD`` and ``W̄_G`` starts near uniform; neither
    factor is zero, so both get gradient from the first step.

    Example:
        >>> blk = UniMixingLite(UniMixingLiteConfig(block_size=8, n_bases=2, rank=4), 4, 16)
        >>> blk(torch.randn(2, 4, 16)).shape
        torch.Size([2, 4, 16])
    """

    Config = UniMixingLiteConfig
    cfg: UniMixingLiteConfig

    def __init__(self, cfg: UniMixingLiteConfig, n_tokens: int, d_model: int) -> None:
        super().__init__(cfg, n_tokens, d_model)
        n, bs, r, nb = self.n_blocks, cfg.block_size, cfg.rank, cfg.n_bases
        self.a_g: nn.Parameter | None = None
        self.b_g: nn.Parameter | None = None
        self.bases: nn.Parameter | None = None
        self.coef: nn.Parameter | None = None
        if n > 1:
            sigma = math.sqrt(GLOBAL_INIT_STD / math.sqrt(r))
            self.a_g = nn.Parameter(sigma * torch.randn(n, r))  # (n, r)
            self.b_g = nn.Parameter(sigma * torch.randn(r, n))  # (r, n)
        if bs > 1:
            s = _local_identity_logit(bs, cfg.tau_start)
            self.bases = nn.Parameter(s * torch.eye(bs).repeat(nb, 1, 1))  # (b, B_s, B_s)
            self.coef = nn.Parameter((1.0 + 0.1 * torch.randn(n, nb)) / nb)  # (n, b)

    @classmethod
    def count_flops(cls, cfg: UniMixingLiteConfig, n_tokens: int, d_model: int) -> BlockCost:
        _, n, _ = cls._dims(cfg, n_tokens, d_model)
        bs = cfg.block_size
        bases = 2 * n * cfg.n_bases * bs * bs if bs > 1 else 0  # Σ_ℓ ω_ℓ^i Z_ℓ
        low_rank = 2 * n * n * cfg.rank if n > 1 else 0  # A_G B_G
        return BlockCost(per_example=cls._per_example_flops(cfg, n_tokens, d_model),
                         per_batch=bases + low_rank)

    @classmethod
    def count_params(cls, cfg: UniMixingLiteConfig, n_tokens: int, d_model: int) -> int:
        _, n, _ = cls._dims(cfg, n_tokens, d_model)
        bs, nb = cfg.block_size, cfg.n_bases
        mixing = ((2 * n * cfg.rank if n > 1 else 0)
                  + (nb * bs * bs + n * nb if bs > 1 else 0))
        return mixing + cls._frame_params(cfg, n_tokens, d_model)

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {
            "lite": (UniMixingLiteConfig(block_size=8, n_bases=3, rank=4), 4, 16),
            "lite_channel": (UniMixingLiteConfig(block_size=4, n_bases=2, rank=2,
                                                 flatten="channel"), 4, 8),
            "lite_scalar_blocks": (UniMixingLiteConfig(block_size=1, ffn_mult=1, rank=2),
                                   2, 4),  # no local side
            "lite_one_block": (UniMixingLiteConfig(block_size=8, ffn_mult=1, n_bases=2),
                               2, 4),  # no global side
        }

    def _build_matrices(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w_global = w_local = None
        if self.a_g is not None and self.b_g is not None:
            w_global = self._constrain(self.a_g @ self.b_g)  # (n, r) @ (r, n) -> (n, n)
        if self.bases is not None and self.coef is not None:
            mixed = torch.einsum("nl,lij->nij", self.coef, self.bases)  # (n, B_s, B_s)
            w_local = self._constrain(mixed)
        return w_global, w_local
