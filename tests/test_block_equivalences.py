"""The equivalences of the unified framework and each family's structural claims."""

from __future__ import annotations

import torch
from torch import nn

from spaces.blocks.attention import Attention, AttentionConfig
from spaces.blocks.tokenmixer import token_mix
from spaces.blocks.unimixing import (
    UniMixing,
    UniMixingConfig,
    UniMixingLite,
    UniMixingLiteConfig,
    perfect_shuffle,
    sinkhorn,
    unimix,
)
from spaces.blocks.wukong import Wukong, WukongConfig, fm_naive, fm_optimised
from spaces.flops import torch_flops


def test_unimixing_with_perfect_shuffle_and_identity_is_tokenmix_exactly() -> None:
    t, d = 4, 16  # H = T heads of D/H = 4: block size B = D/H
    x = torch.randn(3, t, d, dtype=torch.float64)
    n = t * t
    w_global = perfect_shuffle(t).double()
    w_local = torch.eye(d // t, dtype=torch.float64).expand(n, d // t, d // t)
    assert torch.equal(unimix(x, w_global, w_local), token_mix(x))


def test_perfect_shuffle_lies_in_the_constrained_set() -> None:
    p = perfect_shuffle(4)
    assert torch.equal(p, p.T)  # symmetric
    assert torch.equal(p.sum(0), torch.ones(16)) and torch.equal(p.sum(1), torch.ones(16))
    assert torch.equal(p @ p, torch.eye(16))  # an involution, as transposing a T×T grid is


def test_sinkhorn_is_doubly_stochastic() -> None:
    logits = torch.randn(5, 12, 12)
    w = sinkhorn(logits, iters=50)
    assert torch.allclose(w.sum(-1), torch.ones(5, 12), atol=1e-4)
    assert torch.allclose(w.sum(-2), torch.ones(5, 12), atol=1e-4)
    sym = sinkhorn(0.5 * (logits + logits.transpose(1, 2)), iters=50)
    assert torch.allclose(sym, sym.transpose(1, 2), atol=1e-3)


def test_temperature_anneals_and_sharpens() -> None:
    blk = UniMixing(UniMixingConfig(block_size=8, tau_start=1.0, tau_end=0.05), 4, 16)
    blk.set_progress(0.0)
    assert blk.tau == 1.0
    soft, _ = blk.mixing_matrices()
    blk.set_progress(1.0)
    assert abs(blk.tau - 0.05) < 1e-12
    sharp, _ = blk.mixing_matrices()
    assert sharp.max() > soft.max()  # closer to a permutation


def test_eval_cache_matches_and_is_invalidated() -> None:
    for blk in (UniMixing(UniMixingConfig(block_size=8), 4, 16),
                UniMixingLite(UniMixingLiteConfig(block_size=8, rank=4), 4, 16)):
        x = torch.randn(2, 4, 16)
        blk.eval()
        first = blk(x)
        assert blk._cache is not None
        assert torch.equal(blk(x), first)
        blk.train()
        assert torch.allclose(blk(x), first, atol=1e-6)
        opt = torch.optim.SGD(blk.parameters(), lr=0.5)
        blk(x).sum().backward()
        opt.step()
        blk.eval()
        after = blk(x)
        blk._cache = None
        assert torch.equal(after, blk(x))  # the cache saw the update
        assert not torch.allclose(after, first)


def test_lite_builds_its_matrices_once_per_batch() -> None:
    cfg = UniMixingLiteConfig(block_size=8, n_bases=3, rank=4)
    blk = UniMixingLite(cfg, 4, 16)
    cost = UniMixingLite.count_flops(cfg, 4, 16)
    f2 = torch_flops(blk, (torch.randn(2, 4, 16),))
    f6 = torch_flops(blk, (torch.randn(6, 4, 16),))
    per_example = (f6 - f2) / 4
    assert per_example == cost.per_example
    assert f2 - 2 * per_example == cost.per_batch > 0


def test_wukong_optimised_fm_equals_naive() -> None:
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    y = torch.randn(7, 5, dtype=torch.float64)
    assert torch.allclose(fm_optimised(x, y), fm_naive(x, y), atol=1e-10)


def test_wukong_residual_is_identity_only_when_token_counts_match() -> None:
    same = Wukong(WukongConfig(n_fm=4, n_lc=4), 8, 16)
    other = Wukong(WukongConfig(n_fm=4, n_lc=2), 8, 16)
    assert same.proj is None and other.proj is not None
    assert other(torch.randn(2, 8, 16)).shape == (2, 6, 16)


def _plain_attention(blk: Attention, x: torch.Tensor) -> torch.Tensor:
    """Reference: the same weights through torch's scaled_dot_product_attention."""
    b, t, d = x.shape
    h = blk.cfg.n_heads
    q, k, v = blk.w_in(blk.ln1(x)).chunk(3, dim=-1)
    q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
    a = nn.functional.scaled_dot_product_attention(q, k, v)
    x = x + blk.w_out(a.transpose(1, 2).reshape(b, t, d))
    return x + blk.ffn(blk.ln2(x))


def test_one_partition_equals_plain_attention() -> None:
    torch.manual_seed(0)
    blk = Attention(AttentionConfig(kind="softmax", n_heads=4, partitions=1), 6, 16)
    x = torch.randn(3, 6, 16)
    assert torch.allclose(blk(x), _plain_attention(blk, x), atol=1e-5)


def test_partitions_attend_within_their_group_only() -> None:
    for kind in ("softmax", "hstu"):
        blk = Attention(AttentionConfig(kind=kind, n_heads=2, partitions=2), 8, 16)
        x = torch.randn(2, 8, 16)
        x2 = x.clone()
        x2[:, 4:] += torch.randn(2, 4, 16)  # perturb the second group only
        y, y2 = blk(x), blk(x2)
        assert torch.allclose(y[:, :4], y2[:, :4], atol=1e-6), kind
        assert not torch.allclose(y[:, 4:], y2[:, 4:])
