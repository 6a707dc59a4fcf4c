"""``recscale verify``: train the predicted compute-optimal config at a target budget.

The study's fit (:func:`analysis.isoflop.analyze_study`) predicts, for a target budget
``C`` (default ``10 ×`` the largest studied), the winning family and its ``N*``; verify
trains that family at the sizes of its grid nearest ``N*/2``, ``N*`` and ``2·N*``, each for
``D = C / 3N`` examples with the study's schedule, through Ray Tune like the study, as
MLflow runs tagged ``recscale.kind=verify`` under the study's parent run. It reports
measured against predicted loss (with the 95% prediction interval) and whether ``N*``
beat its neighbours.

Example::

    out = run_verify("tm", budget_flops=3e12)
    print(out.table())
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.isoflop import StudyFit, analyze_study
from search.study import (
    PointTrainer,
    StudyError,
    StudyPoint,
    load_study,
    make_point,
    pick_sizes,
    run_points,
    size_candidates,
    train_point,
)
from trainers.contracts import KIND_VERIFY, OBJECTIVE

__all__ = ["ROLES", "VerifyOutcome", "VerifyRow", "plan_verify", "rescore_verify", "run_verify"]

log = logging.getLogger(__name__)

ROLES = ("N*/2", "N*", "2N*")
_FACTORS = {"N*/2": 0.5, "N*": 1.0, "2N*": 2.0}


@dataclass(frozen=True)
class VerifyRow:
    """One verification run: predicted (with its 95% interval) against measured loss."""

    role: str
    family: str
    budget: float
    N: int
    D: int
    predicted: float
    ci: tuple[float, float]
    measured: float
    epochs: float | None
    run_id: str

    @property
    def inside(self) -> bool:
        return self.ci[0] <= self.measured <= self.ci[1]

    @property
    def error(self) -> float:
        return self.measured - self.predicted

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "family": self.family, "budget_flops": self.budget,
                "N": self.N, "D": self.D, "predicted_loss": self.predicted,
                "predicted_ci95": list(self.ci), "measured_loss": self.measured,
                "error": self.error, "inside_ci95": self.inside, "epochs": self.epochs,
                "run_id": self.run_id}


@dataclass(frozen=True)
class VerifyOutcome:
    """The verification of one study at one target budget."""

    study: str
    budget: float
    family: str
    pick_status: str
    pick_message: str
    rows: tuple[VerifyRow, ...]

    @property
    def center(self) -> VerifyRow | None:
        return next((r for r in self.rows if r.role == "N*"), None)

    @property
    def n_star_beats_neighbours(self) -> bool | None:
        """Whether the run at ``N*`` measured no worse than both neighbours."""
        c = self.center
        others = [r for r in self.rows if r.role != "N*"]
        if c is None or not others:
            return None
        return all(c.measured <= r.measured for r in others)

    def as_dict(self) -> dict[str, Any]:
        c = self.center
        return {"study": self.study, "budget_flops": self.budget, "family": self.family,
                "pick_status": self.pick_status, "pick_message": self.pick_message,
                "rows": [r.as_dict() for r in self.rows],
                "n_star_beats_neighbours": self.n_star_beats_neighbours,
                "n_star_inside_ci95": c.inside if c else None,
                "n_star_error": c.error if c else None}

    def table(self) -> str:
        lines = [f"verify {self.study!r} at C={self.budget:.3g} ({self.family}; pick "
                 f"{self.pick_status}: {self.pick_message})",
                 f"{'role':<6} {'N':>10} {'D':>10} {'predicted':>10} {'95% interval':>19} "
                 f"{'measured':>9} {'error':>8} inside"]
        for r in self.rows:
            lines.append(f"{r.role:<6} {r.N:>10.3g} {r.D:>10.3g} {r.predicted:>10.4f} "
                         f"[{r.ci[0]:.4f}, {r.ci[1]:.4f}] {r.measured:>9.4f} {r.error:>+8.4f} "
                         f"{'yes' if r.inside else 'NO'}")
        beats = self.n_star_beats_neighbours
        lines.append("N* no worse than both neighbours: "
                     + ("yes" if beats else "NO" if beats is not None else "n/a"))
        return "\n".join(lines)


def plan_verify(fit: StudyFit, record: Any, spec: Any, budget: float,
                family: str | None = None) -> list[StudyPoint]:
    """The runs at the grid sizes nearest ``N*/2``, ``N*``, ``2N*`` of the pick (or of
    ``family``) at ``budget``."""
    fam = family or fit.pick.family
    scaling = fit.families.get(fam) if fam else None
    if scaling is None or not scaling.ok:
        why = scaling.message if scaling is not None else fit.pick.message
        raise StudyError(f"no usable scaling law for {fam or 'any family'!r}: {why}")
    cfg = record.config
    pred = fit.pick.prediction
    # the pick's N (the serving cap applied) for the picked family; else the law's N*
    n_opt = (float(pred.N) if pred is not None and fam == fit.pick.family
             and fit.pick.budget == budget else float(scaling.n_star(budget)))
    cands = size_candidates(cfg, fam, spec)
    lr = fit_lr(record, fam)
    points: list[StudyPoint] = []
    taken: list[int] = []
    for role in ("N*", "N*/2", "2N*"):  # N* first: it gets the nearest size
        free = [c for c in cands if c[0] not in taken]
        chosen = pick_sizes(free, [n_opt * _FACTORS[role]])
        if not chosen:
            raise StudyError(f"family {fam!r} has no size left near {role}")
        n, m = chosen[0]
        taken.append(n)
        if budget / (3 * n) < 1:
            raise StudyError(f"budget {budget:.3g} cannot train {fam!r} at N={n:.3g} for one "
                             "example")
        points.append(make_point(cfg, fam, budget, n, m, lr, record.n_train, role=role))
    return sorted(points, key=lambda p: p.N)


def fit_lr(record: Any, family: str) -> float:
    """The learning rate verify trains with: the study's, or with a grid, the rate that
    won most often among the family's profile minima."""
    cfg = record.config
    if len(cfg.lrs) <= 1:
        return float(cfg.lrs[0]) if cfg.lrs else float(cfg.point_train().lr)
    df = record.points[record.points["family"] == family]
    best = df.loc[df.groupby(["budget", "N"])["loss"].idxmin()]
    return float(best["lr"].mode().iloc[0])


