"""Scaling-law fits with bootstrap intervals and an honest status.

* :func:`fit_power_law`: ``L(C) = E + A·C^(−α)`` on a compute-efficient frontier;
* :func:`fit_joint`: ``L(N, D) = E + A·N^(−α) + B·D^(−β)``, with N the model size
  (forward FLOPs per example) and D the examples seen, and
  :meth:`JointFit.compute_optimal`: the ``(N*, D*)`` that minimise ``L`` for a training
  budget ``C = 3·N·D`` under an optional serving cap ``N <= max_n``.

How the fits are made (variable projection): for fixed exponents the law is linear in
``(E, A[, B])``, so the least-squares coefficients under the physical constraints
``0 <= E <= min(L)``, ``A, B >= 0`` are solved exactly (a box-constrained quadratic in 2
or 3 unknowns, every active set enumerated). Only the exponents are searched: a grid over
``α, β ∈ [ALPHA_MIN, ALPHA_MAX] = [1e-3, 2]`` (log spaced), then zoomed around the best
cell. No starting point is guessed, no local minimum is taken for the answer, and the
sizes are scaled by their geometric mean so ``C^(−α)`` stays O(1) at any scale.

Intervals are 95% percentile bootstraps (points resampled; with ``groups``, whole
groups, e.g. one trial's reports, which are correlated).

Fits never raise on bad data. ``status`` is

* ``converged``: an interior optimum;
* ``hit_bound``: an optimum with a parameter at a bound (``E = 0``, ``E = min L``,
  ``A = 0``, or an exponent at 1e-3 or 2): the data do not pin that parameter down;
* ``too_few_points``: fewer than 4 (power law) or 6 (joint) usable points;
* ``failed``: nothing to fit (constant loss), a law no better than a constant
  (F-test p > 0.05), or a numerical failure; parameters, where shown, are not to be used;

with a one-line ``message``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import fdtrc

from analysis.runs import AnalysisError

__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "MIN_POINTS_JOINT",
    "MIN_POINTS_POWER",
    "FitStatus",
    "JointFit",
    "PowerLawFit",
    "fit_joint",
    "fit_power_law",
]

FitStatus = Literal["converged", "hit_bound", "too_few_points", "failed"]
MIN_POINTS_POWER = 4
MIN_POINTS_JOINT = 6
ALPHA_MIN, ALPHA_MAX = 1e-3, 2.0
SIGNIFICANCE = 0.05  # F-test level below which a law must beat a constant
_GRID_1D, _GRID_2D, _ZOOM_1D, _ZOOM_2D, _ZOOM_STEPS = 240, 24, 21, 11, 5
_MIN_BOOT = 20  # successful resamples needed to report an interval
_NAN = float("nan")


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class PowerLawFit:
    """``L(C) = E + A·C^(−α)``.

    ``ci[name] = (lo, hi)``: 95% percentile bootstrap interval of ``E``, ``A``,
    ``alpha`` (empty when fewer than 20 resamples could be fitted); ``r2``: the share of
    the loss variance explained; ``n_boot``: resamples fitted; ``samples``: their
    ``(E, A, alpha)`` rows.

    Example::

        fit = fit_power_law(c, loss)
        if fit.ok:
            fit.predict(1e15)
    """

    status: FitStatus
    message: str
    n_points: int
    E: float = _NAN
    A: float = _NAN
    alpha: float = _NAN
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    r2: float = _NAN
    n_boot: int = 0
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 3)), repr=False,
                                compare=False)

    @property
    def ok(self) -> bool:
        """Whether the fitted parameters can be used (``converged`` or ``hit_bound``)."""
        return self.status in ("converged", "hit_bound")

    def predict(self, C: ArrayLike) -> np.ndarray:
        """``E + A·C^(−α)`` (NaN where the fit has no parameters; check :attr:`ok`)."""
        out: np.ndarray = self.E + self.A * np.power(np.asarray(C, dtype=float), -self.alpha)
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: parameters (None where undefined), intervals, status, message."""
        return {"law": "L(C) = E + A*C^(-alpha)", "status": self.status,
                "message": self.message, "n_points": self.n_points, "E": _clean(self.E),
                "A": _clean(self.A), "alpha": _clean(self.alpha), "r2": _clean(self.r2),
                "ci95": {k: list(v) for k, v in self.ci.items()}, "n_boot": self.n_boot}


