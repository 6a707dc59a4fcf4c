"""``bench/sequences.py``'s loss-vs-FLOPs figure of the equal-FLOPs part."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np

from tests.bench_scripts import load_bench


def _row(k: int, variant: str, losses: list[float]) -> dict:
    return {"K": k, "variant": variant, "target_flops_per_example": 5e5, "d_model": 8,
            "flops_per_example": 5.1e5,
            "curve": [{"examples_seen": 5000.0 * (i + 1), "train_flops": 7.5e9 * (i + 1),
                       "val_logloss": loss, "val_auc": 0.7} for i, loss in enumerate(losses)]}


def test_the_equal_flops_figure_has_a_panel_per_k_and_a_line_per_variant(tmp_path: Path) -> None:
    seq = load_bench("sequences")
    rows = [_row(k, v, [0.66, 0.64, 0.62, 0.61]) for k in (16, 64)
            for v in ("softmax", "hstu", "astro")]
    rows.append({"K": 256, "variant": "hstu", "target_flops_per_example": 5e5,
                 "status": "infeasible"})  # no curve: left out
    out = seq.plot_equal_curves(rows, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width > 1.8 * height  # two panels side by side (K 16, K 64), not three
    rgb = image[..., :3]
    for colour in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e), (0x2c, 0xa0, 0x2c)):  # tab: blue, orange, green
        near = np.abs(rgb * 255 - np.array(colour)).sum(axis=-1) < 30
        assert near.sum() > 50, colour  # each variant's line is drawn
    assert seq.plot_equal_curves(rows[-1:], tmp_path / "none.png") is None