def run_verify(name: str, budget_flops: float | None = None, tracking_uri: str | None = None,
               storage: str | os.PathLike[str] | None = None, family: str | None = None,
               max_flops_per_example: float | None = None,
               trainer: PointTrainer | None = None, dataset: Any = None,
               verbose: int = 0) -> VerifyOutcome:
    """Verify study ``name`` at ``budget_flops`` (default 10× its largest budget).

    Raises :class:`StudyError` (one line) when the study does not exist or has no usable
    law. A target beyond what the study measured is still trained (that is what verify
    is for) and the outcome carries the pick's ``extrapolated`` status.
    """
    from trainers.data import load_dataset

    record = load_study(name, tracking_uri)
    if record.points.empty:
        raise StudyError(f"study {name!r} has no finished points to fit")
    target = budget_flops or 10 * max(record.config.budgets)
    if not target > 0:
        raise StudyError(f"--budget-flops must be > 0, got {target:.3g}")
    fit = analyze_study(record.points, target, max_flops_per_example, record.n_train,
                        floor_loss=record.floor_loss)
    if family is not None and family not in fit.families:
        raise StudyError(f"family {family!r} is not in study {name!r} "
                         f"(studied: {', '.join(fit.families)})")
    if fit.pick.status == "extrapolated":
        log.warning("verify: %s", fit.pick.message)
    ds = dataset if dataset is not None else load_dataset(record.config.data)
    points = plan_verify(fit, record, ds.spec, target, family)
    fam = points[0].family
    storage_path = Path(storage or "recscale_runs").absolute()
    from search.study import _shared

    results = run_points(f"{name}-verify-{target:.3g}", points, KIND_VERIFY, _shared(ds),
                         trainer or train_point, record.tracking_uri, record.experiment_id,
                         record.parent_run_id, storage_path, record.config.max_concurrent,
                         record.config.cpus_per_point, verbose)
    by_key = {str(r["point"]): r for r in results.to_dict("records")}
    scaling = fit.families[fam]
    rows = []
    for p in points:
        pred = scaling.predict(target, p.N)
        r = by_key.get(p.key, {})
        rows.append(VerifyRow(p.role, fam, target, p.N, p.D, pred.loss, pred.loss_ci,
                              float(r.get(OBJECTIVE, math.nan)), p.epochs,
                              str(r.get("mlflow_run_id", ""))))
        if r.get("mlflow_run_id"):
            _log_prediction(record.tracking_uri, str(r["mlflow_run_id"]), pred.loss, pred.loss_ci)
    return VerifyOutcome(name, target, fam, fit.pick.status, fit.pick.message, tuple(rows))


def rescore_verify(record: Any, fit: StudyFit, budget: float,
                   run_ids: Collection[str] | None = None) -> VerifyOutcome | None:
    """The verification runs ``record`` holds at ``budget`` (only ``run_ids`` when
    given: one verification among several at that budget), scored against ``fit`` (a
    law refitted after they ran: post hoc, so not a test of it). Roles are the ones the
    runs were trained for; ``None`` when the study has no verification at ``budget``.
    """
    v = record.verify
    if v is None or v.empty:
        return None
    rows_at = v[np.isclose(v["budget"].astype(float), budget, rtol=1e-6)]
    if run_ids is not None:
        rows_at = rows_at[rows_at["run_id"].isin(list(run_ids))]
    if rows_at.empty:
        return None
    fam = str(rows_at["family"].iloc[0])
    scaling = fit.families.get(fam)
    if scaling is None or not scaling.ok:
        return None
    rows = []
    for r in rows_at.sort_values("N").itertuples():
        pred = scaling.predict(budget, float(r.N))
        rows.append(VerifyRow(str(r.role), fam, budget, int(r.N), int(r.D), pred.loss,
                              pred.loss_ci, float(r.loss),
                              float(r.D) / record.n_train if record.n_train else None,
                              str(r.run_id)))
    return VerifyOutcome(record.name, budget, fam, fit.pick.status,
                         f"rescored post hoc: {fit.pick.message}", tuple(rows))


def _log_prediction(uri: str, run_id: str, loss: float, ci: tuple[float, float]) -> None:
    from mlflow.tracking import MlflowClient

    from trainers.tracking import log_metrics

    values = {"predicted_val_logloss": loss, "predicted_lo95": ci[0], "predicted_hi95": ci[1]}
    log_metrics(MlflowClient(uri), run_id, {k: v for k, v in values.items() if math.isfinite(v)},
                step=0)
