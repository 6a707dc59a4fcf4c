"""Pareto frontiers: the points that no other point beats on both cost and loss.

A point ``(x, y)`` is dominated when another has ``x' <= x`` and ``y' <= y`` with at
least one strict. The non-dominated points, sorted by ``x``, are a staircase whose ``y``
strictly falls as ``x`` grows; read as a step function it is the lower envelope
``y*(X) = min{y : x <= X}``: the best loss reachable at cost at most ``X``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.runs import AnalysisError
from trainers.contracts import OBJECTIVE

__all__ = ["compute_frontier", "pareto_front"]


def _check(df: pd.DataFrame, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise AnalysisError(f"frame lacks column(s) {missing}; it has {list(df.columns)}")


def _front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    pts = df.dropna(subset=[x, y]).sort_values([x, y], kind="mergesort")
    ys = pts[y].to_numpy(dtype=float)
    # best y among all points before this one (smaller x, or same x and smaller y)
    before = np.concatenate([[np.inf], np.minimum.accumulate(ys)[:-1]]) if len(ys) else ys
    return pts[ys < before]


def pareto_front(df: pd.DataFrame, x: str, y: str, by: str | None = None) -> pd.DataFrame:
    """Rows of ``df`` not dominated when minimising both ``x`` and ``y``.

    Rows with a missing ``x`` or ``y`` are ignored. Ties: of rows with the same ``x``
    only the lowest ``y`` can survive; of exact duplicates the first is kept.

    Args:
        df: any frame with columns ``x`` and ``y`` (and ``by``).
        x, y: the two columns to minimise (e.g. ``flops_per_example``, ``val_logloss``).
        by: optional column: one front per group (e.g. ``block``), concatenated in group
            order.

    Returns:
        The surviving rows (all columns, original index) sorted by ``x`` (within each
        group); ``y`` strictly decreases along them.

    Example::

        pareto_front(trials, "flops_per_example", "val_logloss", by="block")
    """
    _check(df, [x, y] + ([by] if by else []))
    if by is None:
        return _front(df, x, y)
    parts = [_front(g, x, y) for _, g in df.groupby(by, sort=True)]
    return pd.concat(parts) if parts else df.iloc[:0]


def compute_frontier(history: pd.DataFrame, by: str | None = None, x: str = "train_flops",
                     y: str = OBJECTIVE) -> pd.DataFrame:
    """The compute-efficient frontier: ``L*(C) = min{val_logloss : train_flops <= C}``
    over every report of every trial (optionally per ``by`` group).

    Each report is a point (cumulative training FLOPs of its trial, validation loss);
    the frontier is their Pareto front, the corners of the lower envelope that a
    scaling law ``L(C) = E + A·C^(−α)`` is fitted to.

    Args:
        history: one row per report, with ``train_flops`` and ``val_logloss``.
        by: optional grouping column (``block``: one frontier per family).

    Returns:
        The frontier rows sorted by compute, loss strictly decreasing.
    """
    return pareto_front(history, x, y, by)
