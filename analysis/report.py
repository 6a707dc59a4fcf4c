"""The analysis report of a search: frontiers, fits, recommendation; PNG, HTML, JSON.

``build_report`` writes into ``out_dir``:

* ``loss_vs_flops_per_example.png``, ``loss_vs_params.png``, ``loss_vs_train_flops.png``
  (log x axes, one colour per family, Pareto frontier drawn, ``L(C)`` fits on the last);
* ``report.html``: the same plots, interactive (plotly, self-contained), with the fits
  and the recommendation;
* ``summary.json``: frontier points, fits with intervals and status, the best trial
  overall and under the serving cap, and the compute-optimal (N*, D*) for a budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.fits import JointFit, PowerLawFit, fit_joint, fit_power_law
from analysis.frontier import compute_frontier, pareto_front
from analysis.runs import AnalysisError, SearchRuns

__all__ = ["ReportResult", "build_report", "log_report_to_mlflow", "select_best"]

EXTRAPOLATION = 10.0  # how far beyond the largest trained model a recommendation may reach
FAMILY_COLORS = {"attention": "#1f77b4", "tokenmixer": "#ff7f0e", "wukong": "#2ca02c",
                 "unimixing": "#d62728", "unimixing_lite": "#9467bd"}
PLOTS = (  # (x column, axis label, file stem, source)
    ("flops_per_example", "forward FLOPs per example (FLOPs)", "loss_vs_flops_per_example", "trials"),
    ("params_dense", "dense parameters (count)", "loss_vs_params", "trials"),
    ("train_flops", "training compute spent (FLOPs)", "loss_vs_train_flops", "history"),
)


def _color(family: str) -> str:
    return FAMILY_COLORS.get(family, "#7f7f7f")


@dataclass(frozen=True)
class ReportResult:
    out_dir: Path
    files: list[Path]
    summary: dict[str, Any]


def select_best(trials: pd.DataFrame, max_flops_per_example: float | None = None) -> pd.Series:
    """The trial with the lowest ``best_val_logloss`` (else ``val_logloss``) under the cap."""
    col = "best_val_logloss" if "best_val_logloss" in trials else "val_logloss"
    ok = trials.dropna(subset=[col])
    if max_flops_per_example is not None:
        ok = ok[ok["flops_per_example"] <= max_flops_per_example]
    if ok.empty:
        cap = "" if max_flops_per_example is None else f" under max_flops_per_example={max_flops_per_example:.3g}"
        raise AnalysisError(f"no trial with a validation loss{cap}")
    return ok.loc[ok[col].idxmin()]


def _fit_dict(fit: PowerLawFit | JointFit) -> dict[str, Any]:
    d = asdict(fit)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _trial_summary(row: pd.Series) -> dict[str, Any]:
    keys = ["run_id", "trial_id", "block", "val_logloss", "best_val_logloss", "val_auc",
            "flops_per_example", "params_dense", "train_flops", "examples_seen"]
    return {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in keys if k in row}


def _fits(runs: SearchRuns) -> tuple[dict[str, PowerLawFit], JointFit]:
    h = runs.history.dropna(subset=["train_flops", "val_logloss"])
    h = h[h["train_flops"] > 0]
    per_family = {}
    for fam, g in h.groupby("block"):
        front = compute_frontier(g)
        per_family[str(fam)] = fit_power_law(front["train_flops"].to_numpy(),
                                             front["val_logloss"].to_numpy(), n_boot=100)
    joint = fit_joint(h["flops_per_example"].to_numpy(), h["examples_seen"].to_numpy(),
                      h["val_logloss"].to_numpy(), n_boot=50)
    return per_family, joint


def _png(runs: SearchRuns, fits: dict[str, PowerLawFit], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for x, label, stem, source in PLOTS:
        df = runs.trials if source == "trials" else runs.history
        y = "best_val_logloss" if source == "trials" and "best_val_logloss" in df else "val_logloss"
        df = df.dropna(subset=[x, y])
        df = df[df[x] > 0]
        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
        for fam, g in df.groupby("block"):
            ax.scatter(g[x], g[y], s=14 if source == "history" else 28, alpha=0.45 if source == "history" else 0.8,
                       color=_color(str(fam)), label=str(fam))
        front = pareto_front(df, x, y)
        if len(front):
            ax.step(front[x], front[y], where="post", color="black", lw=1.5, label="Pareto frontier")
        if source == "history":
            for fam, fit in fits.items():
                if fit.ok:
                    g = df[df["block"] == fam]
                    cs = np.logspace(np.log10(g[x].min()), np.log10(g[x].max()), 100)
                    bound = " (at bound)" if fit.status == "hit_bound" else ""
                    ax.plot(cs, fit.predict(cs), "--", color=_color(fam), lw=1.5,
                            label=f"{fam} fit α={fit.alpha:.3f}{bound}")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation log loss (nats)")
        ax.set_title(f"{runs.name}: validation log loss vs {label.split(' (')[0]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    return files


def _html(runs: SearchRuns, fits: dict[str, PowerLawFit], summary: dict[str, Any], out: Path) -> Path:
    import plotly.graph_objects as go

    parts = [f"<h1>recscale report: {runs.name}</h1>",
             f"<p>{len(runs.trials)} trials; families: {', '.join(sorted(runs.trials['block'].dropna().unique()))}</p>",
             "<h2>Recommendation</h2><pre>" + json.dumps(summary["recommendation"], indent=2) + "</pre>"]
    first = True
    for x, label, _stem, source in PLOTS:
        df = runs.trials if source == "trials" else runs.history
        y = "best_val_logloss" if source == "trials" and "best_val_logloss" in df else "val_logloss"
        df = df.dropna(subset=[x, y])
        df = df[df[x] > 0]
        fig = go.Figure()
        for fam, g in df.groupby("block"):
            fig.add_scatter(x=g[x], y=g[y], mode="markers", name=str(fam),
                            marker={"color": _color(str(fam))},
                            text=g.get("trial_id"), hovertemplate="%{text}<br>x=%{x:.3g}<br>loss=%{y:.4f}")
        front = pareto_front(df, x, y)
        fig.add_scatter(x=front[x], y=front[y], mode="lines", line={"shape": "hv", "color": "black"},
                        name="Pareto frontier")
        if source == "history":
            for fam, fit in fits.items():
                if fit.ok:
                    g = df[df["block"] == fam]
                    cs = np.logspace(np.log10(g[x].min()), np.log10(g[x].max()), 100)
                    fig.add_scatter(x=cs, y=fit.predict(cs), mode="lines", name=f"{fam} fit",
                                    line={"dash": "dash", "color": _color(fam)})
        fig.update_layout(xaxis_type="log", xaxis_title=label, yaxis_title="validation log loss (nats)",
                          title=f"validation log loss vs {label}", height=480)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
        first = False
    parts.append("<h2>Scaling fits</h2><pre>" + json.dumps(summary["fits"], indent=2) + "</pre>")
    path = out / "report.html"
    path.write_text("<html><head><meta charset='utf-8'><title>recscale report</title></head><body>"
                    + "\n".join(parts) + "</body></html>")
    return path


def build_report(runs: SearchRuns, out_dir: str | Path, max_flops_per_example: float | None = None,
                 budget_flops: float | None = None) -> ReportResult:
    """Frontiers, fits and the recommendation of ``runs``, written to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_family, joint = _fits(runs)
    best = select_best(runs.trials)
    rec: dict[str, Any] = {"best_overall": _trial_summary(best)}
    if max_flops_per_example is not None:
        try:
            rec["best_under_cap"] = _trial_summary(select_best(runs.trials, max_flops_per_example))
        except AnalysisError as err:
            rec["best_under_cap"] = {"error": str(err)}
    if budget_flops is not None:
        if joint.ok:
            reach = EXTRAPOLATION * float(runs.history["flops_per_example"].max())
            n, d, loss = joint.compute_optimal(budget_flops, reach)
            rec["compute_optimal"] = {"budget_flops": budget_flops, "flops_per_example": n,
                                      "examples": d, "predicted_val_logloss": loss,
                                      "note": f"model size searched up to {EXTRAPOLATION}x the largest trained"}
            if max_flops_per_example is not None:
                n, d, loss = joint.compute_optimal(budget_flops, min(reach, max_flops_per_example))
                rec["compute_optimal_under_cap"] = {
                    "budget_flops": budget_flops, "max_flops_per_example": max_flops_per_example,
                    "flops_per_example": n, "examples": d, "predicted_val_logloss": loss}
        else:
            rec["compute_optimal"] = {"error": f"joint fit {joint.status}: {joint.message}"}
    frontier = {
        x: pareto_front(runs.trials.dropna(subset=[x]), x,
                        "best_val_logloss" if "best_val_logloss" in runs.trials else "val_logloss")
        [["trial_id", "block", x]].to_dict("records")
        for x in ("flops_per_example", "params_dense") if x in runs.trials
    }
    summary = {"search": runs.name, "n_trials": len(runs.trials), "frontier": frontier,
               "fits": {"power_law_by_family": {k: _fit_dict(v) for k, v in per_family.items()},
                        "joint": _fit_dict(joint)},
               "recommendation": rec}
    files = _png(runs, per_family, out)
    files.append(_html(runs, per_family, summary, out))
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    files.append(path)
    return ReportResult(out, files, summary)


def log_report_to_mlflow(result: ReportResult, parent_run_id: str, tracking_uri: str) -> None:
    """Attach the report's files to the search's parent run (artifact folder ``report``)."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).log_artifacts(parent_run_id, str(result.out_dir), artifact_path="report")
