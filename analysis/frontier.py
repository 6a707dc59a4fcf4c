"""Pareto frontiers: the trials no other trial beats on both cost and loss."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["compute_frontier", "pareto_front"]


def _front(df: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    pts = df.dropna(subset=[x, y]).sort_values([x, y], kind="mergesort")
    best = np.inf
    keep = []
    for idx, yv in zip(pts.index, pts[y]):
        if yv < best:  # strictly better loss at no smaller cost: non-dominated
            keep.append(idx)
            best = yv
    return pts.loc[keep]


def pareto_front(df: pd.DataFrame, x: str, y: str, by: str | None = None) -> pd.DataFrame:
    """Rows of ``df`` not dominated in (minimise ``x``, minimise ``y``).

    A point is dominated when another has ``x' <= x`` and ``y' <= y`` with one strict;
    of exact duplicates one is kept. With ``by``, one front per group.
    Returns the front sorted by ``x``.
    """
    if by is None:
        return _front(df, x, y)
    parts = [_front(g, x, y) for _, g in df.groupby(by, sort=True)]
    return pd.concat(parts) if parts else df.iloc[:0]


def compute_frontier(history: pd.DataFrame, by: str | None = None,
                     x: str = "train_flops", y: str = "val_logloss") -> pd.DataFrame:
    """The compute-efficient frontier: the lowest loss reached at compute ``<= C``, over
    every report of every trial (the lower envelope used for ``L(C)`` fits)."""
    return pareto_front(history, x, y, by)
