"""isoFLOP fits (Chinchilla approach 2): profiles, ``N*(C)``, ``L*(C)``, and a pick.

Input: one row per finished study point: ``family``, ``budget`` (training FLOPs ``C``),
``N`` (forward FLOPs per example), ``D`` (examples seen, ``C = 3·N·D``) and ``loss``
(validation log loss); with a learning-rate grid, several rows per ``(family, budget,
N)``: the lowest loss is kept (the searcher's per-size tuning).

* **Profile** (one family at one budget): ``L = c0 + c1·x + c2·x²`` with ``x = ln N``;
  its minimum is ``N* = exp(−c1 / 2c2)``, ``L* = L(N*)``. ``converged`` needs ``c2 > 0``
  and ``N*`` inside the sizes measured; a minimum at or beyond the smallest or largest
  size is ``hit_bound`` (the data do not pin it down) and is left out of the laws.
* **Laws across budgets** (per family): ``N*(C) = G·C^a`` and ``L*(C) = K·C^(−b)``,
  least squares in log–log; ``D*(C) = C / (3·N*(C))``. The ``N*`` line is weighted by
  each profile's inverse variance of ``ln N*`` (:func:`n_star_weights`): a minimum near
  the edge of its sizes is known only to within a factor 20 and, with equal weights,
  steepened ``a`` enough that ``N*`` lost to ``N*/2`` at a 10× verification
  (bench/RESULTS.md, synthetic_small5). ``L*`` stays unweighted: its intervals are
  narrow at every budget (at most ±0.012 nats, ~2% of the loss) where ``N*``'s reach
  ×20. ``b`` is the pure power law exponent the seed papers report
  (RankMixer/UniMixer); it has no floor.
* **The floored law** ``L*(C) = E + K_f·C^(−b_f)`` (:func:`fit_floor`), the form the
  joint law implies for the minima (``b_f = αβ/(α+β)``): with 4+ converged budgets (one
  degree of freedom beyond its three parameters) and ``E`` inside ``(0, min L*)``
  (``converged``), it extrapolates the loss where the joint law is not usable; a floor
  pinned at 0 is the pure power law and is not used. The pure power law has no floor:
  on the synthetic teacher it predicted 0.4453 at 1.6e12, *below* the data's Bayes loss
  (0.4475), and the run measured 0.4535 (bench/RESULTS.md, synthetic_small5).
* **Loss predictions** use the joint law ``L(N, D) = E + A·N^(−α) + B·D^(−β)``
  (:func:`analysis.fits.fit_joint`) fitted on every point of the family: it has the
  irreducible ``E`` a pure power law lacks (on a planted law with ``E`` = 70% of the loss
  the pure power law misses a 10× extrapolation by 0.02 nats, the joint law by 0.002).
  Where the joint fit is not ``converged`` (it failed, or an optimum sits at a bound),
  ``L*(C) + k·ln²(N/N*)`` (``k`` the mean profile curvature) is used, with the floored
  ``L*(C)`` where it converged and the pure power law otherwise, and the prediction
  says so (``loss_law``: ``joint``, ``floored`` or ``power``).
* **Intervals**: a residual bootstrap of every profile (the parabola's residuals,
  rescaled for its three parameters, resampled and refitted); replicate ``i`` of every
  budget feeds replicate ``i`` of the laws, so intervals carry the correlation. A
  prediction interval for one new run adds a draw of the run-to-run noise (the pooled
  residual standard deviation). 95% percentile intervals.
* **Extrapolation**: a budget more than :data:`MAX_EXTRAPOLATION` × the largest
  studied, below the smallest, or implying more passes over the training data than the
  study measured at sizes ``>= N/2`` (:func:`passes_measured`) is ``extrapolated``:
  numbers are shown as such, not as the answer.

Fits never raise on bad data; each result has a ``status`` (as in
:mod:`analysis.fits`) and a one-line ``message``.

Example::

    fit = analyze_study(points, target_flops=1e13, n_train=800_000)
    print(fit.pick.as_dict())
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from analysis.fits import FitStatus, JointFit, fit_joint

__all__ = [
    "MAX_EXTRAPOLATION",
    "FamilyScaling",
    "IsoProfile",
    "Pick",
    "PickStatus",
    "Prediction",
    "StudyFit",
    "DEAD_NE",
    "analyze_study",
    "dead_points",
    "fit_family",
    "fit_floor",
    "fit_profile",
    "n_star_weights",
    "passes_measured",
    "study_points",
]

MAX_EXTRAPOLATION = 10.0  # target / largest budget studied beyond which we refuse
_MIN_SIZES = 3
_MIN_BOOT = 20
_NAN = float("nan")
PickStatus = Literal["ok", "capped", "extrapolated", "failed"]


def _interval(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if len(v) < _MIN_BOOT:
        return (_NAN, _NAN)
    lo, hi = np.percentile(v, [2.5, 97.5])
    return (float(lo), float(hi))


def _clean(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _ci_dict(ci: Mapping[str, tuple[float, float]]) -> dict[str, list[float | None]]:
    return {k: [_clean(a), _clean(b)] for k, (a, b) in ci.items()}


# --- one profile ---------------------------------------------------------------------

@dataclass(frozen=True)
class IsoProfile:
    """One family at one budget: loss against ``ln N`` as a parabola.

    Attributes:
        family, budget: which profile.
        N, D, L: the points (best over learning rates), sorted by ``N``.
        coef: ``(c0, c1, c2)`` of ``L = c0 + c1·ln N + c2·ln² N``.
        n_star, l_star: the minimum (NaN unless ``c2 > 0``).
        resid_sd: residual standard deviation (``n − 3`` degrees of freedom).
        ci: 95% intervals of ``n_star`` and ``l_star``.
        samples: bootstrap rows ``(ln N*, L*, c2)`` (NaN where a replicate has no minimum).
    """

    family: str
    budget: float
    status: FitStatus
    message: str
    N: tuple[float, ...]
    D: tuple[float, ...]
    L: tuple[float, ...]
    coef: tuple[float, float, float] = (_NAN, _NAN, _NAN)
    n_star: float = _NAN
    l_star: float = _NAN
    resid_sd: float = _NAN
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 3)), repr=False,
                                compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "converged"

    @property
    def curvature(self) -> float:
        """``c2``: loss rise per ``ln²`` of the size ratio to ``N*``."""
        return self.coef[2]

    def curve(self, n: np.ndarray) -> np.ndarray:
        x = np.log(np.asarray(n, dtype=float))
        c0, c1, c2 = self.coef
        return np.asarray(c0 + c1 * x + c2 * x * x)

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "budget_flops": self.budget, "status": self.status,
                "message": self.message, "n_points": len(self.N),
                "N": list(self.N), "D": list(self.D), "loss": list(self.L),
                "n_star": _clean(self.n_star), "l_star": _clean(self.l_star),
                "curvature": _clean(self.curvature), "resid_sd": _clean(self.resid_sd),
                "ci95": _ci_dict(self.ci)}


def _parabola_min(coef: np.ndarray) -> tuple[float, float]:
    c0, c1, c2 = coef
    if not c2 > 0:
        return _NAN, _NAN
    x = -c1 / (2 * c2)
    return float(x), float(c0 + c1 * x + c2 * x * x)


def fit_profile(family: str, budget: float, N: Sequence[float], D: Sequence[float],
                L: Sequence[float], n_boot: int = 400, seed: int = 0) -> IsoProfile:
    """Fit ``L = c0 + c1·ln N + c2·ln² N`` and bootstrap its minimum (module docstring)."""
    order = np.argsort(np.asarray(N, dtype=float))
    n = np.asarray(N, dtype=float)[order]
    d = np.asarray(D, dtype=float)[order]
    y = np.asarray(L, dtype=float)[order]
    keep = np.isfinite(y) & (n > 0)
    n, d, y = n[keep], d[keep], y[keep]
    if len(np.unique(n)) < _MIN_SIZES:
        return IsoProfile(family, float(budget), "too_few_points",
                          f"{len(np.unique(n))} distinct sizes; a profile needs {_MIN_SIZES}",
                          tuple(map(float, n)), tuple(map(float, d)), tuple(map(float, y)))
    x = np.log(n)
    X = np.vander(x, 3, increasing=True)  # (n, 3): 1, x, x²
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    fitted = X @ coef
    resid = y - fitted
    dof = len(y) - 3
    resid_sd = float(math.sqrt(float(resid @ resid) / dof)) if dof > 0 else _NAN
    xs, ls = _parabola_min(coef)
    # residual bootstrap, residuals rescaled for the 3 fitted parameters
    rng = np.random.default_rng(seed)
    scale = math.sqrt(len(y) / dof) if dof > 0 else 1.0
    r = (resid - resid.mean()) * scale
    samples = np.full((n_boot, 3), _NAN)
    if dof > 0 and n_boot > 0:
        draws = rng.integers(0, len(y), size=(n_boot, len(y)))
        ys = fitted[None, :] + r[draws]  # (n_boot, n)
        coefs = np.linalg.lstsq(X, ys.T, rcond=None)[0].T  # (n_boot, 3)
        for i, c in enumerate(coefs):
            bx, bl = _parabola_min(c)
            samples[i] = (bx, bl, c[2])
    lo_x, hi_x = _interval(samples[:, 0])
    ci: dict[str, tuple[float, float]] = {"n_star": (math.exp(lo_x), math.exp(hi_x)),
                                          "l_star": _interval(samples[:, 1])}
    n_star = math.exp(xs) if math.isfinite(xs) else _NAN

    def made(status: FitStatus, message: str) -> IsoProfile:
        return IsoProfile(family, float(budget), status, message, tuple(map(float, n)),
                          tuple(map(float, d)), tuple(map(float, y)),
                          (float(coef[0]), float(coef[1]), float(coef[2])), n_star, ls,
                          resid_sd, ci, samples)

    if not coef[2] > 0:
        return made("failed", f"loss is not convex in ln N (c2 = {coef[2]:.3g}): no minimum")
    if not x[0] < xs < x[-1]:
        side = "smallest" if xs <= x[0] else "largest"
        return made("hit_bound", f"minimum N*={n_star:.3g} at or beyond the {side} size "
                                 f"measured ({n[0]:.3g}..{n[-1]:.3g}); widen the sizes")
    return made("converged", f"N*={n_star:.3g} inside {n[0]:.3g}..{n[-1]:.3g}")


# --- laws across budgets -------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """A predicted run at ``budget`` and size ``N``: ``loss`` with a 95% prediction
    interval (fit uncertainty plus run-to-run noise), ``N``/``D`` with the interval of
    ``N*`` where ``N`` is the optimum."""

    family: str
    budget: float
    N: float
    D: float
    loss: float
    loss_ci: tuple[float, float]
    n_ci: tuple[float, float] = (_NAN, _NAN)
    loss_law: Literal["joint", "floored", "power"] = "joint"

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "budget_flops": self.budget, "N": self.N,
                "D": self.D, "loss": _clean(self.loss), "loss_law": self.loss_law,
                "loss_ci95": [_clean(self.loss_ci[0]), _clean(self.loss_ci[1])],
                "N_ci95": [_clean(self.n_ci[0]), _clean(self.n_ci[1])]}


@dataclass(frozen=True)
class FamilyScaling:
    """One family's laws: ``N*(C) = G·C^a``, ``L*(C) = K·C^(−b)``, curvature ``k``, and
    the floored ``L*(C) = E + K_f·C^(−b_f)`` (``floor``: ``(E, b_f, ln K_f)``, used where
    ``floor_status`` is ``converged``).

    ``samples`` rows: ``(a, ln G, b, ln K, k, E, b_f, ln K_f)`` per bootstrap replicate;
    ``noise_sd``: pooled residual standard deviation of the profiles (one run's noise);
    ``joint``: the joint law on every point of the family (loss predictions).
    """

    family: str
    status: FitStatus
    message: str
    profiles: tuple[IsoProfile, ...]
    joint: JointFit | None = None
    a: float = _NAN
    log_G: float = _NAN
    b: float = _NAN
    log_K: float = _NAN
    curvature: float = _NAN
    noise_sd: float = _NAN
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 8)), repr=False,
                                compare=False)
    floor: tuple[float, float, float] = (_NAN, _NAN, _NAN)
    floor_status: FitStatus = "too_few_points"
    floor_message: str = "not fitted"

    @property
    def ok(self) -> bool:
        return self.status in ("converged", "hit_bound")

    @property
    def floor_ok(self) -> bool:
        """Whether ``L*(C)`` is the floored law (else the pure power law)."""
        return self.floor_status == "converged"

    @property
    def loss_law(self) -> Literal["joint", "floored", "power"]:
        """Which law the loss predictions come from (module docstring)."""
        return "joint" if self.joint_ok else "floored" if self.floor_ok else "power"

    @property
    def budgets_used(self) -> tuple[float, ...]:
        return tuple(p.budget for p in self.profiles if p.ok)

    def n_star(self, C: float | np.ndarray) -> np.ndarray:
        return np.asarray(np.exp(self.log_G + self.a * np.log(C)))

    def l_star(self, C: float | np.ndarray) -> np.ndarray:
        """The loss at the optimum: the floored law where it converged, else the power law."""
        if self.floor_ok:
            e, bf, lkf = self.floor
            return np.asarray(e + np.exp(lkf - bf * np.log(C)))
        return np.asarray(np.exp(self.log_K - self.b * np.log(C)))

    def _l_star_samples(self, lc: np.ndarray) -> np.ndarray:
        """``L*`` of every bootstrap replicate at ``ln C`` values ``lc`` (rows: replicates)."""
        s = self.samples
        if self.floor_ok:
            return np.asarray(s[:, 5:6] + np.exp(s[:, 7:8] - s[:, 6:7] * lc))
        return np.asarray(np.exp(s[:, 3:4] - s[:, 2:3] * lc))

    def band(self, C: np.ndarray, what: Literal["n", "l"]) -> tuple[np.ndarray, np.ndarray]:
        """95% band of ``N*(C)`` or ``L*(C)`` over ``C`` (NaN without samples)."""
        C = np.asarray(C, dtype=float)
        s = self.samples
        if len(s) < _MIN_BOOT:
            return np.full(C.shape, _NAN), np.full(C.shape, _NAN)
        lc = np.log(C)[None, :]
        ns = np.exp(s[:, 1:2] + s[:, 0:1] * lc)  # (n_boot, len(C))
        if what == "n":
            v = ns
        elif self.joint_ok:
            assert self.joint is not None
            j = self.joint.samples
            k = np.arange(len(ns)) % len(j)
            e, a, al, b, be = (j[k, i : i + 1] for i in range(5))
            v = e + a * ns ** (-al) + b * (C[None, :] / (3 * ns)) ** (-be)
        else:
            v = self._l_star_samples(lc)
        lo, hi = np.nanpercentile(v, [2.5, 97.5], axis=0)
        return lo, hi

    @property
    def joint_ok(self) -> bool:
        """Whether loss predictions use the joint law: only a ``converged`` one. A joint
        fit at a bound (``hit_bound``, e.g. ``E`` pinned to 0) is a law the data did not
        pin down; extrapolating it missed a verification by 0.05 nats where ``L*(C)``
        missed by 0.006 (bench/RESULTS.md, synthetic_small), so it is not used."""
        return (self.joint is not None and self.joint.status == "converged"
                and len(self.joint.samples) >= _MIN_BOOT)

    def loss_at(self, C: float | np.ndarray, N: float | np.ndarray) -> np.ndarray:
        """Point estimate of the loss at budget ``C`` and size ``N`` (``D = C/3N``)."""
        C, N = np.asarray(C, dtype=float), np.asarray(N, dtype=float)
        if self.joint_ok:
            assert self.joint is not None
            return self.joint.predict(N, C / (3 * N))
        return np.asarray(self.l_star(C) + self.curvature * np.log(N / self.n_star(C)) ** 2)

    def predict(self, C: float, N: float | None = None, seed: int = 0) -> Prediction:
        """One run at budget ``C`` and size ``N`` (default ``N*(C)``): its loss with a 95%
        prediction interval (fit replicates plus one draw of run-to-run noise each)."""
        n_opt = float(self.n_star(C))
        n = n_opt if N is None else float(N)
        loss = float(self.loss_at(C, n))
        s = self.samples
        loss_ci: tuple[float, float] = (_NAN, _NAN)
        n_ci: tuple[float, float] = (_NAN, _NAN)
        if len(s) >= _MIN_BOOT:
            lc = math.log(C)
            ns = np.exp(s[:, 1] + s[:, 0] * lc)
            nn = ns if N is None else np.full(len(s), n)
            if self.joint_ok:
                assert self.joint is not None
                j = self.joint.samples[np.arange(len(s)) % len(self.joint.samples)]
                ls = j[:, 0] + j[:, 1] * nn ** (-j[:, 2]) + j[:, 3] * (C / (3 * nn)) ** (-j[:, 4])
            else:
                ls = self._l_star_samples(np.array([lc]))[:, 0] + s[:, 4] * np.log(nn / ns) ** 2
            noise = np.random.default_rng(seed).normal(0.0, self.noise_sd, len(s))
            loss_ci = _interval(ls + (noise if math.isfinite(self.noise_sd) else 0.0))
            n_ci = _interval(ns)
        return Prediction(self.family, float(C), n, float(C) / (3 * n), loss, loss_ci, n_ci,
                          self.loss_law)

    def as_dict(self) -> dict[str, Any]:
        return {"family": self.family, "status": self.status, "message": self.message,
                "law_N": "N*(C) = G*C^a", "a": _clean(self.a),
                "G": _clean(math.exp(self.log_G)) if math.isfinite(self.log_G) else None,
                "law_L": "L*(C) = K*C^(-b)", "b": _clean(self.b),
                "K": _clean(math.exp(self.log_K)) if math.isfinite(self.log_K) else None,
                "law_L_floored": "L*(C) = E + K_f*C^(-b_f)", "floor_status": self.floor_status,
                "floor_message": self.floor_message, "E": _clean(self.floor[0]),
                "b_f": _clean(self.floor[1]),
                "K_f": _clean(math.exp(self.floor[2])) if math.isfinite(self.floor[2]) else None,
                "loss_law": self.loss_law,
                "law_D": "D*(C) = C/(3*N*(C)) = C^(1-a)/(3G)",
                "curvature": _clean(self.curvature), "noise_sd": _clean(self.noise_sd),
                "joint": self.joint.as_dict() if self.joint is not None else None,
                "budgets_used": list(self.budgets_used), "ci95": _ci_dict(self.ci),
                "profiles": [p.as_dict() for p in self.profiles]}


def _line(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    """Least-squares ``y = c + s·x`` (weighted by ``w`` when given): ``(s, c)``."""
    s, c = np.polyfit(x, y, 1, w=None if w is None else np.sqrt(w))
    return float(s), float(c)


def n_star_weights(profiles: Sequence[IsoProfile], x: np.ndarray) -> np.ndarray | None:
    """Inverse-variance weights for the ``ln N*`` against ``ln C`` line (random effects).

    Each profile's variance of ``ln N*`` is read off its bootstrap (the 95% interval's
    width / 3.92, robust to the heavy tails of a minimum near the edge of the sizes);
    the scatter of the minima about the line beyond those variances (``τ²``,
    DerSimonian–Laird method of moments for a regression) is added to each. An ``N*``
    known only to within a factor 20 (a minimum next to the smallest size) then counts
    for little, one pinned to ±5% for much, and none counts for more than the line's own
    scatter allows. ``None`` (equal weights) where a profile has too few replicates.
    """
    var = []
    for p in profiles:
        s = p.samples[:, 0] if len(p.samples) else np.empty(0)
        s = s[np.isfinite(s)]
        if len(s) < _MIN_BOOT:
            return None
        lo, hi = np.percentile(s, [2.5, 97.5])
        var.append(max(((hi - lo) / 3.92) ** 2, 1e-12))
    v = np.asarray(var)
    y = np.log([p.n_star for p in profiles])
    X = np.column_stack([np.ones_like(x), x])
    w = 1.0 / v
    k = len(profiles)
    if k > 2:  # tau² from the fixed-effect residuals (needs a degree of freedom)
        xtwx_inv = np.linalg.inv(X.T @ (w[:, None] * X))
        beta = xtwx_inv @ (X.T @ (w * y))
        q = float(np.sum(w * (y - X @ beta) ** 2))
        denom = float(w.sum() - np.trace(xtwx_inv @ (X.T @ ((w ** 2)[:, None] * X))))
        tau2 = max(0.0, (q - (k - 2)) / denom) if denom > 0 else 0.0
        w = 1.0 / (v + tau2)
    return w


#: budgets with a converged profile the floored law needs: 3 parameters + 1 to check
MIN_FLOOR_BUDGETS = 4


def fit_floor(lc: np.ndarray, ls: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``ls = E + exp(ln K − b·lc)`` with ``0 <= E < min(ls)``, ``K > 0``
    and ``0 < b <= 3``: ``(E, b, ln K)`` (NaN where nothing fits).

    For a fixed ``b`` the law is linear in ``(E, K)``, solved in closed form (``E``
    clipped to its bounds); ``b`` is found on a log grid, then refined between the grid
    neighbours of the best (variable projection: one 1-D search, no starting point).
    """
    from scipy.optimize import minimize_scalar

    lc, ls = np.asarray(lc, dtype=float), np.asarray(ls, dtype=float)
    top = float(ls.min()) if len(ls) else _NAN
    if len(ls) < 3 or not top > 0:
        return _NAN, _NAN, _NAN
    mid = float(lc.mean())
    z = lc - mid

    def solve(b: float) -> tuple[float, float, float]:
        x = np.exp(-b * z)
        xc = x - x.mean()
        sxx = float(xc @ xc)
        if not sxx > 0:
            return math.inf, _NAN, _NAN
        k = float(xc @ (ls - ls.mean())) / sxx
        e = float(ls.mean() - k * x.mean())
        if not 0.0 <= e < top:  # on a bound: E fixed there, K alone
            e = min(max(e, 0.0), top * (1 - 1e-9))
            k = float(x @ (ls - e)) / float(x @ x)
        if not k > 0:
            return math.inf, _NAN, _NAN
        r = e + k * x - ls
        return float(r @ r), e, k

    grid = np.geomspace(1e-3, 3.0, 121)
    costs = [solve(float(b))[0] for b in grid]
    i = int(np.argmin(costs))
    if not math.isfinite(costs[i]):
        return _NAN, _NAN, _NAN
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    res = minimize_scalar(lambda b: solve(b)[0], bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-7})
    b = float(res.x) if solve(float(res.x))[0] <= costs[i] else float(grid[i])
    _, e, k = solve(b)
    return e, b, math.log(k) + b * mid


