"""The analysis report of a search: frontiers, scaling fits, recommendation.

:func:`build_report` writes into ``out_dir``:

* the PNG figures of :mod:`analysis.plots` (``loss_vs_flops_per_example.png``,
  ``loss_vs_params.png``, ``loss_vs_train_flops.png``, ``joint_fit.png``);
* ``report.html``: the recommendation (the winning config and the budgets it used), every
  trial linked to its MLflow run, the fits and the figures, interactive (plotly); the
  page loads plotly.js once from ``plotly.min.js`` beside it (written from the Python
  package: offline, and the page stays small) and shows the PNGs by file name;
* ``summary.json`` with the keys

  - ``search``, ``parent_run_id``, ``n_trials``, ``n_reports``, ``families`` (trials per
    family), ``trial_status`` (trials per status), ``settings`` (the cap and budget used);
  - ``frontier``: Pareto points of ``flops_per_example`` and ``params_dense`` (trials,
    best loss) and the compute frontier ``train_flops`` (reports), overall and
    ``train_flops_by_family``;
  - ``fits``: ``power_law`` (``frontier``: ``L(C)`` on the overall compute frontier;
    ``by_family``: on each family's) and ``joint`` (``L(N, D)`` on every report), each
    with parameters, ``ci95`` intervals, ``status`` and ``message``;
  - ``recommendation``: ``best_overall`` and ``best_under_cap`` (trials, with their
    config), ``compute_optimal`` and ``compute_optimal_under_cap`` (``N*``, ``D*`` and
    the predicted loss for ``budget_flops`` from the joint fit); an entry that cannot
    be made holds ``{"error": ...}``, one not asked for (no cap, no budget) is null.
  - ``references``: the reference models the search trained first (``trials``: their
    results) and ``lift``: the best searched trial (under the cap, if one is given)
    against the base rate and the best reference (:func:`analysis.lift.model_lift`:
    log-loss and AUC lifts, their standard errors, whether paired, a verdict and one
    sentence each).
  - ``sequence_length`` (only when the trials differ in ``model.seq_len``, the behaviour-
    history length ``K``; absent otherwise): :func:`sequence_length`: the best trial of
    each ``K`` with the FLOPs per example it cost, and the best loss of each ``K`` within
    half-decade bands of FLOPs per example (loss vs ``K`` at equal serving cost); the
    figure ``loss_vs_seq_len.png``.

The reference models (``reference-<family>`` trials) are kept out of everything else:
the frontiers, fits and recommendation are about the searched trials; the trial table
lists them, marked.

Recommendations never extrapolate the model size beyond ``EXTRAPOLATION`` (10×) the
largest model trained.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.fits import JointFit, PowerLawFit, fit_joint, fit_power_law
from analysis.frontier import compute_frontier, pareto_front
from analysis.lift import model_lift, references_of, without_references
from analysis.plots import (
    PLOTLY_JS,
    html_figures,
    png_figures,
    seq_lens,
    sequence_png,
    write_plotly_js,
)
from analysis.runs import (
    CONFIG_COLUMN,
    RESULT_STEP,
    AnalysisError,
    SearchRuns,
    milestone_losses,
)
from trainers.contracts import METRICS, OBJECTIVE, RESULT_REPORT, VAL_SE

__all__ = ["DEFAULT_UI_URL", "EXTRAPOLATION", "run_url", "ComputeOptimal", "ReportResult", "ScalingFits", "build_report",
           "fit_search", "log_report_to_mlflow", "recommend_size", "select_best", "sequence_length"]

EXTRAPOLATION = 10.0  # how far beyond the largest trained model a recommendation may reach
EXCLUDED_STATUS = ("ERROR", "DIVERGED")  # trials never recommended
SPREAD_WARNING = 10.0  # warn when the 95% interval of N* spans more than this factor
_TRIAL_KEYS = ("run_id", "trial_id", "block", "status", RESULT_STEP, *METRICS)
#: Where ``recscale ui`` serves MLflow by default (links from the report to the runs).
DEFAULT_UI_URL = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class ReportResult:
    """Where the report went, the files written, and the ``summary.json`` content."""

    out_dir: Path
    files: list[Path]
    summary: dict[str, Any]

    @property
    def html(self) -> Path:
        return self.out_dir / "report.html"


@dataclass(frozen=True)
class ScalingFits:
    """The fits of one search: ``L(C)`` on the overall compute frontier and on each
    family's, and the joint ``L(N, D)`` over every report of every trial."""

    frontier: PowerLawFit
    by_family: dict[str, PowerLawFit]
    joint: JointFit


@dataclass(frozen=True)
class ComputeOptimal:
    """The compute-optimal model size and data for a training budget (``C = 3·N·D``).

    ``flops_per_example`` is ``N*``, ``examples`` is ``D*``; ``max_n_searched`` the
    largest ``N`` allowed (the serving cap, or ``EXTRAPOLATION`` × the largest trained
    model); ``limited_by`` says which bound the optimum sits on, if any; ``ci``: 95%
    bootstrap intervals of ``N``, ``D`` and ``L``.
    """

    budget_flops: float
    flops_per_example: float
    examples: float
    predicted_val_logloss: float
    max_flops_per_example: float | None
    max_n_searched: float
    limited_by: str | None
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    warning: str | None = None
    status: str = "ok"
    message: str = ""

    @property
    def trusted(self) -> bool:
        """Whether the recommendation lies inside what the search measured."""
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message,
                "budget_flops": self.budget_flops, "flops_per_example": self.flops_per_example,
                "examples": self.examples, "predicted_val_logloss": self.predicted_val_logloss,
                "max_flops_per_example": self.max_flops_per_example,
                "max_n_searched": self.max_n_searched, "limited_by": self.limited_by,
                "ci95": {"flops_per_example": self.ci.get("N"), "examples": self.ci.get("D"),
                         "predicted_val_logloss": self.ci.get("L")},
                "training_flops_check": 3.0 * self.flops_per_example * self.examples,
                "warning": self.warning}


