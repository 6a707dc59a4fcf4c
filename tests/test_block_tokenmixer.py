"""TokenMixer (BLOCKS.md section 2): TokenMix against its index definition, the per-token
FFN against a loop over tokens, the block against a plain reference, dimension checks,
and the block contract (shapes, gradients, seeds, parameter count, FLOPs by two counters)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.nn import functional as F

from spaces.blocks import BlockDimensionError, get_block
from spaces.blocks.tokenmixer import TokenMixer, TokenMixerConfig, token_mix

VARIANTS = [pytest.param(cfg, t, d, id=name) for name, (cfg, t, d) in TokenMixer.variants().items()]
BATCH = 4


def _build(cfg: TokenMixerConfig, t: int, d: int, seed: int = 0) -> TokenMixer:
    torch.manual_seed(seed)
    return TokenMixer(cfg, t, d)


def _token_mix_by_index(x: torch.Tensor) -> torch.Tensor:
    """TokenMix by its definition: chunk ``h`` of token ``t`` -> chunk ``t`` of token ``h``."""
    _, t, d = x.shape
    c = d // t
    out = torch.empty_like(x)
    for tok in range(t):
        for head in range(t):
            out[:, head, tok * c:(tok + 1) * c] = x[:, tok, head * c:(head + 1) * c]
    return out


def _reference(blk: TokenMixer, x: torch.Tensor) -> torch.Tensor:
    """The block's formula written plainly, one token at a time."""
    d = x.shape[-1]
    s = F.layer_norm(_token_mix_by_index(x) + x, (d,), blk.norm_mix.weight, blk.norm_mix.bias)
    v = torch.stack([F.gelu(s[:, t] @ blk.w1[t] + blk.b1[t]) @ blk.w2[t] + blk.b2[t]
                     for t in range(x.shape[1])], dim=1)
    return F.layer_norm(v + s, (d,), blk.norm_ffn.weight, blk.norm_ffn.bias)


@pytest.mark.parametrize(("t", "d"), [(1, 3), (2, 4), (4, 16), (3, 12), (8, 16)])
def test_token_mix_is_the_head_transpose(t: int, d: int) -> None:
    x = torch.randn(3, t, d, dtype=torch.float64)
    y = token_mix(x)
    assert torch.equal(y, _token_mix_by_index(x))
    assert torch.equal(token_mix(y), x)  # transposing the T×T grid twice is the identity
    # a permutation within each example: same multiset of values
    assert torch.equal(y.flatten(1).sort(-1).values, x.flatten(1).sort(-1).values)


def test_token_mix_moves_head_h_of_every_token_into_token_h() -> None:
    x = torch.arange(16.0).view(1, 4, 4)  # token t = [4t, 4t+1, 4t+2, 4t+3], heads of 1
    assert torch.equal(token_mix(x)[0], x[0].T)


def test_token_mix_rejects_d_not_divisible_by_t() -> None:
    with pytest.raises(ValueError, match="divisible"):
        token_mix(torch.randn(2, 4, 10))


def test_block_equals_plain_reference() -> None:
    for cfg, t, d in TokenMixer.variants().values():
        assert isinstance(cfg, TokenMixerConfig)
        blk = _build(cfg, t, d)
        x = torch.randn(3, t, d)
        assert torch.allclose(blk(x), _reference(blk, x), atol=1e-5)


def test_pffn_weights_are_per_token() -> None:
    blk = _build(TokenMixerConfig(ffn_mult=2), 4, 16)
    s = torch.randn(2, 4, 16)
    before = blk.pffn(s)
    with torch.no_grad():
        blk.w1[2] += 1.0  # change token 2's weights only
    after = blk.pffn(s)
    changed = (after - before).abs().amax(dim=(0, 2))
    assert changed[2] > 0
    assert torch.equal(changed[[0, 1, 3]], torch.zeros(3))


def test_pffn_output_token_depends_on_its_own_input_token_only() -> None:
    blk = _build(TokenMixerConfig(ffn_mult=1), 4, 8)
    s = torch.randn(1, 4, 8, requires_grad=True)
    blk.pffn(s)[0, 1].sum().backward()
    assert s.grad is not None
    assert s.grad[0, 1].abs().sum() > 0
    assert torch.equal(s.grad[0, [0, 2, 3]], torch.zeros(3, 8))


def test_dimension_check_names_the_problem() -> None:
    with pytest.raises(BlockDimensionError, match=r"d_model=30 must be divisible by n_tokens=4.*28 or 32"):
        TokenMixer(TokenMixerConfig(), 4, 30)
    with pytest.raises(BlockDimensionError, match="H = T"):
        TokenMixer.check(TokenMixerConfig(), 8, 12)
    with pytest.raises(BlockDimensionError, match="n_tokens >= 1"):
        TokenMixer.check(TokenMixerConfig(), 0, 12)
    TokenMixer.check(TokenMixerConfig(), 4, 32)  # fits: no error


def test_config_is_frozen_and_typed() -> None:
    with pytest.raises(ValidationError):
        TokenMixerConfig(ffn_mult=0)
    with pytest.raises(ValidationError):
        TokenMixerConfig(ffn_multt=2)  # type: ignore[call-arg]
    cfg = TokenMixerConfig(ffn_mult=3)
    with pytest.raises(ValidationError):
        cfg.ffn_mult = 4  # type: ignore[misc]


def test_cost_formulas() -> None:
    k, t, d = 3, 4, 16
    cfg = TokenMixerConfig(ffn_mult=k)
    assert TokenMixer.count_flops(cfg, t, d).per_example == 4 * k * t * d * d
    assert TokenMixer.count_flops(cfg, t, d).per_batch == 0
    assert TokenMixer.count_params(cfg, t, d) == 2 * k * t * d * d + t * (k * d + d) + 4 * d


def test_registered() -> None:
    assert get_block("tokenmixer") is TokenMixer
    assert TokenMixer.Config is TokenMixerConfig