def _floor_status(e: float, ls: np.ndarray) -> tuple[FitStatus, str]:
    top = float(np.min(ls))
    if len(ls) < MIN_FLOOR_BUDGETS:
        return "too_few_points", (f"{len(ls)} converged budgets; the floored law needs "
                                  f"{MIN_FLOOR_BUDGETS}")
    if not math.isfinite(e):
        return "failed", "the floored law did not converge"
    if e < 1e-3 * top:
        return "hit_bound", (f"floor E={e:.3g} pinned at 0: the minima show no floor yet "
                             f"(the pure power law is used)")
    if e > top - 1e-4:
        return "hit_bound", f"floor E={e:.4g} at the lowest L* measured ({top:.4g})"
    return "converged", f"E={e:.4g}"


def fit_family(family: str, profiles: Sequence[IsoProfile], n_boot: int = 200,
               seed: int = 0) -> FamilyScaling:
    """``N*(C)``, ``L*(C)``, their bootstrap, and the joint law from one family's profiles."""
    profiles = tuple(sorted(profiles, key=lambda p: p.budget))
    allN = np.concatenate([p.N for p in profiles]) if profiles else np.empty(0)
    allD = np.concatenate([p.D for p in profiles]) if profiles else np.empty(0)
    allL = np.concatenate([p.L for p in profiles]) if profiles else np.empty(0)
    joint = fit_joint(allN, allD, allL, n_boot=n_boot, seed=seed) if len(allL) else None
    good = [p for p in profiles if p.ok]
    skipped = [f"{p.budget:.3g} ({p.status})" for p in profiles if not p.ok]
    note = f"; budgets left out: {', '.join(skipped)}" if skipped else ""
    if len(good) < 2:
        return FamilyScaling(family, "too_few_points",
                             f"{len(good)} budget(s) with a converged profile; the laws "
                             f"need 2 (3 for a check){note}", profiles, joint)
    lc = np.log([p.budget for p in good])
    w_n = n_star_weights(good, lc)
    a, log_g = _line(lc, np.log([p.n_star for p in good]), w_n)
    l_stars = np.array([p.l_star for p in good])
    mb, log_k = _line(lc, np.log(l_stars))
    floor = fit_floor(lc, l_stars)
    floor_status, floor_msg = _floor_status(floor[0], l_stars)
    curv = float(np.mean([p.curvature for p in good]))
    dof = [len(p.N) - 3 for p in good]
    ss = sum(d * p.resid_sd ** 2 for d, p in zip(dof, good) if d > 0)
    noise = math.sqrt(ss / sum(d for d in dof if d > 0)) if sum(dof) > 0 else _NAN
    n_boot = min(len(p.samples) for p in good)
    rows = np.full((n_boot, 8), _NAN)
    for i in range(n_boot):
        xs = np.array([p.samples[i, 0] for p in good])
        ls = np.array([p.samples[i, 1] for p in good])
        ks = np.array([p.samples[i, 2] for p in good])
        if not (np.all(np.isfinite(xs)) and np.all(ls > 0)):
            continue
        ba, bg = _line(lc, xs, w_n)
        bb, bk = _line(lc, np.log(ls))
        fl = fit_floor(lc, ls) if floor_status == "converged" else (0.0, 0.0, 0.0)
        rows[i] = (ba, bg, -bb, bk, float(np.mean(ks)), *fl)
    rows = rows[np.all(np.isfinite(rows), axis=1)]
    ci = {"a": _interval(rows[:, 0]), "b": _interval(rows[:, 2]),
          "curvature": _interval(rows[:, 4])}
    if floor_status == "converged":
        ci.update({"E": _interval(rows[:, 5]), "b_f": _interval(rows[:, 6])})
        if not ci["E"][0] > 1e-3 * float(l_stars.min()):  # the bootstrap reaches E = 0
            floor_status = "hit_bound"
            floor_msg = (f"floor E={floor[0]:.3g} not told from 0 (95% interval "
                         f"[{ci['E'][0]:.3g}, {ci['E'][1]:.3g}]): the pure power law is used")
    status: FitStatus = "converged" if len(good) >= 3 else "hit_bound"
    msg = (f"{len(good)} budgets; a={a:.3f}, b={-mb:.4f}{note}" if len(good) >= 3 else
           f"only 2 budgets: the laws pass through both minima exactly, no check{note}")
    if joint is not None and not joint.ok:
        law = "floored" if floor_status == "converged" else "pure power"
        msg += (f"; joint law {joint.status} ({joint.message}): losses from the {law} "
                f"L*(C) instead")
    return FamilyScaling(family, status, msg, profiles, joint, a, log_g, -mb, log_k, curv,
                         noise, ci, rows, floor, floor_status, floor_msg)