def select_best(trials: pd.DataFrame, max_flops_per_example: float | None = None) -> pd.Series:
    """The trial with the lowest ``val_logloss`` in its result (its last report) among
    those with ``flops_per_example <= max_flops_per_example``; trials whose status is
    ERROR or DIVERGED, and the reference models, are never chosen; ties go to the
    cheaper model.

    Raises:
        AnalysisError: no trial qualifies.
    """
    col = OBJECTIVE
    if col not in trials:
        raise AnalysisError("no trial with a validation loss: trials lack 'val_logloss'")
    ok = trials[np.isfinite(pd.to_numeric(trials[col], errors="coerce"))]
    ok = ok[~ok.index.isin(references_of(ok).index)]
    if "status" in ok:
        ok = ok[~ok["status"].isin(EXCLUDED_STATUS)]
    cap = ""
    if max_flops_per_example is not None:
        if "flops_per_example" not in ok:
            raise AnalysisError("cannot apply the serving cap: trials lack 'flops_per_example'")
        ok = ok[ok["flops_per_example"] <= max_flops_per_example]
        cheapest = pd.to_numeric(trials.get("flops_per_example"), errors="coerce").min()
        cap = (f" under max_flops_per_example={max_flops_per_example:.3g} (the cheapest "
               f"trial needs {cheapest:.3g})")
    if ok.empty:
        raise AnalysisError(f"no trial with a validation loss{cap}")
    keys = [col] + (["flops_per_example"] if "flops_per_example" in ok else [])
    return ok.sort_values(keys, kind="mergesort").iloc[0]


def fit_search(runs: SearchRuns, n_boot: int = 200, joint_boot: int = 100, seed: int = 0
               ) -> ScalingFits:
    """Fit the scaling laws of a search.

    * ``frontier``: ``L(C) = E + A·C^(−α)`` on the compute-efficient frontier of every
      report (C = ``train_flops``);
    * ``by_family``: the same on each family's own frontier;
    * ``joint``: ``L(N, D) = E + A·N^(−α) + B·D^(−β)`` on every report (N =
      ``flops_per_example``, D = ``examples_seen``) of every trial not ERROR or
      DIVERGED, pooled over the families, bootstrapped by whole trials.
    """
    h = runs.history.dropna(subset=["train_flops", OBJECTIVE])
    h = h[h["train_flops"] > 0]
    front = compute_frontier(h)
    frontier = fit_power_law(front["train_flops"], front[OBJECTIVE], n_boot, seed)
    by_family = {}
    for fam, g in h.groupby("block", sort=True):
        f = compute_frontier(g)
        by_family[str(fam)] = fit_power_law(f["train_flops"], f[OBJECTIVE], n_boot, seed)
    failed = runs.trials.loc[runs.trials["status"].isin(EXCLUDED_STATUS), "run_id"]
    hj = h.dropna(subset=["flops_per_example", "examples_seen"])
    hj = hj[~hj["run_id"].isin(failed)]  # a diverging run's spikes are no scaling data
    joint = fit_joint(hj["flops_per_example"], hj["examples_seen"], hj[OBJECTIVE],
                      joint_boot, seed, groups=hj["run_id"])
    return ScalingFits(frontier, by_family, joint)


def recommend_size(joint: JointFit, history: pd.DataFrame, budget_flops: float,
                   max_flops_per_example: float | None = None) -> ComputeOptimal:
    """``(N*, D*)`` minimising the joint law for ``budget_flops = 3·N·D``, with
    ``N <= max_flops_per_example`` and ``N <= EXTRAPOLATION ×`` the largest
    ``flops_per_example`` in ``history``.

    A point outside what the search measured (more training examples than any trial
    saw, or a predicted loss below the best observed one by more than the fit's
    interval) comes back with ``status="extrapolated"`` and a ``message`` saying why;
    the report shows that sentence instead of the numbers and export refuses it.

    Raises:
        AnalysisError: the joint fit is not usable, or no size fits the budget.
    """
    if not joint.ok:
        raise AnalysisError(f"joint fit {joint.status}: {joint.message}")
    largest = float(pd.to_numeric(history["flops_per_example"], errors="coerce").max())
    if not math.isfinite(largest):
        raise AnalysisError("no trial reported flops_per_example")
    reach = EXTRAPOLATION * largest
    limit = reach if max_flops_per_example is None else min(reach, max_flops_per_example)
    n, d, loss = joint.compute_optimal(budget_flops, limit)
    limited_by = None
    if n >= limit * (1 - 1e-6):
        capped = max_flops_per_example is not None and max_flops_per_example <= reach
        limited_by = "serving cap" if capped else (
            f"extrapolation limit ({EXTRAPOLATION:g}x the largest trained model)")
    ci = joint.compute_optimal_ci(budget_flops, limit)
    warning = None
    if "N" in ci and ci["N"][1] > SPREAD_WARNING * ci["N"][0]:
        warning = (f"N* is poorly determined: its 95% interval spans "
                   f"{ci['N'][0]:.3g} to {ci['N'][1]:.3g} FLOPs/example")
    status, message = _measured(joint, history, budget_flops, d, loss)
    return ComputeOptimal(budget_flops, n, d, loss, max_flops_per_example, limit, limited_by,
                          ci, warning, status, message)


