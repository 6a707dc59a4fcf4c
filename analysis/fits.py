"""Scaling-law fits with bootstrap intervals and an honest status.

* ``L(C) = E + A·C^(−α)`` on a compute-efficient frontier (:func:`fit_power_law`);
* ``L(N, D) = E + A·N^(−α) + B·D^(−β)`` (:func:`fit_joint`), with N the model size
  (forward FLOPs per example, or parameters) and D the examples seen, and the
  compute-optimal ``(N*, D*)`` for a training budget ``C = 3·N·D`` with an optional
  serving cap ``N <= max_n``.

Fits never raise on bad data: they return a result whose ``status`` is ``converged``,
``hit_bound`` (a parameter sits at its bound: the data do not pin it down),
``too_few_points`` or ``failed``, with a one-line ``message``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import least_squares

__all__ = ["FitStatus", "JointFit", "PowerLawFit", "fit_joint", "fit_power_law"]

FitStatus = Literal["converged", "hit_bound", "too_few_points", "failed"]
MIN_POINTS_POWER = 4
MIN_POINTS_JOINT = 6
ALPHA_BOUNDS = (1e-3, 2.0)


@dataclass(frozen=True)
class PowerLawFit:
    """``L(C) = E + A·C^(−α)`` with 95% bootstrap intervals ``ci[name] = (lo, hi)``."""

    status: FitStatus
    message: str
    n_points: int
    E: float = float("nan")
    A: float = float("nan")
    alpha: float = float("nan")
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def predict(self, c: np.ndarray | float) -> np.ndarray:
        return self.E + self.A * np.power(np.asarray(c, dtype=float), -self.alpha)

    @property
    def ok(self) -> bool:
        return self.status in ("converged", "hit_bound")


@dataclass(frozen=True)
class JointFit:
    """``L(N, D) = E + A·N^(−α) + B·D^(−β)`` with 95% bootstrap intervals."""

    status: FitStatus
    message: str
    n_points: int
    E: float = float("nan")
    A: float = float("nan")
    alpha: float = float("nan")
    B: float = float("nan")
    beta: float = float("nan")
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("converged", "hit_bound")

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n ** (-self.alpha) + self.B * d ** (-self.beta)

    def compute_optimal(
        self, budget_flops: float, max_n: float | None = None, min_n: float = 1.0
    ) -> tuple[float, float, float]:
        """``(N*, D*, L*)`` minimising ``L(N, D)`` subject to ``3·N·D = budget_flops``
        and ``N <= max_n``: a dense search over ``log N`` (closed forms break under
        the cap)."""
        hi = budget_flops / 3.0 if max_n is None else min(max_n, budget_flops / 3.0)
        if hi < min_n:
            raise ValueError(f"no model size fits: cap {max_n} below {min_n}")
        n = np.logspace(np.log10(min_n), np.log10(hi), 4001)
        d = budget_flops / (3.0 * n)
        loss = self.predict(n, d)
        i = int(np.nanargmin(loss))
        return float(n[i]), float(d[i]), float(loss[i])


def _status_at_bounds(
    x: np.ndarray, lo: np.ndarray, hi: np.ndarray, names: list[str]
) -> tuple[FitStatus, str]:
    span = hi - lo
    span = np.where(np.isfinite(span), span, 1.0)
    at = [
        n
        for n, v, a, b, s in zip(names, x, lo, hi, span)
        if (np.isfinite(a) and v - a < 1e-6 * s + 1e-12)
        or (np.isfinite(b) and b - v < 1e-6 * s + 1e-12)
    ]
    if at:
        return "hit_bound", f"converged with {', '.join(at)} at a bound"
    return "converged", "converged"


def _fit_power(
    logc: np.ndarray, y: np.ndarray, start: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """Least squares for (E, log A, α) with α in ALPHA_BOUNDS and 0 <= E <= min(y).

    Multi-start from a small grid, or from ``start`` alone (bootstrap refits)."""
    lo = np.array([0.0, -np.inf, ALPHA_BOUNDS[0]])
    hi = np.array([max(float(y.min()), 1e-12), np.inf, ALPHA_BOUNDS[1]])
    c0 = float(np.median(logc))
    starts = []
    for alpha0 in (0.05, 0.2, 0.6):
        for e_frac in (0.0, 0.5, 0.9):
            e0 = e_frac * hi[0]
            gap = max(float(np.mean(y)) - e0, 1e-6)
            starts.append(np.array([e0, np.log(gap) + alpha0 * c0, alpha0]))
    if start is not None:
        starts = [start]
    best, best_cost = None, np.inf
    for x0 in starts:
        x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)

        def resid(p: np.ndarray) -> np.ndarray:
            return p[0] + np.exp(p[1] - p[2] * logc) - y

        res = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac", max_nfev=2000)
        if res.success and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return (best if best is not None else np.full(3, np.nan)), best is not None


def fit_power_law(c: np.ndarray, loss: np.ndarray, n_boot: int = 200, seed: int = 0) -> PowerLawFit:
    """Fit ``L(C) = E + A·C^(−α)``; bootstrap (resampling points) 95% intervals."""
    c, loss = np.asarray(c, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(c) & np.isfinite(loss) & (c > 0)
    c, loss = c[keep], loss[keep]
    n = len(c)
    if n < MIN_POINTS_POWER or len(np.unique(c)) < 3:
        return PowerLawFit(
            "too_few_points",
            f"{n} usable points; a power law needs "
            f">= {MIN_POINTS_POWER} at >= 3 distinct compute values",
            n,
        )
    # fit in units of the smallest C, so log C is O(1..10) whatever the scale
    scale = float(c.min())
    logc = np.log(c / scale)
    x, ok = _fit_power(logc, loss)
    if not ok or not np.all(np.isfinite(x)):
        return PowerLawFit("failed", "least squares did not converge", n)
    lo = np.array([0.0, -np.inf, ALPHA_BOUNDS[0]])
    hi = np.array([max(float(loss.min()), 1e-12), np.inf, ALPHA_BOUNDS[1]])
    status, msg = _status_at_bounds(x, lo, hi, ["E", "A", "alpha"])
    e, log_a, alpha = x
    a = float(np.exp(log_a) * scale**alpha)  # back to raw C units
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if len(np.unique(c[idx])) < 3:
            continue
        xb, okb = _fit_power(logc[idx], loss[idx], start=x)
        if okb:
            boots.append((xb[0], float(np.exp(xb[1]) * scale ** xb[2]), xb[2]))
    ci = {}
    if len(boots) >= 10:
        arr = np.array(boots)
        for j, name in enumerate(("E", "A", "alpha")):
            ci[name] = (float(np.percentile(arr[:, j], 2.5)), float(np.percentile(arr[:, j], 97.5)))
    return PowerLawFit(status, msg, n, float(e), a, float(alpha), ci)


def _fit_joint_once(
    logn: np.ndarray, logd: np.ndarray, y: np.ndarray, start: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    lo = np.array([0.0, -np.inf, ALPHA_BOUNDS[0], -np.inf, ALPHA_BOUNDS[0]])
    hi = np.array([max(float(y.min()), 1e-12), np.inf, ALPHA_BOUNDS[1], np.inf, ALPHA_BOUNDS[1]])
    starts = []
    for a0 in (0.1, 0.4):
        for b0 in (0.1, 0.4):
            for e_frac in (0.0, 0.8):
                e0 = e_frac * hi[0]
                gap = max(float(np.mean(y)) - e0, 1e-6) / 2
                starts.append(np.array([e0, np.log(gap), a0, np.log(gap), b0]))
    if start is not None:
        starts = [start]
    best, best_cost = None, np.inf
    for x0 in starts:
        x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)

        def resid(p: np.ndarray) -> np.ndarray:
            return p[0] + np.exp(p[1] - p[2] * logn) + np.exp(p[3] - p[4] * logd) - y

        res = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac", max_nfev=4000)
        if res.success and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return (best if best is not None else np.full(5, np.nan)), best is not None


def fit_joint(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, n_boot: int = 100, seed: int = 0
) -> JointFit:
    """Fit ``L(N, D) = E + A·N^(−α) + B·D^(−β)`` with bootstrap 95% intervals."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    keep = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (n > 0) & (d > 0)
    n, d, loss = n[keep], d[keep], loss[keep]
    m = len(n)
    if m < MIN_POINTS_JOINT or len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        return JointFit(
            "too_few_points",
            f"{m} usable points; the joint fit needs >= "
            f"{MIN_POINTS_JOINT} with >= 2 distinct sizes and data amounts",
            m,
        )
    sn, sd = float(n.min()), float(d.min())
    logn, logd = np.log(n / sn), np.log(d / sd)
    x, ok = _fit_joint_once(logn, logd, loss)
    if not ok or not np.all(np.isfinite(x)):
        return JointFit("failed", "least squares did not converge", m)
    lo = np.array([0.0, -np.inf, ALPHA_BOUNDS[0], -np.inf, ALPHA_BOUNDS[0]])
    hi = np.array([max(float(loss.min()), 1e-12), np.inf, ALPHA_BOUNDS[1], np.inf, ALPHA_BOUNDS[1]])
    status, msg = _status_at_bounds(x, lo, hi, ["E", "A", "alpha", "B", "beta"])

    def raw(p: np.ndarray) -> tuple[float, float, float, float, float]:
        return (
            float(p[0]),
            float(np.exp(p[1]) * sn ** p[2]),
            float(p[2]),
            float(np.exp(p[3]) * sd ** p[4]),
            float(p[4]),
        )

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, m, m)
        xb, okb = _fit_joint_once(logn[idx], logd[idx], loss[idx], start=x)
        if okb:
            boots.append(raw(xb))
    ci = {}
    if len(boots) >= 10:
        arr = np.array(boots)
        for j, name in enumerate(("E", "A", "alpha", "B", "beta")):
            ci[name] = (float(np.percentile(arr[:, j], 2.5)), float(np.percentile(arr[:, j], 97.5)))
    return JointFit(status, msg, m, *raw(x), ci=ci)