# --- the whole study -----------------------------------------------------------------

@dataclass(frozen=True)
class Pick:
    """The compute-optimal answer at one target budget, with what limits it.

    ``status``: ``ok``; ``capped`` (``N*`` over the serving cap: the cap is used and the
    loss is read off the profile); ``extrapolated`` (beyond what was measured, or laws
    nothing checks: see ``message``; the numbers are not an answer); ``failed`` (no
    family has usable laws). Families are ranked on checked laws (3+ budgets) when any
    family has them; a law on 2 budgets passes through both minima and is not ranked
    then (``message`` says what it would predict).
    ``epochs``: the passes over the training data the pick implies;
    ``max_epochs_measured``: the most the study measured at sizes ``>= N/2``
    (:func:`passes_measured`).
    """

    status: PickStatus
    message: str
    budget: float
    family: str = ""
    prediction: Prediction | None = None
    n_star: float = _NAN
    epochs: float = _NAN
    max_epochs_measured: float = _NAN
    ranking: tuple[tuple[str, float, tuple[float, float]], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {"status": self.status, "message": self.message, "budget_flops": self.budget,
                "family": self.family, "N": p.N if p else None, "N_star": _clean(self.n_star),
                "N_ci95": [_clean(v) for v in p.n_ci] if p else None,
                "D": p.D if p else None, "loss": _clean(p.loss) if p else None,
                "loss_ci95": [_clean(v) for v in p.loss_ci] if p else None,
                "epochs": _clean(self.epochs),
                "max_epochs_measured": _clean(self.max_epochs_measured),
                "ranking": [{"family": f, "loss": _clean(v), "loss_ci95": [_clean(a), _clean(b)]}
                            for f, v, (a, b) in self.ranking]}


@dataclass(frozen=True)
class StudyFit:
    """Every family's laws, the winner per budget studied, and the pick at the target."""

    families: dict[str, FamilyScaling]
    budgets: tuple[float, ...]
    winners: dict[float, str]
    pick: Pick
    n_train: int | None
    dead: tuple[str, ...] = ()
    floor_loss: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"budgets_flops": list(self.budgets), "points_left_out_dead": list(self.dead),
                "data_floor_logloss": self.floor_loss,
                "winner_per_budget": [{"budget_flops": c, "family": f}
                                      for c, f in self.winners.items()],
                "families": {k: v.as_dict() for k, v in self.families.items()},
                "pick": self.pick.as_dict(), "n_train": self.n_train}


