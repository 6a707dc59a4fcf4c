"""``recscale demo``: the main job on the embedded defaults.

A real search over the unified space on MovieLens-1M (local Ray, MLflow in SQLite in the
working directory), then the analysis report and the exported best config. ``--quick``
does the same on synthetic data with a tiny budget, as a smoke test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from search.settings import SearchConfig
from trainers.data import DataConfig, SyntheticConfig

__all__ = ["demo", "demo_config"]


def demo_config(quick: bool) -> SearchConfig:
    """The demo's search: sized to finish in minutes on 2 CPU cores."""
    if quick:
        return SearchConfig(
            name="demo-quick", space="unified",
            data=DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=20_000)),
            budget_flops=2e11, trial_flops=3e10, max_flops_per_example=2e6,
            eval_max_examples=2_000, max_concurrent=2,
        )
    return SearchConfig(
        name="demo", space="unified",
        data=DataConfig(name="movielens-1m", max_rows=300_000),
        budget_flops=8e11, trial_flops=1.6e11, max_flops_per_example=1e6,
        eval_max_examples=10_000, max_concurrent=2,
    )


def demo(args: argparse.Namespace) -> int:
    from analysis.pipeline import export_best, write_report
    from recscale.commands import print_best
    from search.runner import run_search

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(args.quick)
    t0 = time.perf_counter()
    outcome = run_search(cfg, tracking_uri=args.tracking_uri, storage=out / "ray", resume="auto")
    print_best(outcome)
    report_dir = write_report(cfg.name, outcome.tracking_uri, out / "report",
                              max_flops_per_example=cfg.max_flops_per_example,
                              budget_flops=cfg.budget_flops * 4)
    best = export_best(cfg.name, outcome.tracking_uri, out / "best.yaml",
                       max_flops_per_example=cfg.max_flops_per_example)
    print(f"\nreport: {report_dir / 'report.html'}\nbest config: {best}  "
          f"(train it: recscale train {best})\ndemo took {time.perf_counter() - t0:.0f} s")
    return 0