@dataclass(frozen=True)
class JointFit:
    """``L(N, D) = E + A·N^(−α) + B·D^(−β)`` (N: forward FLOPs per example, D: examples).

    Fields as in :class:`PowerLawFit`, with ``B`` and ``beta``; ``samples`` rows are
    ``(E, A, alpha, B, beta)``.
    """

    status: FitStatus
    message: str
    n_points: int
    E: float = _NAN
    A: float = _NAN
    alpha: float = _NAN
    B: float = _NAN
    beta: float = _NAN
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    r2: float = _NAN
    n_boot: int = 0
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 5)), repr=False,
                                compare=False)

    @property
    def ok(self) -> bool:
        """Whether the fitted parameters can be used (``converged`` or ``hit_bound``)."""
        return self.status in ("converged", "hit_bound")

    def predict(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:
        """``E + A·N^(−α) + B·D^(−β)`` (broadcast over ``N`` and ``D``)."""
        n, d = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * n ** (-self.alpha) + self.B * d ** (-self.beta)

    def compute_optimal(self, budget_flops: float, max_n: float | None = None,
                        min_n: float = 1.0) -> tuple[float, float, float]:
        """``(N*, D*, L*)``: the model size and examples minimising ``L(N, D)`` subject to
        the training compute ``3·N·D = budget_flops``, ``min_n <= N <= max_n`` and
        ``D >= 1``.

        Along the budget, ``L(N) = E + A·N^(−α) + B·(C/3N)^(−β)``: a dense search over
        ``log N`` (4001 points), then a bounded 1-D refinement in the best cell.

        Raises :class:`AnalysisError` when the fit is not usable or no ``N`` fits.
        """
        if not self.ok:
            raise AnalysisError(f"joint fit is {self.status} ({self.message}); no optimum")
        return _optimum(self.E, self.A, self.alpha, self.B, self.beta, budget_flops, max_n,
                        min_n)

    def compute_optimal_ci(self, budget_flops: float, max_n: float | None = None,
                           min_n: float = 1.0) -> dict[str, tuple[float, float]]:
        """95% bootstrap intervals of ``N*``, ``D*``, ``L*`` (empty without samples)."""
        if not self.ok or len(self.samples) < _MIN_BOOT:
            return {}
        opt = np.array([_optimum(e, a, al, b, be, budget_flops, max_n, min_n)
                        for e, a, al, b, be in self.samples])
        return {k: _interval(opt[:, j]) for j, k in enumerate(("N", "D", "L"))}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: parameters (None where undefined), intervals, status, message."""
        return {"law": "L(N, D) = E + A*N^(-alpha) + B*D^(-beta)", "status": self.status,
                "message": self.message, "n_points": self.n_points, "E": _clean(self.E),
                "A": _clean(self.A), "alpha": _clean(self.alpha), "B": _clean(self.B),
                "beta": _clean(self.beta), "r2": _clean(self.r2),
                "ci95": {k: list(v) for k, v in self.ci.items()}, "n_boot": self.n_boot}


def _optimum(E: float, A: float, alpha: float, B: float, beta: float, budget: float,
             max_n: float | None, min_n: float) -> tuple[float, float, float]:
    if not budget > 0:
        raise AnalysisError(f"budget_flops must be > 0, got {budget:.3g}")
    hi = budget / 3.0 if max_n is None else min(max_n, budget / 3.0)
    if hi < min_n:
        raise AnalysisError(f"no model size fits: N <= {hi:.3g} (cap {max_n}, budget "
                            f"{budget:.3g}) is below the smallest size {min_n:.3g}")
    lo_log, hi_log = math.log(min_n), math.log(hi)

    def loss(logn: np.ndarray | float) -> np.ndarray:
        n = np.exp(logn)
        return E + A * n ** (-alpha) + B * (budget / (3.0 * n)) ** (-beta)

    grid = np.linspace(lo_log, hi_log, 4001)
    vals = loss(grid)
    i = int(np.argmin(vals))
    best_log, best = float(grid[i]), float(vals[i])
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    if b > a:
        res = minimize_scalar(lambda t: float(loss(t)), bounds=(a, b), method="bounded",
                              options={"xatol": 1e-10})
        if float(res.fun) < best:
            best_log, best = float(res.x), float(res.fun)
    n = math.exp(best_log)
    return n, budget / (3.0 * n), best


def _interval(v: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))


# ---- variable projection ------------------------------------------------------------


def _box_lsq(G: np.ndarray, b: np.ndarray, yy: np.ndarray, e_max: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ``min θᵀGθ − 2bᵀθ + yy`` over ``0 <= θ0 <= e_max``, ``θk >= 0`` (k >= 1),
    for a stack of K problems (``G``: (K, p, p), ``b``: (K, p), ``yy``, ``e_max``: (K,)).

    Every active set (θ0 free / at 0 / at e_max; θk free / at 0) is solved and the
    feasible one of least cost kept: the global optimum of each convex problem.
    Returns ``θ`` (K, p), the cost (K,), and which coefficients sit at a bound (K, p).
    """
    k, p = b.shape
    best_cost = np.full(k, np.inf)
    best_theta = np.full((k, p), np.nan)
    best_active = np.zeros((k, p), dtype=bool)
    for combo in itertools.product(("free", "lo", "hi"), *[("free", "lo")] * (p - 1)):
        theta = np.zeros((k, p))
        free = [j for j, c in enumerate(combo) if c == "free"]
        fixed = [j for j, c in enumerate(combo) if c != "free"]
        if combo[0] == "hi":
            theta[:, 0] = e_max
        if free:
            gff = G[:, free][:, :, free]
            rhs = b[:, free] - np.einsum("kij,kj->ki", G[:, free][:, :, fixed], theta[:, fixed])
            theta[:, free] = _solve_small(gff, rhs)
        tol = 1e-9 * (1.0 + np.abs(theta))
        feasible = np.all(np.isfinite(theta), axis=1) & np.all(theta >= -tol, axis=1) & (theta[:, 0] <= e_max + tol[:, 0])
        theta = np.maximum(theta, 0.0)
        theta[:, 0] = np.minimum(theta[:, 0], e_max)
        with np.errstate(invalid="ignore", over="ignore"):  # infeasible rows may be inf
            cost = ((theta[:, :, None] * G * theta[:, None, :]).sum(axis=(1, 2))
                    - 2 * (b * theta).sum(axis=1) + yy)
        better = feasible & (cost < best_cost)
        best_cost[better] = cost[better]
        best_theta[better] = theta[better]
        best_active[better] = np.array([c != "free" for c in combo])
    return best_theta, np.maximum(best_cost, 0.0), best_active


def _solve_small(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``M x = v`` for a stack of 1×1, 2×2 or 3×3 systems by Cramer's rule (LAPACK per
    tiny matrix is far slower); a singular system gives non-finite ``x`` (infeasible)."""
    f = M.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if f == 1:
            ratio: np.ndarray = v / M[:, 0]
            return ratio
        if f == 2:
            det = M[:, 0, 0] * M[:, 1, 1] - M[:, 0, 1] * M[:, 1, 0]
            x0 = (v[:, 0] * M[:, 1, 1] - M[:, 0, 1] * v[:, 1]) / det
            x1 = (M[:, 0, 0] * v[:, 1] - M[:, 1, 0] * v[:, 0]) / det
            return np.stack([x0, x1], axis=1)
        det = np.linalg.det(M)
        out = np.empty_like(v)
        for j in range(3):
            mj = M.copy()
            mj[:, :, j] = v
            out[:, j] = np.linalg.det(mj) / det
        return out


@dataclass(frozen=True)
class _Solution:
    """Per replicate r: coefficients (E, A[, B]) in scaled units, exponents, SSE, and
    which coefficients sit at a bound."""

    coef: np.ndarray  # (R, q + 1)
    exps: np.ndarray  # (R, q)
    sse: np.ndarray  # (R,)
    active: np.ndarray  # (R, q + 1)


def _solve(logx: list[np.ndarray], y: np.ndarray, W: np.ndarray) -> _Solution:
    """Weighted least squares of ``y ≈ E + Σ_k A_k·exp(−α_k·logx_k)`` for each row of
    weights ``W`` (R, m), over the exponents by a grid then zooms (1 or 2 exponents)."""
    q, r = len(logx), W.shape[0]
    n_grid = _GRID_1D if q == 1 else _GRID_2D
    # axes[k]: (R, n) candidate exponents per replicate
    axes = [np.broadcast_to(np.geomspace(ALPHA_MIN, ALPHA_MAX, n_grid), (r, n_grid))] * q
    e_max = np.where(W > 0, y, np.inf).min(axis=1)  # (R,)
    sw, swy, swyy = W.sum(1), W @ y, W @ (y * y)
    Wy = W * y
    best: _Solution | None = None
    for step in range(_ZOOM_STEPS + 1):
        feats = [np.exp(-ax[:, :, None] * lx) for ax, lx in zip(axes, logx)]  # (R, n, m)
        shape = tuple(ax.shape[1] for ax in axes)
        kk = int(np.prod(shape))
        G = np.empty((r, *shape, q + 1, q + 1))
        b = np.empty((r, *shape, q + 1))
        G[..., 0, 0] = sw.reshape((r,) + (1,) * q)
        b[..., 0] = swy.reshape((r,) + (1,) * q)
        for a, f in enumerate(feats, start=1):
            view: list[slice | None] = [None] * q
            view[a - 1] = slice(None)
            sl = (slice(None), *view)
            G[..., 0, a] = G[..., a, 0] = np.einsum("rnm,rm->rn", f, W)[sl]
            G[..., a, a] = np.einsum("rnm,rm->rn", f * f, W)[sl]
            b[..., a] = np.einsum("rnm,rm->rn", f, Wy)[sl]
        if q == 2:
            G[..., 1, 2] = G[..., 2, 1] = np.matmul(feats[0] * W[:, None, :],
                                                    feats[1].transpose(0, 2, 1))
        theta, cost, active = _box_lsq(G.reshape(r * kk, q + 1, q + 1),
                                       b.reshape(r * kk, q + 1),
                                       np.repeat(swyy, kk), np.repeat(e_max, kk))
        cost = cost.reshape(r, kk)
        i = np.argmin(cost, axis=1)  # (R,)
        flat = np.arange(r) * kk + i
        cells = np.unravel_index(i, shape)
        exps = np.stack([ax[np.arange(r), c] for ax, c in zip(axes, cells)], axis=1)
        cand = _Solution(theta[flat], exps, cost[np.arange(r), i], active[flat])
        if best is None:
            best = cand
        else:
            better = cand.sse <= best.sse
            best = _Solution(*(np.where(better.reshape((r,) + (1,) * (x.ndim - 1)), x, y_)
                               for x, y_ in zip((cand.coef, cand.exps, cand.sse, cand.active),
                                                (best.coef, best.exps, best.sse, best.active))))
        if step == _ZOOM_STEPS:
            break
        new_axes = []
        for ax, c in zip(axes, cells):
            n = ax.shape[1]
            lo = ax[np.arange(r), np.maximum(c - 1, 0)]
            hi = ax[np.arange(r), np.minimum(c + 1, n - 1)]
            zoom = _ZOOM_1D if q == 1 else _ZOOM_2D
            new_axes.append(lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, zoom))
        axes = new_axes
    assert best is not None
    return best


def _fit_all(logx: list[np.ndarray], y: np.ndarray, W: np.ndarray) -> _Solution:
    """:func:`_solve` over the rows of ``W`` in chunks (bounded memory)."""
    per_row = max(_GRID_1D if len(logx) == 1 else _GRID_2D**2, 1) * max(len(y), 1)
    chunk = max(1, int(4e6 // per_row))
    parts = [_solve(logx, y, W[i:i + chunk]) for i in range(0, len(W), chunk)]
    return _Solution(*(np.concatenate([getattr(p, f) for p in parts])
                       for f in ("coef", "exps", "sse", "active")))


def _bound_notes(coef: np.ndarray, exps: np.ndarray, active: np.ndarray,
                 coef_names: list[str], exp_names: list[str]) -> list[str]:
    notes = [f"{name}={val:.3g}" for name, val, act in zip(coef_names, coef, active) if act]
    notes += [f"{name}={v:.3g}" for name, v in zip(exp_names, exps)
              if v <= ALPHA_MIN * (1 + 1e-6) or v >= ALPHA_MAX * (1 - 1e-6)]
    return notes


def _significance(sse: float, y: np.ndarray, n_params: int) -> tuple[float, float]:
    """``(r2, p)``: share of variance explained, and the F-test p-value of the law
    against a constant."""
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else _NAN
    dof = len(y) - n_params
    if dof <= 0 or sst <= 0:
        return r2, _NAN
    if sse <= 1e-14 * sst:
        return r2, 0.0
    f = ((sst - sse) / (n_params - 1)) / (sse / dof)
    return r2, float(fdtrc(n_params - 1, dof, f))


def _resample(rng: np.random.Generator, groups: np.ndarray | None, m: int) -> np.ndarray:
    """Bootstrap weights (counts per point): points, or whole groups, with replacement."""
    if groups is None:
        return np.bincount(rng.integers(0, m, m), minlength=m).astype(float)
    _, inv = np.unique(groups, return_inverse=True)
    k = int(inv.max()) + 1
    counts = np.bincount(rng.integers(0, k, k), minlength=k)
    return counts[inv].astype(float)


def _prepare(arrays: list[ArrayLike], groups: ArrayLike | None
             ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Finite points with positive sizes (all arrays but the last, the loss)."""
    cols = [np.asarray(a, dtype=float).ravel() for a in arrays]
    if len({len(c) for c in cols}) != 1:
        raise AnalysisError(f"inputs differ in length: {[len(c) for c in cols]}")
    keep = np.all([np.isfinite(c) for c in cols], axis=0)
    for c in cols[:-1]:
        keep &= c > 0
    g = None if groups is None else np.asarray(groups).ravel()
    if g is not None and len(g) != len(cols[0]):
        raise AnalysisError(f"groups has {len(g)} entries for {len(cols[0])} points")
    return [c[keep] for c in cols], (None if g is None else g[keep])


@dataclass(frozen=True)
class _Outcome:
    status: FitStatus
    message: str
    params: tuple[float, ...]  # E, A, alpha[, B, beta] in raw units
    r2: float
    samples: np.ndarray  # bootstrap rows of params


def _fit_law(sizes: list[np.ndarray], y: np.ndarray, groups: np.ndarray | None,
             n_boot: int, seed: int, coef_names: list[str], exp_names: list[str],
             min_distinct: int) -> _Outcome:
    """``y ≈ E + Σ_k A_k·size_k^(−α_k)``: the fit, its status, and bootstrap samples."""
    q, m = len(sizes), len(y)
    n_params = 1 + 2 * q
    nan = tuple([_NAN] * n_params)
    if np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
        return _Outcome("failed", f"loss is constant ({y[0]:.6g}): no law to fit", nan, _NAN,
                        np.empty((0, n_params)))
    refs = [float(np.exp(np.mean(np.log(x)))) for x in sizes]  # scale to O(1)
    logx = [np.log(x / r) for x, r in zip(sizes, refs)]
    rng = np.random.default_rng(seed)
    weights = [np.ones(m)]
    for _ in range(n_boot):
        w = _resample(rng, groups, m)
        if all(len(np.unique(x[w > 0])) >= min_distinct for x in sizes):
            weights.append(w)
    try:
        with np.errstate(over="ignore", under="ignore"):
            sol = _fit_all(logx, y, np.array(weights))
    except (np.linalg.LinAlgError, FloatingPointError, ValueError) as err:
        return _Outcome("failed", f"numerical failure: {err}", nan, _NAN,
                        np.empty((0, n_params)))
    # raw units: A_k·(size/ref)^(−α) = (A_k·ref^α)·size^(−α); order E, A, alpha, B, beta
    rows = [sol.coef[:, 0]]
    for k in range(q):
        rows += [sol.coef[:, k + 1] * refs[k] ** sol.exps[:, k], sol.exps[:, k]]
    params = np.stack(rows, axis=1)
    ok = np.all(np.isfinite(params), axis=1)
    main = tuple(float(v) for v in params[0])
    samples = params[1:][ok[1:]]
    if not ok[0]:
        return _Outcome("failed", "no finite least-squares solution", nan, _NAN, samples)
    r2, p = _significance(float(sol.sse[0]), y, n_params)
    if math.isfinite(p) and p > SIGNIFICANCE:
        return _Outcome("failed", f"the law explains no more than a constant (F-test "
                        f"p={p:.2g} > {SIGNIFICANCE}): no scaling trend in these points",
                        main, r2, samples)
    notes = _bound_notes(params[0, [0] + [1 + 2 * k for k in range(q)]], sol.exps[0],
                         sol.active[0], coef_names, exp_names)
    if notes:
        return _Outcome("hit_bound", "optimum at a bound (" + ", ".join(notes)
                        + "): the data do not pin it down", main, r2, samples)
    return _Outcome("converged", f"converged (R²={r2:.4f})", main, r2, samples)


def _cis(samples: np.ndarray, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    if len(samples) < _MIN_BOOT:
        return {}
    return {k: _interval(samples[:, j]) for j, k in enumerate(names)}


def fit_power_law(C: ArrayLike, L: ArrayLike, n_boot: int = 200, seed: int = 0,
                  groups: ArrayLike | None = None) -> PowerLawFit:
    """Fit ``L(C) = E + A·C^(−α)`` by least squares, with ``0 <= E <= min L``,
    ``A >= 0``, ``α ∈ [1e-3, 2]``, and 95% percentile bootstrap intervals.

    Args:
        C: compute (or any positive size), shape (m,); points with a non-finite value or
            ``C <= 0`` are dropped.
        L: loss, shape (m,).
        n_boot: bootstrap resamples (0: no intervals).
        seed: seed of the resampling.
        groups: optional labels (m,): resample whole groups instead of points.

    Needs >= 4 points at >= 3 distinct ``C`` (else ``too_few_points``).

    Example::

        c = np.logspace(9, 12, 20)
        fit = fit_power_law(c, 0.4 + 3 * c ** -0.1)
        fit.alpha, fit.ci["alpha"], fit.predict(1e15)
    """
    (c, y), g = _prepare([C, L], groups)
    m, distinct = len(c), len(np.unique(c))
    if m < MIN_POINTS_POWER or distinct < 3:
        return PowerLawFit("too_few_points", f"{m} usable points at {distinct} distinct C; "
                           f"a power law needs >= {MIN_POINTS_POWER} points at >= 3 distinct C",
                           m)
    out = _fit_law([c], y, g, n_boot, seed, ["E", "A"], ["alpha"], 3)
    e, a, alpha = out.params
    return PowerLawFit(out.status, out.message, m, e, a, alpha,
                       ci=_cis(out.samples, ("E", "A", "alpha")), r2=out.r2,
                       n_boot=len(out.samples), samples=out.samples)


def fit_joint(N: ArrayLike, D: ArrayLike, L: ArrayLike, n_boot: int = 100, seed: int = 0,
              groups: ArrayLike | None = None) -> JointFit:
    """Fit ``L(N, D) = E + A·N^(−α) + B·D^(−β)`` by least squares, with
    ``0 <= E <= min L``, ``A, B >= 0``, ``α, β ∈ [1e-3, 2]``, and 95% percentile
    bootstrap intervals.

    Args:
        N: model size per point (forward FLOPs per example), shape (m,).
        D: examples seen per point, shape (m,).
        L: loss, shape (m,).
        n_boot: bootstrap resamples (0: no intervals).
        seed: seed of the resampling.
        groups: optional labels (m,), e.g. the run id of each report: resample whole
            trials, since one trial's reports are correlated.

    Needs >= 6 points with >= 2 distinct ``N`` and ``D`` (else ``too_few_points``).

    Example::

        fit = fit_joint(h.flops_per_example, h.examples_seen, h.val_logloss,
                        groups=h.run_id)
        n_opt, d_opt, l_opt = fit.compute_optimal(1e16, max_n=2e6)
    """
    (n, d, y), g = _prepare([N, D, L], groups)
    m, un, ud = len(n), len(np.unique(n)), len(np.unique(d))
    if m < MIN_POINTS_JOINT or un < 2 or ud < 2:
        return JointFit("too_few_points", f"{m} usable points at {un} sizes and {ud} data "
                        f"amounts; the joint fit needs >= {MIN_POINTS_JOINT} points with >= 2 "
                        f"distinct N and >= 2 distinct D", m)
    out = _fit_law([n, d], y, g, n_boot, seed, ["E", "A", "B"], ["alpha", "beta"], 2)
    e, a, alpha, b, beta = out.params
    return JointFit(out.status, out.message, m, e, a, alpha, b, beta,
                    ci=_cis(out.samples, ("E", "A", "alpha", "B", "beta")), r2=out.r2,
                    n_boot=len(out.samples), samples=out.samples)