#: A run whose normalised entropy is at least this learned nothing beyond the base rate:
#: a failed run (too narrow to train, or diverged), not a point on the size curve.
DEAD_NE = 0.995


def dead_points(points: pd.DataFrame) -> pd.Series:
    """Rows that did not learn: infinite loss, or ``val_ne >= DEAD_NE`` where reported."""
    dead = ~np.isfinite(points["loss"].astype(float))
    if "val_ne" in points.columns:
        dead |= points["val_ne"].astype(float) >= DEAD_NE
    return dead


def study_points(points: pd.DataFrame) -> pd.DataFrame:
    """The lowest loss per ``(family, budget, N)`` (over a learning-rate grid), leaving out
    runs that did not learn (:func:`dead_points`)."""
    need = {"family", "budget", "N", "D", "loss"}
    missing = need - set(points.columns)
    if missing:
        raise ValueError(f"study points lack column(s) {sorted(missing)}")
    df = points[~dead_points(points)]
    idx = df.groupby(["family", "budget", "N"])["loss"].idxmin()
    return df.loc[idx].sort_values(["family", "budget", "N"]).reset_index(drop=True)


def analyze_study(points: pd.DataFrame, target_flops: float | None = None,
                  max_n: float | None = None, n_train: int | None = None,
                  n_boot: int = 400, seed: int = 0,
                  max_extrapolation: float = MAX_EXTRAPOLATION,
                  floor_loss: float | None = None) -> StudyFit:
    """Fit every family's profiles and laws, and pick at ``target_flops``.

    Args:
        points: the study's rows (see :func:`study_points`).
        target_flops: the budget to answer for (default ``10 ×`` the largest studied).
        max_n: the serving cap on ``N`` (forward FLOPs per example).
        n_train: training rows of the dataset, for the passes a ``D`` implies (``None``:
            fresh examples, no repetition).
        n_boot, seed: bootstrap replicates and seed.
        max_extrapolation: how far beyond the largest budget a pick is still an answer.
        floor_loss: the data's own loss floor where it knows one (a synthetic teacher's
            Bayes loss, ``search.study.data_floor``): a pick predicted below it is
            impossible and is marked ``extrapolated``.
    """
    best = study_points(points)
    gone = points[dead_points(points)]
    dead = tuple(f"{r.family} C={float(r.budget):.3g} N={float(r.N):.4g}"
                 for r in gone.itertuples())
    budgets = tuple(sorted(float(c) for c in best["budget"].unique()))
    families: dict[str, FamilyScaling] = {}
    for fam, fdf in best.groupby("family", sort=True):
        profs = [fit_profile(str(fam), float(c), g["N"], g["D"], g["loss"], n_boot, seed)
                 for c, g in fdf.groupby("budget", sort=True)]
        families[str(fam)] = fit_family(str(fam), profs, min(n_boot, 200), seed)
    # the winner at a budget is the family with the best measured run there: a fitted
    # minimum can sit far below every run (MovieLens, Wukong at 4e9: a parabola through
    # 4 sizes, one barely trained, put L* 0.035 under the best run and "won")
    winners: dict[float, str] = {}
    for c in budgets:
        scored = [(f, float(min(p.L))) for f, s in families.items() for p in s.profiles
                  if p.budget == c and len(p.L)]
        if scored:
            winners[c] = min(scored, key=lambda t: t[1])[0]
    target = float(target_flops) if target_flops else (10 * budgets[-1] if budgets else _NAN)
    passes = ({str(f): (g["N"].to_numpy(float), g["D"].to_numpy(float) / n_train)
               for f, g in best.groupby("family")} if n_train else {})
    pick = _pick(families, budgets, target, max_n, n_train, passes, max_extrapolation,
                 seed, floor_loss)
    if dead:
        pick = replace(pick, message=pick.message + f"; {len(dead)} run(s) that did not beat "
                       f"the base rate left out ({', '.join(dead)})")
    return StudyFit(families, budgets, winners, pick, n_train, dead, floor_loss)


