"""The warmup-stable-decay learning-rate schedule of the training loop."""

from __future__ import annotations

import pytest
import torch

from spaces import ModelConfig
from tests.test_model import planted_pairwise
from trainers.loop import TrainConfig, train, wsd_factor

CFG = ModelConfig(block="tokenmixer", d_model=16, n_tokens=4, n_layers=1, embed_dim=8,
                  head_hidden=(16,))


def test_wsd_phases() -> None:
    f = [wsd_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:80])
    assert f[80] == pytest.approx(0.95) and f[99] == 0.0
    assert all(a > b for a, b in zip(f[80:], f[81:]))  # strictly decaying to the end


def test_wsd_sqrt_shape_sits_below_linear() -> None:
    lin = [wsd_factor(s, 50, 0.0, 0.5, "linear") for s in range(25, 50)]
    sq = [wsd_factor(s, 50, 0.0, 0.5, "sqrt") for s in range(25, 50)]
    assert sq[-1] == 0.0 and all(q <= v for q, v in zip(sq, lin))
    assert sq[0] == pytest.approx(1 - (1 / 25) ** 0.5)


def test_wsd_tiny_runs() -> None:
    assert wsd_factor(0, 1, 0.5, 0.5) == 0.0  # one step: it is the last
    assert [wsd_factor(s, 2, 0.0, 0.1) for s in range(2)] == [1.0, 0.0]


def test_phases_must_fit() -> None:
    with pytest.raises(ValueError, match="exceeds 1"):
        TrainConfig(schedule="wsd", warmup_frac=0.5, decay_frac=0.6)


def test_loop_applies_wsd_to_every_group() -> None:
    spec, tr = planted_pairwise(2000, seed=0)
    _, va = planted_pairwise(500, seed=1)
    lrs: list[list[float]] = []
    orig = torch.optim.AdamW.step

    def spy(self: torch.optim.AdamW, *a: object, **k: object) -> object:
        lrs.append([g["lr"] for g in self.param_groups])
        return orig(self, *a, **k)

    tc = TrainConfig(batch_size=100, max_examples=1000, schedule="wsd", warmup_frac=0.2,
                     decay_frac=0.5, lr=1e-2, optimizer="adamw_split", embedding_lr=2e-2,
                     eval_every=1000)
    torch.optim.AdamW.step = spy  # type: ignore[method-assign]
    try:
        res = train(CFG, tc, spec, tr, va)
    finally:
        torch.optim.AdamW.step = orig  # type: ignore[method-assign]
    assert res.status == "completed"
    dense = [g[0] for g in lrs]
    assert len(dense) == 10
    # 2 warmup steps, 3 stable, 5 decaying to 0 at the last step
    assert dense == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 8e-3, 6e-3, 4e-3, 2e-3, 0.0])
    assert [g[1] for g in lrs] == pytest.approx([2 * v for v in dense])