def _measured(joint: JointFit, history: pd.DataFrame, budget_flops: float, examples: float,
              loss: float) -> tuple[str, str]:
    """``("ok", "")`` when a compute-optimal point lies inside what the search measured,
    else ``("extrapolated", sentence)``: when the joint fit did not converge (a parameter
    at its bound, ``hit_bound``: its fitted law is not determined by the data), when ``examples`` is more than any trial trained
    on (every trial trains on the same split, so it means more passes over the training
    split than were ever measured), or when ``loss`` is below the best observed validation
    loss by more than the fit's 95% interval (1.96 × the root-mean-square residual of the
    fit on the reports: deterministic, so the report and export always agree)."""
    if joint.status != "converged":  # e.g. E pinned at 0: the law's shape is not measured
        return "extrapolated", (
            f"For a budget of {budget_flops:.3g} training FLOPs the joint fit would be "
            f"read beyond its data, but it did not converge ({joint.message}): a law with "
            "a parameter at its bound is not a prediction, so no size is recommended; "
            "search with more budget or a wider spread of sizes.")
    cols = ["flops_per_example", "examples_seen", OBJECTIVE]
    if not set(cols) <= set(history.columns):
        return "ok", ""  # nothing measured to compare with
    h = history.dropna(subset=cols)
    most = float(h["examples_seen"].max()) if len(h) else math.nan
    best = float(h[OBJECTIVE].min()) if len(h) else math.nan
    budget = f"For a budget of {budget_flops:.3g} training FLOPs"
    if math.isfinite(most) and examples > most * (1 + 1e-9):
        return "extrapolated", (
            f"{budget} the joint fit asks for {examples:.3g} training examples, "
            f"{examples / most:.3g}x the most any trial trained on ({most:.3g}): that many "
            "passes over the training split were never measured, so no size is recommended; "
            "search with a larger trial_flops, or ask for a smaller budget.")
    if math.isfinite(best) and len(h):
        resid = h[OBJECTIVE].to_numpy(float) - joint.predict(h["flops_per_example"],
                                                             h["examples_seen"])
        half = 1.96 * float(np.sqrt(np.mean(resid**2)))
        if best - loss > half:
            return "extrapolated", (
                f"{budget} the joint fit predicts {OBJECTIVE} {loss:.4g}, below the best "
                f"observed ({best:.4g}) by more than the fit's 95% interval "
                f"(±{half:.2g}): an extrapolation, not a measurement, so no size is "
                "recommended.")
    return "ok", ""


# ---- summary ------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN/inf → None, tuples → lists."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    return str(obj)


def _trial_summary(row: pd.Series) -> dict[str, Any]:
    out = {k: row[k] for k in _TRIAL_KEYS if k in row}
    out["config"] = dict(row[CONFIG_COLUMN])
    return out