def passes_measured(sizes: np.ndarray, passes: np.ndarray, n: float) -> tuple[float, float]:
    """The most passes over the training data the study measured at sizes ``>= n/2``
    (the largest size's, where every size measured is below ``n/2``), and at any size.

    A bigger model memorises a repeated example sooner, so passes measured on small
    models do not cover a large one: on MovieLens-1M a study that measured 21.6 passes
    at N = 1.2e3 (and at most 2.9 at N >= 7e3) predicted a 1.5e4 model at 17.6 passes
    0.076 nats too well (bench/RESULTS.md, movielens_small4).
    """
    if not len(sizes):
        return _NAN, _NAN
    near = passes[sizes >= n / 2]
    at_size = float(near.max()) if len(near) else float(passes[np.argmax(sizes)])
    return at_size, float(passes.max())


def _pick(families: dict[str, FamilyScaling], budgets: tuple[float, ...], target: float,
          max_n: float | None, n_train: int | None,
          passes: Mapping[str, tuple[np.ndarray, np.ndarray]],
          max_extrapolation: float, seed: int, floor_loss: float | None = None) -> Pick:
    usable = {f: s for f, s in families.items() if s.ok}
    if not usable or not budgets:
        why = "; ".join(f"{f}: {s.status} ({s.message})" for f, s in families.items())
        return Pick("failed", f"no family has usable laws: {why or 'no points'}", target)
    preds: dict[str, Prediction] = {}
    for f, s in usable.items():
        n_opt = float(s.n_star(target))
        preds[f] = s.predict(target, None if max_n is None or n_opt <= max_n else max_n,
                             seed=seed)
    # a law on 2 budgets passes through both minima exactly: nothing checks it, and its
    # slope can carry a family past one that won every budget measured (synthetic
    # families: attention, 2 budgets, "beat" UniMixing-Lite, 3 budgets, at 10x). Such a
    # family is ranked only when no family has a checked law
    checked = {f for f, s in usable.items() if s.status == "converged"}
    unchecked = {f: preds.pop(f) for f in list(preds) if checked and f not in checked}
    ranking = tuple(sorted(((f, p.loss, p.loss_ci) for f, p in preds.items()),
                           key=lambda t: t[1]))
    fam = ranking[0][0]
    pred, scaling = preds[fam], usable[fam]
    n_opt = float(scaling.n_star(target))
    epochs = pred.D / n_train if n_train else _NAN
    problems = []
    hi = max(usable[f].budgets_used[-1] for f in preds)
    lo = min(usable[f].budgets_used[0] for f in preds)
    if target > max_extrapolation * hi * (1 + 1e-9):
        problems.append(f"target {target:.3g} is {target / hi:.3g}x the largest budget "
                        f"fitted ({hi:.3g}); the law is trusted to {max_extrapolation:g}x")
    if scaling.status != "converged":
        problems.append(f"{fam}'s laws rest on {len(scaling.budgets_used)} budgets and pass "
                        f"through their minima exactly: nothing checks them")
    if target < lo * (1 - 1e-9):
        problems.append(f"target {target:.3g} is below the smallest budget fitted ({lo:.3g})")
    max_epochs, any_size = passes_measured(*passes[fam], pred.N) if fam in passes else (
        _NAN, _NAN)
    if n_train and epochs > max(1.0, max_epochs) * 1.05:
        problems.append(f"D*={pred.D:.3g} is {epochs:.2f} passes over {n_train} training rows "
                        f"at N={pred.N:.3g}; the study measured at most {max_epochs:.2f} at "
                        f"sizes >= N/2 ({any_size:.2f} at any size): repetition not measured")
    if floor_loss is not None and pred.loss < floor_loss:
        # what is known without the law: more compute does not raise the best loss, and
        # none goes below the floor
        last = [p for p in scaling.profiles if p.ok][-1]
        problems.append(f"predicted loss {pred.loss:.4f} is below the data's own floor "
                        f"{floor_loss:.4f} (its Bayes loss): no model can reach it; the "
                        f"{pred.loss_law} law has run past the floor (all that is known: "
                        f"between the floor and L*={last.l_star:.4f} measured at "
                        f"C={last.budget:.3g})")
    if len(ranking) > 1:
        second = ranking[1]
        if not ranking[0][2][1] < second[2][0]:
            problems_note = f"; {fam} vs {second[0]}: intervals overlap (no clear winner)"
        else:
            problems_note = f"; {fam} beats {second[0]} beyond the intervals"
    else:
        problems_note = ""
    if unchecked:
        problems_note += "; not ranked (laws on 2 budgets, unchecked): " + ", ".join(
            f"{f} (would predict {p.loss:.4f} at N={p.N:.3g})" for f, p in unchecked.items())
    left_out = [f"{f} ({s.status})" for f, s in families.items() if not s.ok]
    if left_out:
        problems_note += f"; families without usable laws left out: {', '.join(left_out)}"
    if problems:
        return Pick("extrapolated", "; ".join(problems) + problems_note, target, fam, pred,
                    n_opt, epochs, max_epochs, ranking)
    if max_n is not None and n_opt > max_n:
        return Pick("capped", f"N*={n_opt:.3g} exceeds the serving cap {max_n:.3g}; "
                    f"the cap is used{problems_note}", target, fam, pred, n_opt, epochs,
                    max_epochs, ranking)
    return Pick("ok", f"{fam} at N*={n_opt:.3g}, {scaling.message}{problems_note}", target,
                fam, pred, n_opt, epochs, max_epochs, ranking)
