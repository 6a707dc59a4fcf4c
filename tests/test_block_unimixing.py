"""UniMixing and UniMixing-Lite (BLOCKS.md section 4).

The unified-framework equivalence (UniMixing with the perfect shuffle and identity blocks
is TokenMix, exactly), Sinkhorn and the constrained set, temperature annealing, the
eval-mode cache, initialisation, Lite's parameter count, per-batch FLOPs and reduction
to UniMixing, and the block contract over every variant of both families."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from spaces.blocks import Block, BlockDimensionError, get_block
from spaces.blocks.tokenmixer import token_mix
from spaces.blocks.unimixing import (
    LOCAL_INIT_DIAGONAL,
    UniMixing,
    UniMixingConfig,
    UniMixingLite,
    UniMixingLiteConfig,
    perfect_shuffle,
    sinkhorn,
    unimix,
)
from spaces.flops import fvcore_flops, torch_flops

FAMILIES: tuple[type[UniMixing] | type[UniMixingLite], ...] = (UniMixing, UniMixingLite)
VARIANTS = [pytest.param(cls, cfg, t, d, id=f"{get_name}-{name}")
            for cls, get_name in ((UniMixing, "unimixing"), (UniMixingLite, "unimixing_lite"))
            for name, (cfg, t, d) in cls.variants().items()]
BATCH = 4


def _build(cls: type[Block], cfg: object, t: int, d: int, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return cls(cfg, t, d)


def _full(t: int = 4, d: int = 16, **kw: object) -> UniMixing:
    torch.manual_seed(0)
    return UniMixing(UniMixingConfig(**{"block_size": 8, **kw}), t, d)  # type: ignore[arg-type]


def _lite(t: int = 4, d: int = 16, **kw: object) -> UniMixingLite:
    torch.manual_seed(0)
    cfg = UniMixingLiteConfig(**{"block_size": 8, "n_bases": 3, "rank": 4, **kw})  # type: ignore[arg-type]
    return UniMixingLite(cfg, t, d)


def _swiglu(blk: UniMixing | UniMixingLite, o: torch.Tensor) -> torch.Tensor:
    """Per-token SwiGLU written plainly, one token at a time."""
    d_ff = blk.w_down.shape[1]
    outs = []
    for t in range(o.shape[1]):
        w_up, w_gate = blk.w_in[t, :, :d_ff], blk.w_in[t, :, d_ff:]
        outs.append(((o[:, t] @ w_up) * F.silu(o[:, t] @ w_gate)) @ blk.w_down[t])
    return torch.stack(outs, dim=1)


# -- the unified framework: TokenMix is a point of UniMixing ---------------------------


@pytest.mark.parametrize(("t", "d"), [(1, 5), (2, 4), (3, 12), (4, 16), (8, 16)])
def test_shuffle_and_identity_blocks_are_token_mix_exactly(t: int, d: int) -> None:
    x = torch.randn(3, t, d, dtype=torch.float64)
    bs = d // t  # B_s = D/H with H = T heads: n = T² blocks
    w_global = perfect_shuffle(t, dtype=torch.float64)  # (T², T²)
    w_local = torch.eye(bs, dtype=torch.float64).expand(t * t, bs, bs)  # (T², B_s, B_s)
    assert torch.equal(unimix(x, w_global, w_local, flatten="token"), token_mix(x))


@pytest.mark.parametrize("t", [1, 2, 3, 4, 8])
def test_perfect_shuffle_is_in_the_constrained_set(t: int) -> None:
    p = perfect_shuffle(t)
    n = t * t
    assert torch.equal(p, p.T)  # symmetric
    assert torch.equal(p.sum(0), torch.ones(n)) and torch.equal(p.sum(1), torch.ones(n))
    assert set(p.unique().tolist()) <= {0.0, 1.0}  # a permutation matrix ...
    assert torch.equal(p @ p, torch.eye(n))  # ... and an involution (a grid transpose)


def test_the_block_reaches_tokenmixer_in_the_low_temperature_limit() -> None:
    """Logits ∝ shuffle / identity at τ_end: the Sinkhorn images are the permutation and
    identity to float64 precision, and the block is RMSNorm(X + TokenMix(X)) + SwiGLU."""
    t, d = 4, 16
    blk = _full(t, d, block_size=d // t).double()
    with torch.no_grad():
        assert blk.global_logits is not None and blk.local_logits is not None
        blk.global_logits.copy_(2.0 * perfect_shuffle(t, dtype=torch.float64))
        blk.local_logits.copy_(2.0 * torch.eye(d // t, dtype=torch.float64))
    blk.set_progress(1.0)  # τ = 0.05: logits / τ = 40
    w_global, w_local = blk.mixing_matrices()
    assert w_global is not None and w_local is not None
    assert torch.allclose(w_global, perfect_shuffle(t, dtype=torch.float64), atol=1e-15)
    x = torch.randn(2, t, d, dtype=torch.float64)
    assert torch.allclose(unimix(x, w_global, w_local), token_mix(x), atol=1e-14)
    o = blk.norm(x + token_mix(x))
    assert torch.allclose(blk(x), o + _swiglu(blk, o), atol=1e-12)


# -- unimix --------------------------------------------------------------------------


def test_channel_major_is_token_major_on_the_transpose() -> None:
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    n, bs = 8, 3
    w_global = sinkhorn(torch.randn(n, n, dtype=torch.float64), 20)
    w_local = torch.randn(n, bs, bs, dtype=torch.float64)
    channel = unimix(x, w_global, w_local, flatten="channel")
    assert torch.allclose(channel, unimix(x.transpose(1, 2), w_global, w_local).transpose(1, 2))
    assert not torch.allclose(channel, unimix(x, w_global, w_local, flatten="token"))


def test_flatten_order_decides_what_local_blocks_mix() -> None:
    """With W̄_G = I, token-major blocks (B_s = D) stay inside a token and channel-major
    blocks (B_s = T) stay inside a channel."""
    t, d = 4, 6
    x = torch.randn(1, t, d, requires_grad=True)
    tok = unimix(x, torch.eye(t), torch.randn(t, d, d), flatten="token")
    (grad,) = torch.autograd.grad(tok[0, 1].sum(), x)
    assert torch.equal(grad[0, [0, 2, 3]], torch.zeros(3, d)) and grad[0, 1].abs().sum() > 0
    chan = unimix(x, torch.eye(d), torch.randn(d, t, t), flatten="channel")
    (grad,) = torch.autograd.grad(chan[0, :, 2].sum(), x)
    assert torch.equal(grad[0, :, [0, 1, 3, 4, 5]], torch.zeros(t, 5)) and grad[0, :, 2].abs().sum() > 0


def test_unimix_identity_sides_and_bad_shapes() -> None:
    x = torch.randn(2, 3, 4)
    assert torch.equal(unimix(x, None, None), x)
    assert torch.equal(unimix(x, torch.eye(12), None), x)
    assert torch.equal(unimix(x, None, torch.eye(12).expand(1, 12, 12)), x)
    with pytest.raises(ValueError, match="n·B_s = T·D = 12"):
        unimix(x, torch.eye(4), torch.eye(4).expand(4, 4, 4))
    with pytest.raises(ValueError, match="flatten"):
        unimix(x, torch.eye(6), torch.eye(2).expand(6, 2, 2), flatten="diagonal")  # type: ignore[arg-type]


# -- Sinkhorn and the constrained set --------------------------------------------------


def test_sinkhorn_is_doubly_stochastic_and_keeps_symmetry() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 12, 12)
    w = sinkhorn(logits, iters=50)
    assert (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(5, 12), atol=1e-4)
    assert torch.allclose(w.sum(-2), torch.ones(5, 12), atol=1e-4)
    sym = sinkhorn(0.5 * (logits + logits.transpose(1, 2)), iters=50)
    assert torch.allclose(sym, sym.transpose(1, 2), atol=1e-5)
    assert not torch.allclose(w, w.transpose(1, 2), atol=1e-2)  # a non-symmetric input need not


def test_sinkhorn_is_stable_for_sharp_logits_and_converges_with_rounds() -> None:
    """At τ_end = 0.05, logits / τ span ±60: exp would overflow float32, log space does not.
    Columns sum to 1 after every round (the last pass); rows converge, slowly."""
    torch.manual_seed(0)
    logits = torch.randn(16, 16, dtype=torch.float64) / 0.05
    row_errors = []
    for iters in (10, 50, 1000):
        w = sinkhorn(logits, iters)
        assert torch.isfinite(w).all() and (w >= 0).all()
        assert torch.allclose(w.sum(-2), torch.ones(16, dtype=torch.float64), atol=1e-12)
        row_errors.append(float((w.sum(-1) - 1).abs().max()))
    assert row_errors[0] > row_errors[1] > row_errors[2]
    assert row_errors[2] < 1e-3
    assert torch.isfinite(sinkhorn(torch.randn(8, 8) / 0.001, 10)).all()  # float32 too


@pytest.mark.parametrize("blk", [_full(), _full(flatten="channel", block_size=4), _lite(),
                                 _full(sinkhorn_iters=50), _lite(sinkhorn_iters=50)],
                         ids=["full", "full_channel", "lite", "full_50", "lite_50"])
@pytest.mark.parametrize("progress", [0.0, 0.5])
def test_module_matrices_are_symmetric_and_doubly_stochastic(
        blk: UniMixing | UniMixingLite, progress: float) -> None:
    blk.set_progress(progress)
    for w in blk.mixing_matrices():
        assert w is not None
        ones = torch.ones(w.shape[:-1])
        assert torch.allclose(w.sum(-1), ones, atol=1e-4)
        assert torch.allclose(w.sum(-2), ones, atol=1e-4)
        assert torch.allclose(w, w.transpose(-1, -2), atol=1e-4)


# -- initialisation --------------------------------------------------------------------


@pytest.mark.parametrize("blk", [_full(), _lite(), _full(t=8, d=32, block_size=16)],
                         ids=["full", "lite", "full_bs16"])
def test_init_local_near_identity_global_near_uniform(blk: UniMixing | UniMixingLite) -> None:
    w_global, w_local = blk.mixing_matrices()
    assert w_global is not None and w_local is not None
    n = w_global.shape[0]
    diag = w_local.diagonal(dim1=-2, dim2=-1)
    exact = isinstance(blk, UniMixing)  # Lite: Σ_ℓ ω_ℓ^i ≈ 1 varies a little per block
    assert torch.allclose(diag, torch.full_like(diag, LOCAL_INIT_DIAGONAL), atol=1e-6 if exact else 0.05)
    assert torch.allclose(w_local.sum(-1), torch.ones_like(diag), atol=1e-6)  # Sinkhorn exact
    assert (w_global > 0.5 / n).all() and (w_global < 2.0 / n).all()


def test_lite_bases_separate_after_a_step() -> None:
    blk = _lite()
    assert blk.bases is not None
    assert torch.equal(blk.bases[0], blk.bases[1])  # identical at init ...
    blk(torch.randn(8, 4, 16)).square().sum().backward()
    torch.optim.SGD(blk.parameters(), lr=0.1).step()
    assert not torch.allclose(blk.bases[0], blk.bases[1], atol=1e-7)  # ... not after a step


# -- temperature annealing -------------------------------------------------------------


def test_geometric_annealing() -> None:
    blk = _full(tau_start=1.0, tau_end=0.05)
    assert blk.tau == 1.0
    blk.set_progress(0.5)
    assert blk.tau == pytest.approx(math.sqrt(0.05))  # equal ratio per step
    blk.set_progress(1.0)
    assert blk.tau == pytest.approx(0.05)
    blk.set_progress(7.0)  # clamped
    assert blk.progress == 1.0 and blk.tau == pytest.approx(0.05)
    blk.set_progress(-1.0)
    assert blk.progress == 0.0 and blk.tau == 1.0


def test_linear_annealing() -> None:
    blk = _full(tau_start=2.0, tau_end=0.1, tau_schedule="linear")
    assert blk.tau == 2.0
    blk.set_progress(0.5)
    assert blk.tau == pytest.approx(1.05)
    blk.set_progress(1.0)
    assert blk.tau == pytest.approx(0.1)


def test_annealing_sharpens_the_matrices_and_changes_the_output() -> None:
    for blk in (_full(), _lite()):
        x = torch.randn(2, 4, 16)
        entropies, outputs = [], []
        for p in (0.0, 0.5, 1.0):
            blk.set_progress(p)
            w_global, _ = blk.mixing_matrices()
            assert w_global is not None
            w_global = w_global.detach()
            entropies.append(float(-(w_global * w_global.clamp_min(1e-30).log()).sum()))
            outputs.append(blk(x))
        assert entropies[0] > entropies[1] > entropies[2]  # towards a permutation
        assert not torch.allclose(outputs[0], outputs[2])


def test_gradients_stay_finite_at_the_final_temperature() -> None:
    for blk in (_full(), _lite()):
        blk.set_progress(1.0)
        blk(torch.randn(3, 4, 16)).square().sum().backward()
        for name, p in blk.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_progress_travels_with_the_state_dict() -> None:
    blk = _full()
    blk.set_progress(0.7)
    buf = io.BytesIO()
    torch.save(blk.state_dict(), buf)
    buf.seek(0)
    fresh = _full()
    assert fresh.progress == 0.0
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.progress == pytest.approx(0.7) and fresh.tau == pytest.approx(blk.tau)
    fresh.eval()
    blk.eval()
    x = torch.randn(2, 4, 16)
    assert torch.equal(fresh(x), blk(x))


# -- the eval-mode cache ---------------------------------------------------------------


@pytest.mark.parametrize("make", [_full, _lite], ids=["full", "lite"])
def test_eval_cache_is_reused_and_matches_recomputing(make: object) -> None:
    blk = make()  # type: ignore[operator]
    x = torch.randn(3, 4, 16)
    train_out = blk(x)
    blk.eval()
    first = blk(x)
    assert blk._cache is not None
    cached = blk.mixing_matrices()
    assert all(a is b for a, b in zip(cached, blk.mixing_matrices(), strict=True))  # reused
    assert all(w is not None and not w.requires_grad for w in cached)
    assert torch.equal(blk(x), first)
    blk._cache = None  # recompute from scratch
    assert torch.equal(blk(x), first)
    assert torch.allclose(first, train_out, atol=1e-6)
    blk.train()
    blk(x)
    assert blk._cache is None  # dropped once training resumes


@pytest.mark.parametrize("make", [_full, _lite], ids=["full", "lite"])
def test_eval_cache_is_invalidated_by_training_steps(make: object) -> None:
    blk = make()  # type: ignore[operator]
    x = torch.randn(3, 4, 16)
    opt = torch.optim.Adam(blk.parameters(), lr=0.1)
    blk.eval()
    before = blk(x)
    blk.train()
    blk(x).square().sum().backward()
    opt.step()
    blk.eval()
    after = blk(x)
    assert not torch.allclose(after, before)
    blk._cache = None
    assert torch.equal(blk(x), after)  # the cache had seen the step


@pytest.mark.parametrize("make", [_full, _lite], ids=["full", "lite"])
def test_eval_cache_is_invalidated_by_parameter_and_tau_changes(make: object) -> None:
    blk = make()  # type: ignore[operator]
    x = torch.randn(3, 4, 16)
    blk.eval()
    before = blk(x)

    def fresh() -> torch.Tensor:
        out = blk(x)
        blk._cache = None
        assert torch.equal(blk(x), out)  # what the cache returned equals recomputing
        return out

    with torch.no_grad():  # an in-place edit of a mixing parameter, still in eval mode
        next(p for n, p in blk.named_parameters() if n not in ("w_in", "w_down", "norm.weight")).mul_(3.0)
    assert not torch.allclose(fresh(), before)
    blk.set_progress(1.0)
    sharp = fresh()
    other = make()  # type: ignore[operator]
    other.set_progress(1.0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    blk.load_state_dict(other.state_dict())
    assert not torch.allclose(fresh(), sharp)
    blk.double()  # a dtype move rebuilds the cached matrices in float64
    x = x.double()
    assert fresh().dtype == torch.float64
    w_global, w_local = blk.mixing_matrices()
    assert w_global is not None and w_global.dtype == torch.float64


def test_eval_mode_has_no_per_batch_work() -> None:
    cfg = UniMixingLiteConfig(block_size=8, n_bases=3, rank=4)
    blk = _lite()
    cost = UniMixingLite.count_flops(cfg, 4, 16)
    blk.eval()
    blk(torch.randn(1, 4, 16))  # fills the cache
    assert torch_flops(blk, (torch.randn(5, 4, 16),)) == 5 * cost.per_example


# -- UniMixing-Lite --------------------------------------------------------------------


def test_lite_parameter_count() -> None:
    t, d, bs, b, r, k = 4, 16, 8, 3, 5, 2
    cfg = UniMixingLiteConfig(block_size=bs, n_bases=b, rank=r, ffn_mult=k)
    blk = UniMixingLite(cfg, t, d)
    n = t * d // bs
    mixing = {name: p.numel() for name, p in blk.named_parameters()
              if name in ("a_g", "b_g", "bases", "coef")}
    assert mixing == {"a_g": n * r, "b_g": r * n, "bases": b * bs * bs, "coef": n * b}
    assert sum(mixing.values()) == 2 * n * r + b * bs * bs + n * b
    frame = 3 * t * d * (k * d) + d  # SwiGLU + RMSNorm
    assert UniMixingLite.count_params(cfg, t, d) == 2 * n * r + b * bs * bs + n * b + frame
    assert sum(p.numel() for p in blk.parameters()) == UniMixingLite.count_params(cfg, t, d)
    full = UniMixing.count_params(UniMixingConfig(block_size=bs, ffn_mult=k), t, d)
    assert full - frame == n * n + n * bs * bs


@pytest.mark.parametrize("name", list(UniMixingLite.variants()))
def test_lite_per_batch_flops_are_separated(name: str) -> None:
    """Counters see ``B·per_example + per_batch``: two batch sizes solve for both."""
    cfg, t, d = UniMixingLite.variants()[name]
    assert isinstance(cfg, UniMixingLiteConfig)
    blk = _build(UniMixingLite, cfg, t, d)
    cost = UniMixingLite.count_flops(cfg, t, d)
    for counter, tol in ((torch_flops, 0.0), (fvcore_flops, 0.02)):
        f2 = counter(blk, (torch.randn(2, t, d),))
        f6 = counter(blk, (torch.randn(6, t, d),))
        per_example = (f6 - f2) / 4
        per_batch = f2 - 2 * per_example
        assert per_example == pytest.approx(cost.per_example, rel=tol), counter.__name__
        assert per_batch == pytest.approx(cost.per_batch, rel=tol, abs=tol * cost.per_example), counter.__name__


def test_lite_per_batch_formula() -> None:
    t, d, bs, b, r = 4, 16, 8, 3, 4
    n = t * d // bs
    cost = UniMixingLite.count_flops(UniMixingLiteConfig(block_size=bs, n_bases=b, rank=r), t, d)
    assert cost.per_batch == 2 * n * b * bs * bs + 2 * n * n * r
    assert UniMixing.count_flops(UniMixingConfig(block_size=bs), t, d).per_batch == 0


def test_lite_with_full_bases_and_rank_is_unimixing() -> None:
    """b = n bases with ω = I and Z_i = W_B^i, r = n with A_G = W_G and B_G = I."""
    t, d, bs = 4, 8, 4
    n = t * d // bs
    full = _build(UniMixing, UniMixingConfig(block_size=bs), t, d)
    lite = _build(UniMixingLite, UniMixingLiteConfig(block_size=bs, n_bases=n, rank=n), t, d)
    assert isinstance(full, UniMixing) and isinstance(lite, UniMixingLite)
    assert lite.coef is not None and lite.bases is not None
    assert lite.a_g is not None and lite.b_g is not None
    with torch.no_grad():
        lite.coef.copy_(torch.eye(n))
        lite.bases.copy_(full.local_logits)  # type: ignore[arg-type]
        lite.a_g.copy_(full.global_logits)  # type: ignore[arg-type]
        lite.b_g.copy_(torch.eye(n))
        lite.w_in.copy_(full.w_in)
        lite.w_down.copy_(full.w_down)
    x = torch.randn(3, t, d)
    for p in (0.0, 0.6):
        full.set_progress(p)
        lite.set_progress(p)
        assert torch.allclose(lite(x), full(x), atol=1e-5)


# -- dimensions, config, cost formulas -------------------------------------------------


def test_dimension_check_names_the_problem() -> None:
    for cls in FAMILIES:
        cfg = cls.Config(block_size=7)
        with pytest.raises(BlockDimensionError, match=r"T·D = 4·16 = 64.*block_size=7"):
            cls(cfg, 4, 16)  # type: ignore[arg-type]
        with pytest.raises(BlockDimensionError, match="n_tokens >= 1"):
            cls.check(cfg, 0, 16)
        cls.check(cls.Config(block_size=32), 4, 16)  # fits; B_s > D is fine (H = T is gone)
    # no H = T constraint: D need not be divisible by T
    assert UniMixing(UniMixingConfig(block_size=5), 3, 10)(torch.randn(2, 3, 10)).shape == (2, 3, 10)


def test_configs_are_typed_and_frozen() -> None:
    with pytest.raises(ValidationError, match="tau_end"):
        UniMixingConfig(tau_start=0.1, tau_end=0.5)
    with pytest.raises(ValidationError):
        UniMixingConfig(flatten="diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        UniMixingConfig(block_sise=8)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        UniMixingConfig(n_bases=2)  # type: ignore[call-arg]  # a Lite-only knob
    with pytest.raises(ValidationError):
        UniMixingLiteConfig(rank=0)
    cfg = UniMixingConfig()
    assert (cfg.tau_start, cfg.tau_end, cfg.flatten, cfg.tau_schedule) == (1.0, 0.05, "token", "geometric")
    with pytest.raises(ValidationError):
        cfg.block_size = 4  # type: ignore[misc]


def test_flops_formula() -> None:
    t, d, bs, k = 4, 16, 8, 3
    big_l, d_ff = t * d, k * d
    cost = UniMixing.count_flops(UniMixingConfig(block_size=bs, ffn_mult=k), t, d)
    assert cost.per_example == 2 * big_l * bs + 2 * big_l**2 // bs + 6 * t * d * d_ff
    # a 1×1 side is the identity: its term drops out
    assert UniMixing.count_flops(UniMixingConfig(block_size=1, ffn_mult=k), t, d).per_example \
        == 2 * big_l**2 + 6 * t * d * d_ff
    assert UniMixing.count_flops(UniMixingConfig(block_size=big_l, ffn_mult=k), t, d).per_example \
        == 2 * big_l * big_l + 6 * t * d * d_ff


def test_degenerate_sides_have_no_parameters() -> None:
    scalar = UniMixing(UniMixingConfig(block_size=1), 2, 4)
    assert scalar.local_logits is None and scalar.global_logits is not None
    one = UniMixing(UniMixingConfig(block_size=8), 2, 4)
    assert one.global_logits is None and one.local_logits is not None
    lite = UniMixingLite(UniMixingLiteConfig(block_size=1), 2, 4)
    assert lite.bases is None and lite.coef is None and lite.a_g is not None


def test_registered() -> None:
    assert get_block("unimixing") is UniMixing and UniMixing.Config is UniMixingConfig
    assert get_block("unimixing_lite") is UniMixingLite
    assert UniMixingLite.Config is UniMixingLiteConfig