def _records(df: pd.DataFrame, cols: list[str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = df[[c for c in cols if c in df]].to_dict("records")
    return records


def _frontiers(runs: SearchRuns) -> dict[str, Any]:
    out: dict[str, Any] = {}
    ids = ["run_id", "trial_id", "block"]
    for x in ("flops_per_example", "params_dense"):
        if x in runs.trials and OBJECTIVE in runs.trials:
            ok = runs.trials.dropna(subset=[x, OBJECTIVE])
            front = pareto_front(ok, x, OBJECTIVE)
            out[x] = _records(front, ids + [x, OBJECTIVE, "val_auc", RESULT_STEP])
    h = runs.history.dropna(subset=["train_flops", OBJECTIVE])
    cols = ids + ["train_flops", OBJECTIVE, "examples_seen", "flops_per_example"]
    out["train_flops"] = _records(compute_frontier(h), cols)
    out["train_flops_by_family"] = {
        str(fam): _records(compute_frontier(g), cols) for fam, g in h.groupby("block", sort=True)}
    return out


def _paired_se(a: np.ndarray, b: np.ndarray) -> float | None:
    """The standard error of ``mean(a) - mean(b)`` for losses of two models on the same
    examples: the standard deviation of the per-example differences over sqrt(n)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def validation_noise(runs: SearchRuns) -> dict[str, Any]:
    """The noise of the number ASHA compares, next to the differences it acts on.

    Every report evaluates the same fixed validation examples; ``se_median``/``se_max``
    summarise the standard error of one trial's ``val_logloss`` over the reports. For
    each ASHA milestone, ``cut_gap`` is the loss difference, at that milestone, between
    the last trial in the kept top ``1/reduction_factor`` and the first one below it
    (each trial's first report at or past the milestone): the difference ASHA acts on
    there. Because both trials are scored on the same examples, the noise of that
    difference is the *paired* standard error (``paired_se``, from the per-example
    losses each trial logs at its milestone reports), much smaller than either trial's
    own ``se`` when the two models err on the same examples; ``paired_se_median`` is the
    median over every pair of neighbours in the milestone's ranking. With many trials the
    gap between two neighbours is small by construction, so the count that matters is
    ``within_noise``: how many of the ``cut`` trials ASHA stopped there lie within two
    paired standard errors of the last trial it kept (their stop is a coin toss; the
    rest are measurably worse).
    """
    h = runs.history
    se = pd.to_numeric(h[VAL_SE], errors="coerce").dropna() if VAL_SE in h else pd.Series()
    out: dict[str, Any] = {
        "eval_examples": runs.settings.get("eval_max_examples"),
        "se_median": float(se.median()) if len(se) else None,
        "se_max": float(se.max()) if len(se) else None, "rungs": []}
    try:
        from search.settings import SearchConfig, asha_milestones

        cfg = SearchConfig.model_validate(runs.settings)
        milestones = asha_milestones(cfg.grace, cfg.reduction_factor, cfg.trial_budget)[:-1]
        rf = cfg.reduction_factor
    except (ValueError, TypeError):
        return out
    cache: dict[str, dict[int, np.ndarray]] = {}

    def losses_at(row: pd.Series) -> np.ndarray | None:
        run_id = str(row["run_id"])
        if run_id not in cache:
            cache[run_id] = milestone_losses(runs, run_id)
        return cache[run_id].get(int(row["train_flops"]))

    def paired(a: pd.Series, b: pd.Series) -> float | None:
        la, lb = losses_at(a), losses_at(b)
        return None if la is None or lb is None else _paired_se(la, lb)

    for m in milestones:
        reached = h[h["train_flops"] >= m].dropna(subset=[OBJECTIVE])
        first = (reached.sort_values("train_flops").groupby("run_id").head(1)
                 .sort_values(OBJECTIVE).reset_index(drop=True))
        losses = first[OBJECTIVE].to_numpy(dtype=float)
        keep = max(1, len(losses) // rf)
        gap = float(losses[keep] - losses[keep - 1]) if len(losses) > keep else None
        rung_se = pd.to_numeric(first.get(VAL_SE), errors="coerce").median()
        cut_se = paired(first.iloc[keep - 1], first.iloc[keep]) if gap is not None else None
        neighbours = [p for i in range(len(first) - 1)
                      if (p := paired(first.iloc[i], first.iloc[i + 1])) is not None]
        within = None
        if gap is not None and cut_se is not None:
            last_kept = first.iloc[keep - 1]
            within = 0
            for i in range(keep, len(first)):
                se_i = paired(last_kept, first.iloc[i])
                if se_i is not None and losses[i] - losses[keep - 1] < 2 * se_i:
                    within += 1
        out["rungs"].append({"milestone_flops": m, "trials": len(losses), "kept": keep,
                             "cut_gap": gap,
                             "se": None if pd.isna(rung_se) else float(rung_se),
                             "paired_se": cut_se,
                             "paired_se_median": float(np.median(neighbours))
                             if neighbours else None,
                             "cut": len(losses) - keep, "within_noise": within})
    return out


def _references(runs: SearchRuns, cap: float | None) -> dict[str, Any]:
    """The ``references`` entry of the summary (module docstring)."""
    refs = references_of(runs.trials)
    cols = ["run_id", "trial_id", "block", "status", *METRICS, VAL_SE]
    out: dict[str, Any] = {"trials": _records(refs, cols),
                           "spent_flops": float(pd.to_numeric(refs.get("train_flops"),
                                                              errors="coerce").fillna(0).sum())
                           if "train_flops" in refs else 0.0,
                           "lift": None}
    try:
        best = select_best(runs.trials, cap)
    except AnalysisError:
        return out
    lift = model_lift(runs, best).as_dict()
    lift.update({"model_trial": best.get("trial_id"), "model_block": best.get("block"),
                 "model_run_id": best.get("run_id"), "under_cap": cap})
    out["lift"] = lift
    return out


#: FLOPs-per-example bands of the equal-cost comparison: this many per decade
SEQ_BANDS_PER_DECADE = 2


def sequence_length(runs: SearchRuns) -> dict[str, Any] | None:
    """Validation loss against the behaviour-history length ``K`` (``model.seq_len``).

    Returns None when every trial reads the same ``K`` (a history-free search). Else
    ``{"by_seq_len": [...], "equal_flops": [...], "best_seq_len"}``: per ``K`` (ascending)
    the trial count and the best trial (lowest ``val_logloss`` among the trials that are
    not in error or diverged) with its AUC, standard error, FLOPs per example and
    training FLOPs; and per band of FLOPs per example (``SEQ_BANDS_PER_DECADE`` a
    decade) that holds trials of two ``K`` or more, the best loss of each ``K`` in it:
    the comparison at (near) equal serving cost, since a longer history costs more per
    example.

    Example:
        >>> import pandas as pd
        >>> from analysis.runs import runs_from_frames
        >>> t = pd.DataFrame({"run_id": ["a", "b"], "block": ["attention"] * 2,
        ...                   "model.seq_len": [0, 16], "val_logloss": [0.6, 0.5],
        ...                   "flops_per_example": [1e4, 1.2e4]})
        >>> [r["seq_len"] for r in sequence_length(runs_from_frames(t, t))["by_seq_len"]]
        [0, 16]
    """
    t = runs.trials.copy()
    if OBJECTIVE not in t or t.empty:
        return None
    t["seq_len"] = seq_lens(t)
    if t["seq_len"].nunique() < 2:
        return None
    if "status" in t:
        t = t[~t["status"].fillna("").astype(str).str.upper().isin(EXCLUDED_STATUS)]
    t = t[pd.to_numeric(t[OBJECTIVE], errors="coerce").notna()]
    cols = ["run_id", "trial_id", "block", OBJECTIVE, "val_auc", VAL_SE,
            "flops_per_example", "train_flops"]
    by_k = []
    for k, group in t.groupby("seq_len", sort=True):
        best = group.loc[pd.to_numeric(group[OBJECTIVE]).idxmin()]
        by_k.append({"seq_len": int(k), "trials": len(group),
                     **{c: best.get(c) for c in cols if c in group}})
    bands = []
    if "flops_per_example" in t:
        f = pd.to_numeric(t["flops_per_example"], errors="coerce")
        ok = t[f > 0].assign(band=np.floor(np.log10(f[f > 0]) * SEQ_BANDS_PER_DECADE))
        for band, group in ok.groupby("band", sort=True):
            if group["seq_len"].nunique() < 2:
                continue
            best = group.groupby("seq_len")[OBJECTIVE].min()
            bands.append({"flops_per_example": [10 ** (band / SEQ_BANDS_PER_DECADE),
                                                10 ** ((band + 1) / SEQ_BANDS_PER_DECADE)],
                          "best_val_logloss": {str(int(k)): float(v) for k, v in best.items()},
                          "best_seq_len": int(best.idxmin())})
    overall = min(by_k, key=lambda r: float(r[OBJECTIVE])) if by_k else None
    return {"by_seq_len": by_k, "equal_flops": bands,
            "best_seq_len": None if overall is None else overall["seq_len"]}


def _sequence_html(summary: Mapping[str, Any]) -> list[str]:
    seq = summary.get("sequence_length")
    if not seq:
        return []
    rows = [[r["seq_len"], r["trials"], r.get("trial_id"), r.get("block"), r.get(OBJECTIVE),
             r.get("val_auc"), r.get("flops_per_example"), r.get("train_flops")]
            for r in seq["by_seq_len"]]
    ks = [str(r["seq_len"]) for r in seq["by_seq_len"]]
    band_rows = [[f"{b['flops_per_example'][0]:.3g} – {b['flops_per_example'][1]:.3g}",
                  *[b["best_val_logloss"].get(k) for k in ks], b["best_seq_len"]]
                 for b in seq["equal_flops"]]
    parts = ["<h2>History length K</h2>",
             "<p>The trials differ in <code>model.seq_len</code>, the number of past "
             "interactions each example reads. A longer history costs more FLOPs per "
             "example: compare K at equal cost in the second table (bands of FLOPs per "
             "example). Figure: <code>loss_vs_seq_len.png</code>.</p>",
             _table(["K", "trials", "best trial", "family", "val log loss", "val AUC",
                     "FLOPs/example", "training FLOPs"], rows)]
    if band_rows:
        parts.append(_table(["FLOPs/example band", *[f"K={k}" for k in ks], "best K"],
                            band_rows))
    else:
        parts.append("<p>No band of FLOPs per example holds trials of two K.</p>")
    return parts


def _references_html(summary: Mapping[str, Any], budgets: str) -> list[str]:
    """The report's References section: the base rate, each reference and the best
    searched trial on the same validation examples, then the lift sentences."""
    refs = summary.get("references") or {}
    lift = refs.get("lift")
    if not refs.get("trials") and not lift:
        return ["<h2>References</h2><p>This search trained no reference models (it predates "
                "them): no lift can be stated.</p>"]
    rows: list[list[Any]] = []
    base = (lift or {}).get("base_rate")
    if base:
        rows.append(["base rate (training click rate)", base["baseline_logloss"], None,
                     base["baseline_auc"], 0.0, "–"])
    for r in refs.get("trials", []):
        rows.append([f"{r.get('block')} ({r.get('trial_id')})", r.get(OBJECTIVE), r.get(VAL_SE),
                     r.get("val_auc"), r.get("train_flops"), r.get("status")])
    parts = ["<h2>References</h2>",
             f"<p>For the search's budget ({html.escape(budgets)}): before its trials, the "
             "search trained a logistic regression (<code>logreg</code>) and a factorization "
             "machine (<code>fm</code>) on the same split, by the same loop, for at most a "
             "few epochs; their FLOPs are part of the spend. Every number is on the same "
             "fixed validation examples as the trials.</p>",
             _table(["model", "val log loss", "SE", "val AUC", "training FLOPs", "status"],
                    rows)]
    if lift:
        cap = lift.get("under_cap")
        which = f" under the serving cap {_fmt(cap)}" if cap is not None else ""
        parts += [f"<h3>Lift of the best searched trial{which}: {_fmt(lift.get('model_block'))}"
                  f" trial {_fmt(lift.get('model_trial'))}</h3>",
                  "<p>Lift in val log loss is the baseline's minus the model's (positive: "
                  "the model is better); in AUC the model's minus the baseline's. It counts "
                  f"beyond {_fmt(lift.get('significance_se'))} standard errors.</p>",
                  "<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in lift["sentences"])
                  + "</ul>"]
    return parts


def _try(fn: Any, *args: Any) -> dict[str, Any]:
    try:
        result = fn(*args)
    except AnalysisError as err:
        return {"error": str(err)}
    return result.as_dict() if hasattr(result, "as_dict") else _trial_summary(result)


def _recommendation(runs: SearchRuns, fits: ScalingFits, cap: float | None,
                    budget: float | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"best_overall": _try(select_best, runs.trials),
                           "best_under_cap": None, "compute_optimal": None,
                           "compute_optimal_under_cap": None}
    if cap is not None:
        rec["best_under_cap"] = _try(select_best, runs.trials, cap)
    if budget is not None:
        rec["compute_optimal"] = _try(recommend_size, fits.joint, runs.history, budget)
        if cap is not None:
            rec["compute_optimal_under_cap"] = _try(recommend_size, fits.joint, runs.history,
                                                    budget, cap)
    return rec


# ---- HTML ---------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _val_ci(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def _with_ci(fit: Mapping[str, Any], name: str) -> str:
    return _val_ci(fit.get(name), fit.get("ci95", {}).get(name))


def run_url(ui_url: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The MLflow UI page of one run (machine-learning mode), or None without ids."""
    if not experiment_id or not run_id:
        return None
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _link(text: Any, url: str | None) -> str:
    return f"<a href='{html.escape(url)}'>{_fmt(text)}</a>" if url else _fmt(text)


def _raw_table(header: list[str], rows: list[list[str]]) -> str:
    """A table of cells already HTML (links)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _budget_line(summary: Mapping[str, Any]) -> str:
    s = summary["settings"]
    parts = [f"search budget {_fmt(s.get('search_budget_flops'))} training FLOPs (spent "
             f"{_fmt(s.get('spent_flops'))})",
             f"per trial at most {_fmt(s.get('trial_flops'))} FLOPs (ASHA's max_t)"]
    if s.get("max_flops_per_example") is not None:
        parts.append(f"serving cap {_fmt(s['max_flops_per_example'])} FLOPs/example")
    return "; ".join(parts)


def _data_line(data: Mapping[str, Any]) -> str:
    """The splits the search trained and compared on: rows and positives of each."""
    splits = data.get("splits") or {}
    if not splits:
        return ""
    parts = [f"{html.escape(str(name))} {int(st['rows'])} rows ({int(st['positives'])} "
             f"positives, {100 * float(st['base_rate']):.2f}%)" for name, st in splits.items()]
    return f"<p>Data [{html.escape(str(data.get('fingerprint', '?')))}]: {', '.join(parts)}.</p>"


def _html(runs: SearchRuns, summary: dict[str, Any], divs: list[str], out: Path,
          images: list[Path], ui_url: str, references: pd.DataFrame | None = None) -> Path:
    rec = summary["recommendation"]
    settings = summary["settings"]

    def rows(pairs: tuple[tuple[str, str], ...], cells: Any, width: int) -> list[list[Any]]:
        """One table row per present recommendation; an error fills the row's 2nd cell."""
        out = []
        for key, label in pairs:
            r = rec.get(key)
            if r is not None:
                out.append([label, r["error"], *[None] * (width - 2)] if "error" in r
                           else [label, *cells(r)])
        return out

    def url(run_id: Any) -> str | None:
        return run_url(ui_url, runs.experiment_id, None if run_id is None else str(run_id))

    trial_rows = rows((("best_overall", "best trial"), ("best_under_cap", "best under the cap")),
                      lambda r: [r.get("trial_id"), r.get("block"), r.get(OBJECTIVE),
                                 r.get("val_auc"), r.get("train_flops"),
                                 r.get("flops_per_example"), r.get("params_dense")], 8)
    size_rows = rows((("compute_optimal", "no serving cap"),
                      ("compute_optimal_under_cap", "under the serving cap")),
                     lambda r: [r["budget_flops"],
                                _val_ci(r["flops_per_example"], r["ci95"]["flops_per_example"]),
                                _val_ci(r["examples"], r["ci95"]["examples"]),
                                r["predicted_val_logloss"], r["limited_by"], r["warning"]]
                     if r.get("status", "ok") == "ok"  # outside what was measured: no answer
                     else [r["budget_flops"], f"{r['status']}: {r['message']}", None, None,
                           None, None], 7)
    fits = summary["fits"]
    fit_rows = []
    named = [("L(C), compute frontier", fits["power_law"]["frontier"])]
    named += [(f"L(C), {fam}", f) for fam, f in fits["power_law"]["by_family"].items()]
    named.append(("L(N, D), joint", fits["joint"]))
    for name, f in named:
        fit_rows.append([name, f["status"], _with_ci(f, "E"), _with_ci(f, "A"),
                         _with_ci(f, "alpha"), _with_ci(f, "B"), _with_ci(f, "beta"), f["r2"],
                         f["message"]])
    fams = ", ".join(f"{k} ({v})" for k, v in summary["families"].items())
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:left}"
             "th{background:#f3f3f3}pre{background:#f7f7f7;padding:.6em;font-size:12px}")
    budgets = _budget_line(summary)
    parts = [
        f"<h1>recscale report: {html.escape(runs.name)}</h1>",
        f"<p>{summary['n_trials']} trials, {summary['n_reports']} reports; families: "
        f"{html.escape(fams)}. Loss is validation log loss in nats (lower is better); "
        "costs in FLOPs (a multiply-add is 2 FLOPs; training spends 3× the forward cost "
        "per example). A trial's result is its <b>last report</b>: every number in a "
        "trial's row (loss, AUC, training FLOPs) is from that one report, as in Ray's "
        f"table and MLflow.</p><p>Budgets: {html.escape(budgets)}.</p>",
        _data_line(summary.get("data") or {}),
        "<h2>Recommendation</h2>",
        f"<p>For the search's budget ({html.escape(budgets)}):</p>",
        _table(["", "trial", "family", "val log loss", "val AUC", "at training FLOPs",
                "FLOPs/example", "dense params"], trial_rows),
    ]
    best = rec.get("best_under_cap") or rec.get("best_overall") or {}
    if "config" in best:
        link = _link(f"run {best.get('run_id')}", url(best.get("run_id")))
        parts += [f"<h3>Winning config: {_fmt(best.get('block'))} trial "
                  f"{_fmt(best.get('trial_id'))} ({link})</h3>",
                  f"<p>It used {_fmt(best.get('train_flops'))} training FLOPs "
                  f"({_fmt(best.get('examples_seen'))} examples at "
                  f"{_fmt(best.get('flops_per_example'))} FLOPs/example) of the "
                  f"{_fmt(settings.get('trial_flops'))} one trial may spend, within the "
                  f"search's {_fmt(settings.get('search_budget_flops'))}. "
                  "<code>recscale export</code> writes it as <code>best.yaml</code>.</p>",
                  "<pre>" + html.escape(json.dumps(best["config"], indent=1)) + "</pre>"]
    if size_rows:
        budget = settings.get("budget_flops")
        search_budget = settings.get("search_budget_flops")
        ratio = (f" = {budget / search_budget:.3g}× the search's budget"
                 if isinstance(budget, float | int) and search_budget else "")
        parts += [f"<h3>Compute-optimal size for a training budget of {_fmt(budget)} FLOPs"
                  f"{ratio} (joint fit, C = 3·N·D)</h3>",
                  _table(["", "budget (FLOPs)", "N* FLOPs/example [95% CI]",
                          "D* examples [95% CI]", "predicted loss", "limited by", "warning"],
                         size_rows)]
    parts += _references_html(summary, budgets)
    parts += _sequence_html(summary)
    refs = references if references is not None else runs.trials.iloc[0:0]
    ordered = pd.concat([runs.trials, refs]).sort_values(OBJECTIVE, na_position="last",
                                                         kind="mergesort")
    ref_ids = set(refs["run_id"]) if "run_id" in refs else set()
    trial_table = [[_link(r.get("trial_id"), url(r.get("run_id"))),
                    _fmt(r.get("block")) + (" (reference)" if r.get("run_id") in ref_ids else ""),
                    _fmt(r.get("status")), _fmt(r.get(OBJECTIVE)), _fmt(r.get("val_auc")),
                    _fmt(r.get("train_flops")), _fmt(r.get("flops_per_example"))]
                   for _, r in ordered.iterrows()]
    parts += ["<h2>Trials</h2>",
              f"<p>Each linked to its MLflow run; for the search's budget ({html.escape(budgets)})."
              " The reference models are listed too, marked.</p>",
              _raw_table(["trial", "family", "status", "val log loss", "val AUC",
                          "training FLOPs", "FLOPs/example"], trial_table)]
    noise = summary.get("validation") or {}
    if noise.get("se_median") is not None:
        rung_rows = []
        for r in noise["rungs"]:
            # the noise of the gap: the paired SE when both trials' losses were logged
            gap_se = r.get("paired_se") if r.get("paired_se") is not None else r["se"]
            rung_rows.append([r["milestone_flops"], r["trials"], r["kept"], r["cut_gap"],
                              r["se"], r.get("paired_se"), r.get("paired_se_median"),
                              None if r["cut_gap"] is None or gap_se is None
                              else ("yes" if gap_se < r["cut_gap"] else "NO"),
                              None if r.get("within_noise") is None
                              else f"{r['within_noise']} of {r['cut']}"])
        noisy = [r for r in rung_rows if r[-2] == "NO"]
        parts += ["<h2>Validation noise</h2>",
                  f"<p>For the search's budget ({html.escape(budgets)}).</p>",
                  f"<p>Every report evaluates the same {_fmt(noise.get('eval_examples'))} "
                  "validation examples (the first of the split; all of it when unset). The "
                  f"standard error of one trial's val log loss is {noise['se_median']:.2g} "
                  f"(median over reports; at most {noise['se_max']:.2g}). ASHA compares two "
                  "trials scored on the same examples, so the noise of the gap it cuts at is "
                  "the <i>paired</i> standard error of the difference (from the per-example "
                  "losses each trial logs at its milestones), shown beside the gap between "
                  "the last trial kept and the first one stopped at each milestone.</p>",
                  _table(["milestone (training FLOPs)", "trials reaching it", "kept",
                          "loss gap at the cut", "SE of one trial's loss",
                          "paired SE of the gap", "paired SE, median over neighbours",
                          "SE below the gap", "stopped within 2 paired SE of the last kept"],
                         rung_rows)]
        if noisy:
            parts.append(f"<p><b>Warning:</b> at {len(noisy)} milestone(s) the standard error "
                         "of the gap exceeds the gap ASHA cut at: those decisions are within "
                         "the noise; evaluate on more validation examples "
                         "(eval_max_examples).</p>")
    parts += ["<h2>Scaling fits</h2>",
              "<p>L(C) = E + A·C<sup>−α</sup>; L(N, D) = E + A·N<sup>−α</sup> + "
              "B·D<sup>−β</sup>. Intervals: 95% bootstrap.</p>",
              _table(["fit", "status", "E", "A", "α", "B", "β", "R²", "message"], fit_rows),
              "<h2>Figures</h2>", *divs,
              *[f"<p><img alt='{html.escape(p.stem)}' style='max-width:100%' "
                f"src='{html.escape(p.name)}'></p>" for p in images],
              "<details><summary>summary.json</summary><pre>"
              + html.escape(json.dumps(summary, indent=2)) + "</pre></details>"]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>recscale report: "
            f"{html.escape(runs.name)}</title><style>{style}</style>"
            f"<script src='{PLOTLY_JS}'></script></head><body>"
            + "\n".join(parts) + "</body></html>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def build_report(runs: SearchRuns, out_dir: str | Path, max_flops_per_example: float | None = None,
                 budget_flops: float | None = None, n_boot: int = 200, seed: int = 0,
                 ui_url: str = DEFAULT_UI_URL) -> ReportResult:
    """Frontiers, fits and the recommendation of ``runs``, written to ``out_dir``.

    Args:
        runs: the search (:func:`analysis.load_search` or :func:`analysis.runs_from_frames`).
        out_dir: created if needed.
        max_flops_per_example: the serving cap (best trial and compute-optimal size under it).
        budget_flops: a training budget to size the compute-optimal model for.
        n_boot: bootstrap resamples of the ``L(C)`` fits (half as many for the joint fit).
        seed: bootstrap seed.
        ui_url: the MLflow UI the report's trial links point at (``recscale ui``).

    Raises:
        AnalysisError: no trial has a validation loss.

    Example::

        res = build_report(load_search("ml-unified"), "reports/ml-unified",
                           max_flops_per_example=2e6, budget_flops=1e16)
        res.summary["recommendation"]["compute_optimal_under_cap"]
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    everything, runs = runs, without_references(runs)
    refs = references_of(everything.trials)
    select_best(runs.trials)  # fail early, in one line, when nothing can be reported
    fits = fit_search(runs, n_boot, n_boot // 2, seed)
    status = runs.trials["status"].fillna("unknown") if "status" in runs.trials else None
    summary: dict[str, Any] = {
        "search": runs.name, "parent_run_id": runs.parent_run_id,
        "n_trials": len(runs.trials), "n_reports": len(runs.history),
        "families": runs.trials["block"].value_counts().sort_index().to_dict(),
        "trial_status": {} if status is None else status.value_counts().sort_index().to_dict(),
        "settings": {"max_flops_per_example": max_flops_per_example,
                     "budget_flops": budget_flops, "extrapolation_limit": EXTRAPOLATION,
                     "search_budget_flops": runs.settings.get("budget_flops"),
                     "trial_flops": runs.settings.get("trial_flops"),
                     "spent_flops": float(everything.trials["train_flops"].fillna(0).sum())
                     if "train_flops" in everything.trials else None,
                     "result_report": RESULT_REPORT},
        "frontier": _frontiers(runs),
        "fits": {"power_law": {"frontier": fits.frontier.as_dict(),
                               "by_family": {k: v.as_dict() for k, v in fits.by_family.items()}},
                 "joint": fits.joint.as_dict()},
        "recommendation": _recommendation(runs, fits, max_flops_per_example, budget_flops),
        "validation": validation_noise(runs),
        "references": _references(everything, max_flops_per_example),
        "data": runs.data,
    }
    seq = sequence_length(runs)
    if seq is not None:  # only then, so a history-free search's summary reads as before
        summary["sequence_length"] = seq
    summary = _jsonable(summary)
    largest = float(runs.history["flops_per_example"].max())
    reach = EXTRAPOLATION * largest if math.isfinite(largest) else None
    files = png_figures(runs, out, fits.frontier, fits.by_family, fits.joint,
                        max_flops_per_example, budget_flops, reach)
    if seq is not None:
        files.append(sequence_png(runs, out))
    divs = html_figures(runs, fits.frontier, fits.by_family, max_flops_per_example)
    files.append(write_plotly_js(out))
    files.append(_html(runs, summary, divs, out, [p for p in files if p.stem == "joint_fit"],
                       ui_url, refs))
    summary["files"] = [p.name for p in files] + ["summary.json"]
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    files.append(path)
    return ReportResult(out, files, summary)


def log_report_to_mlflow(result: ReportResult, parent_run_id: str,
                         tracking_uri: str | None = None) -> None:
    """Attach the report's files to the search's parent run (artifact folder ``report``)."""
    from mlflow.tracking import MlflowClient

    from trainers.tracking import log_files

    log_files(MlflowClient(tracking_uri), parent_run_id, list(result.files), artifact_path="report")
