"""Figures of a search: static PNGs (matplotlib) and interactive plotly figures.

Every figure plots validation log loss (nats) against a cost on a log axis, one colour
and marker per block family (the same in every figure and in the HTML report), the
Pareto frontier as a black staircase, and the fitted scaling laws as dashed curves:

* ``loss_vs_flops_per_example.png``: best loss per trial vs forward FLOPs per example
  (serving cost; the serving cap shaded);
* ``loss_vs_params.png``: best loss per trial vs dense parameters;
* ``loss_vs_train_flops.png``: every report of every trial (learning curves) vs training
  compute spent, the compute-efficient frontier and its ``L(C) = E + A·C^(−α)`` fits;
* ``joint_fit.png``: the joint law ``L(N, D)``: observed vs predicted loss, and the loss
  it predicts at the compute-optimal size for each budget;
* ``loss_vs_seq_len.png`` (only for a search whose trials differ in ``model.seq_len``):
  best loss per trial vs FLOPs per example, one colour per history length ``K``, and the
  best loss of each ``K``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis.fits import JointFit, PowerLawFit
from analysis.frontier import compute_frontier, pareto_front
from analysis.runs import SearchRuns
from trainers.contracts import OBJECTIVE

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["FAMILY_COLORS", "PLOTS", "PlotSpec", "family_color", "family_marker",
           "PLOTLY_JS", "html_figures", "png_figures", "seq_lens", "sequence_png",
           "write_plotly_js"]

# Okabe–Ito: distinguishable with the common colour-vision deficiencies
FAMILY_COLORS = {"attention": "#0072B2", "tokenmixer": "#E69F00", "wukong": "#009E73",
                 "unimixing": "#D55E00", "unimixing_lite": "#CC79A7"}
_EXTRA_COLORS = ("#56B4E9", "#F0E442", "#7F7F7F", "#8C564B", "#17BECF")
FAMILY_MARKERS = {"attention": "o", "tokenmixer": "s", "wukong": "^", "unimixing": "D",
                  "unimixing_lite": "v"}
_PLOTLY_SYMBOLS = {"o": "circle", "s": "square", "^": "triangle-up", "D": "diamond",
                   "v": "triangle-down", "P": "cross"}
_BAD_STATUS = ("ERROR", "DIVERGED")
Y_LABEL = "validation log loss (nats, lower is better)"


@dataclass(frozen=True)
class PlotSpec:
    """One loss-vs-cost figure: the x column, whether points are trials (best loss of
    each) or reports (the history), the axis label with its unit, the file stem."""

    x: str
    source: str  # "trials" | "history"
    label: str
    stem: str


PLOTS = (
    PlotSpec("flops_per_example", "trials", "forward FLOPs per example (FLOPs, log scale)",
             "loss_vs_flops_per_example"),
    PlotSpec("params_dense", "trials", "dense parameters (count, log scale)", "loss_vs_params"),
    PlotSpec("train_flops", "history", "training compute spent (FLOPs, log scale)",
             "loss_vs_train_flops"),
)


def family_color(family: str) -> str:
    """The family's colour (a stable grey-ish fallback for unknown families)."""
    if family in FAMILY_COLORS:
        return FAMILY_COLORS[family]
    return _EXTRA_COLORS[sum(map(ord, family)) % len(_EXTRA_COLORS)]


def family_marker(family: str) -> str:
    """The family's matplotlib marker."""
    return FAMILY_MARKERS.get(family, "P")


def _points(runs: SearchRuns, spec: PlotSpec) -> tuple[pd.DataFrame, str]:
    """Rows to plot and the loss column (non-missing, cost > 0)."""
    df = runs.trials if spec.source == "trials" else runs.history
    y = OBJECTIVE  # a trial's result is its last report (trainers.contracts.RESULT_REPORT)
    if spec.x not in df or y not in df:
        return df.iloc[:0], y
    df = df.dropna(subset=[spec.x, y])
    df = df[(df[spec.x] > 0) & np.isfinite(df[y].astype(float))]
    return df, y


def _ylim(y: np.ndarray) -> tuple[float, float, int]:
    """A y range that shows every point unless a few diverged ones would flatten the
    rest: then the top is clipped (and the number of hidden points returned)."""
    lo, hi = float(np.min(y)), float(np.max(y))
    med = float(np.median(y))
    top = hi if hi <= med + 4 * (med - lo) + 1e-12 else med + 4 * (med - lo)
    pad = 0.05 * max(top - lo, 1e-3)
    return lo - pad, top + pad, int(np.sum(y > top))


def _staircase(front: pd.DataFrame, x: str, y: str, x_end: float) -> tuple[np.ndarray, np.ndarray]:
    """The frontier as a step function, held to the right edge of the data."""
    xs = np.append(front[x].to_numpy(dtype=float), x_end)
    ys = np.append(front[y].to_numpy(dtype=float), float(front[y].iloc[-1]))
    return xs, ys


def _count_label(family: str, n: int) -> str:
    return f"{family} ({n} trial{'' if n == 1 else 's'})"


def _log_ticks(ax: Axes) -> None:
    """Label some minor ticks too when the axis spans few decades (else one or two
    labels for the whole axis)."""
    from matplotlib.ticker import LogFormatterSciNotation

    ax.xaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False,
                                                         minor_thresholds=(2.5, 1.2)))
    ax.tick_params(axis="x", which="minor", labelsize=7)


def _fit_label(name: str, fit: PowerLawFit) -> str:
    ci = fit.ci.get("alpha")
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    flag = ", at a bound" if fit.status == "hit_bound" else ""
    return f"{name}: α={fit.alpha:.3f}{interval}, E={fit.E:.3f}{flag}"


def _fit_curves(runs: SearchRuns, frontier_fit: PowerLawFit | None,
                family_fits: Mapping[str, PowerLawFit]
                ) -> list[tuple[str, str, str, np.ndarray, np.ndarray]]:
    """(label, family or "", colour, C, L(C)) of each usable fit, over the C range of the
    frontier it was fitted to."""
    h = runs.history.dropna(subset=["train_flops", OBJECTIVE])
    h = h[h["train_flops"] > 0]
    out = []
    fits: list[tuple[str, str, PowerLawFit | None, pd.DataFrame]] = [
        ("all families", "", frontier_fit, h)]
    fits += [(fam, fam, fit, h[h["block"] == fam]) for fam, fit in sorted(family_fits.items())]
    for name, fam, fit, g in fits:
        if fit is None or not fit.ok or g.empty:
            continue
        cs = np.geomspace(float(g["train_flops"].min()), float(g["train_flops"].max()), 200)
        colour = family_color(fam) if fam else "black"
        out.append((_fit_label(name, fit), fam, colour, cs, fit.predict(cs)))
    return out


def _optimal_curve(joint: JointFit, c_lo: float, c_hi: float, max_n: float | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    cs = np.geomspace(c_lo, c_hi, 40)
    ls = np.array([joint.compute_optimal(c, max_n)[2] for c in cs])
    return cs, ls


# ---- matplotlib ---------------------------------------------------------------------


def _scatter_families(ax: Axes, df: pd.DataFrame, x: str, y: str, history: bool) -> None:
    for fam, g in df.groupby("block", sort=True):
        fam = str(fam)
        colour, marker = family_color(fam), family_marker(fam)
        if history:
            for _, run in g.groupby("run_id", sort=False):
                run = run.sort_values(x)
                ax.plot(run[x], run[y], "-", color=colour, lw=0.8, alpha=0.45, zorder=2)
            ax.scatter(g[x], g[y], s=12, marker=marker, color=colour, alpha=0.6,
                       label=_count_label(fam, g["run_id"].nunique()), zorder=3,
                       edgecolors="none")
            continue
        bad = g["status"].isin(_BAD_STATUS) if "status" in g else pd.Series(False, g.index)
        ax.scatter(g.loc[~bad, x], g.loc[~bad, y], s=42, marker=marker, color=colour,
                   alpha=0.85, label=_count_label(fam, len(g)), zorder=3,
                   edgecolors="white", linewidths=0.5)
        if bad.any():
            ax.scatter(g.loc[bad, x], g.loc[bad, y], s=42, marker="x", color=colour,
                       alpha=0.85, zorder=3, label=f"{fam}: ERROR/DIVERGED (×)")


def _png(runs: SearchRuns, spec: PlotSpec, out: Path, frontier_fit: PowerLawFit | None,
         family_fits: Mapping[str, PowerLawFit], max_flops_per_example: float | None) -> Path:
    import matplotlib.pyplot as plt

    df, y = _points(runs, spec)
    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=110, layout="constrained")
    history = spec.source == "history"
    ax.set_xscale("log")  # before anything is drawn, so spans and limits are in log space
    if df.empty:
        ax.text(0.5, 0.5, f"no trial reported both {spec.x} and {y}", ha="center",
                va="center", transform=ax.transAxes)
    else:
        _scatter_families(ax, df, spec.x, y, history)
        x_end = float(df[spec.x].max())
        front = (compute_frontier(df, x=spec.x, y=y) if history
                 else pareto_front(df, spec.x, y))
        xs, ys = _staircase(front, spec.x, y, x_end)
        ax.step(xs, ys, where="post", color="black", lw=1.8, zorder=4,
                label="Pareto frontier (best loss at ≤ cost)")
        if history:
            for label, _fam, colour, cs, ls in _fit_curves(runs, frontier_fit, family_fits):
                ax.plot(cs, ls, "--", color=colour, lw=2.2 if colour == "black" else 1.6,
                        zorder=5, label=f"fit {label}")
            if frontier_fit is not None and not frontier_fit.ok:
                ax.text(0.01, 0.01, f"no L(C) fit of the frontier: {frontier_fit.status} "
                        f"({frontier_fit.message})", transform=ax.transAxes, fontsize=7.5,
                        color="dimgray", ha="left", va="bottom", wrap=True)
        lo, hi, hidden = _ylim(df[y].to_numpy(dtype=float))
        ax.set_ylim(lo, hi)
        if hidden:
            ax.text(0.99, 0.99, f"{hidden} point(s) above the top edge", ha="right",
                    va="top", transform=ax.transAxes, fontsize=8, color="dimgray")
        left, right = float(df[spec.x].min()) / 1.4, x_end * 1.4
        if spec.x == "flops_per_example" and max_flops_per_example is not None:
            right = max(right, max_flops_per_example * 2.0)
            ax.axvspan(max_flops_per_example, right, color="0.92", zorder=0,
                       label=f"over the serving cap ({max_flops_per_example:.3g} FLOPs/example)")
            ax.axvline(max_flops_per_example, color="dimgray", ls=":", lw=1.5, zorder=1)
        ax.set_xlim(left, right)
        _log_ticks(ax)
    ax.set_xlabel(spec.label)
    ax.set_ylabel(Y_LABEL)
    what = "every report of every trial" if history else "best validation loss of each trial"
    ax.set_title(f"search {runs.name!r}: {what}", fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = out / f"{spec.stem}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _joint_png(runs: SearchRuns, joint: JointFit, out: Path, budget_flops: float | None,
               max_n: float | None, cap: float | None) -> Path:
    import matplotlib.pyplot as plt

    h = runs.history.dropna(subset=["flops_per_example", "examples_seen", OBJECTIVE])
    h = h[(h["flops_per_example"] > 0) & (h["examples_seen"] > 0)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), dpi=110, layout="constrained")
    if joint.ok and not h.empty:
        pred = joint.predict(h["flops_per_example"], h["examples_seen"])
        for fam, idx in h.groupby("block", sort=True).groups.items():
            left.scatter(pred[h.index.get_indexer(idx)], h.loc[idx, OBJECTIVE], s=14,
                         marker=family_marker(str(fam)), color=family_color(str(fam)),
                         alpha=0.7, label=str(fam), edgecolors="none")
        both = np.concatenate([pred, h[OBJECTIVE].to_numpy(dtype=float)])
        lo, hi, _ = _ylim(both)
        left.plot([lo, hi], [lo, hi], color="black", lw=1, label="observed = predicted")
        left.set_xlim(lo, hi)
        left.set_ylim(lo, hi)
        left.legend(fontsize=8, loc="upper left", frameon=False)
        c_lo, c_hi = float(h["train_flops"].min()), float(h["train_flops"].max())
        if budget_flops is not None:
            c_hi = max(c_hi, budget_flops)
        bound = "" if max_n is None else f", N ≤ {max_n:.3g}"
        limits = [(max_n, "--", "black", f"joint fit at the optimal size N*(C){bound}")]
        if cap is not None and (max_n is None or cap < max_n):  # else the same curve twice
            capped = cap
            limits.append((capped, ":", "dimgray", f"… with N ≤ {capped:.3g} FLOPs/example"))
        if joint.status != "converged":  # a law at a bound predicts nothing: not drawn
            limits = []
            right.text(0.03, 0.04, f"joint fit {joint.status}: no compute-optimal prediction\n"
                       f"({joint.message})", ha="left", va="bottom",
                       transform=right.transAxes, fontsize=9, wrap=True,
                       bbox={"facecolor": "white", "edgecolor": "gray", "alpha": 0.9})
        for limit, style, colour, label in limits:
            cs, ls = _optimal_curve(joint, c_lo, c_hi, limit)
            right.plot(cs, ls, style, color=colour, lw=2, label=label)
            if budget_flops is not None:
                n_opt, d_opt, l_opt = joint.compute_optimal(budget_flops, limit)
                right.scatter([budget_flops], [l_opt], marker="*", s=160, color=colour,
                              zorder=5, label=f"budget {budget_flops:.3g} FLOPs: "
                                              f"N*={n_opt:.3g}, D*={d_opt:.3g}")
        front = compute_frontier(h)
        xs, ys = _staircase(front, "train_flops", OBJECTIVE, float(h["train_flops"].max()))
        right.step(xs, ys, where="post", color="#0072B2", lw=1.5,
                   label="observed compute frontier")
        right.set_xscale("log")
        _log_ticks(right)
        right.legend(fontsize=8, loc="upper right", frameon=False)
        eq = (f"L = {joint.E:.3f} + {joint.A:.3g}·N^−{joint.alpha:.3f} + "
              f"{joint.B:.3g}·D^−{joint.beta:.3f}   (R²={joint.r2:.3f}, {joint.status})")
        fig.suptitle(f"search {runs.name!r}: joint fit {eq}", fontsize=10)
    else:
        left.text(0.5, 0.5, f"joint fit {joint.status}:\n{joint.message}", ha="center",
                  va="center", transform=left.transAxes, fontsize=9, wrap=True)
        fig.suptitle(f"search {runs.name!r}: no usable joint fit", fontsize=10)
    left.set_xlabel("predicted validation log loss (nats)")
    left.set_ylabel("observed validation log loss (nats)")
    left.set_title("every report: observed vs predicted by L(N, D)", fontsize=10)
    right.set_xlabel("training compute C = 3·N·D (FLOPs, log scale)")
    right.set_ylabel(Y_LABEL)
    right.set_title("predicted loss at the compute-optimal size", fontsize=10)
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.35)
    path = out / "joint_fit.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def png_figures(runs: SearchRuns, out_dir: Path, frontier_fit: PowerLawFit | None = None,
                family_fits: Mapping[str, PowerLawFit] | None = None,
                joint: JointFit | None = None, max_flops_per_example: float | None = None,
                budget_flops: float | None = None, max_n: float | None = None) -> list[Path]:
    """Write the PNG figures of ``runs`` into ``out_dir``; returns their paths.

    ``frontier_fit``/``family_fits``: ``L(C)`` fits drawn on the compute plot; ``joint``:
    the ``L(N, D)`` fit of ``joint_fit.png``, whose compute-optimal curve searches
    ``N <= max_n`` (and ``N <= max_flops_per_example`` for the capped curve).
    """
    import matplotlib

    matplotlib.use("Agg")
    files = [_png(runs, spec, out_dir, frontier_fit, family_fits or {}, max_flops_per_example)
             for spec in PLOTS]
    if joint is not None:
        files.append(_joint_png(runs, joint, out_dir, budget_flops, max_n,
                                max_flops_per_example))
    return files


def seq_lens(trials: pd.DataFrame) -> pd.Series:
    """Each trial's history length ``K`` (``model.seq_len``; 0 where it is unset: a
    history-free config does not log the knob)."""
    if "model.seq_len" not in trials:
        return pd.Series(0, index=trials.index, dtype="int64")
    return pd.to_numeric(trials["model.seq_len"], errors="coerce").fillna(0).astype("int64")


def sequence_png(runs: SearchRuns, out_dir: Path) -> Path:
    """``loss_vs_seq_len.png``: left, best loss of each trial vs FLOPs per example, one
    colour per ``K``; right, the best loss of each ``K`` (the label: its FLOPs/example)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = runs.trials.assign(seq_len=seq_lens(runs.trials))
    if "status" in t:
        t = t[~t["status"].fillna("").astype(str).str.upper().isin(_BAD_STATUS)]
    t = t.dropna(subset=[OBJECTIVE, "flops_per_example"])
    t = t[t["flops_per_example"] > 0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, layout="constrained")
    ks = sorted(int(k) for k in t["seq_len"].unique())
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(ks), 1)))
    best = []
    for k, colour in zip(ks, colours, strict=False):
        g = t[t["seq_len"] == k]
        left.scatter(g["flops_per_example"], g[OBJECTIVE], color=colour, s=22,
                     label=f"K={k} ({len(g)})", edgecolors="none")
        row = g.loc[g[OBJECTIVE].idxmin()]
        best.append((k, float(row[OBJECTIVE]), float(row["flops_per_example"])))
    left.set_xscale("log")
    left.set_xlabel("forward FLOPs per example (FLOPs, log scale)")
    left.set_ylabel(Y_LABEL)
    left.set_title("each trial's loss, by history length K", fontsize=10)
    if ks:
        left.legend(fontsize=8, frameon=False)
        xs = np.arange(len(best))
        right.plot(xs, [b[1] for b in best], "o-", color="black")
        for x, (_, loss, fpe) in zip(xs, best, strict=True):
            right.annotate(f"{fpe:.3g} FLOPs/ex", (x, loss), textcoords="offset points",
                           xytext=(0, 6), ha="center", fontsize=7.5)
        right.set_xticks(xs, [str(b[0]) for b in best])
        right.margins(x=0.15, y=0.15)  # room for the labels at the ends
    right.set_xlabel("history length K (model.seq_len)")
    right.set_ylabel(Y_LABEL)
    right.set_title("best loss of each K", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"search {runs.name!r}: loss vs history length", fontsize=11)
    path = out_dir / "loss_vs_seq_len.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- plotly -------------------------------------------------------------------------


def _hover(df: pd.DataFrame, x: str, y: str, extra: Sequence[str]) -> list[str]:
    cols = [c for c in ("trial_id", "block", "status", *extra) if c in df]
    rows = []
    for rec in df[cols + [x, y]].to_dict("records"):
        parts = [f"{c}: {rec[c]}" for c in cols]
        parts += [f"{x}: {rec[x]:.4g}", f"{y}: {rec[y]:.5f}"]
        rows.append("<br>".join(parts))
    return rows


def html_figures(runs: SearchRuns, frontier_fit: PowerLawFit | None = None,
                 family_fits: Mapping[str, PowerLawFit] | None = None,
                 max_flops_per_example: float | None = None) -> list[str]:
    """The loss-vs-cost figures as plotly ``<div>`` snippets. None carries plotly.js:
    the page loads it once from ``plotly.min.js`` beside it (:func:`write_plotly_js`)."""
    import plotly.graph_objects as go

    extra = ["model.d_model", "model.n_layers", "train.lr", "examples_seen"]
    divs: list[str] = []
    for spec in PLOTS:
        df, y = _points(runs, spec)
        history = spec.source == "history"
        fig = go.Figure()
        for fam, g in df.groupby("block", sort=True):
            fam = str(fam)
            if history:
                g = g.sort_values(["run_id", spec.x])
                xs: list[Any] = []
                ys: list[Any] = []
                text: list[str | None] = []
                for _, run in g.groupby("run_id", sort=False):  # learning curves, gaps between
                    xs += [*run[spec.x], None]
                    ys += [*run[y], None]
                    text += [*_hover(run, spec.x, y, extra), None]
                fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=fam, text=text,
                                hoverinfo="text", line={"color": family_color(fam), "width": 1},
                                marker={"size": 5, "symbol": _PLOTLY_SYMBOLS[family_marker(fam)]},
                                opacity=0.75)
            else:
                fig.add_scatter(x=g[spec.x], y=g[y], mode="markers", name=fam,
                                text=_hover(g, spec.x, y, extra), hoverinfo="text",
                                marker={"color": family_color(fam), "size": 9,
                                        "symbol": _PLOTLY_SYMBOLS[family_marker(fam)],
                                        "line": {"color": "white", "width": 0.5}})
        if not df.empty:
            front = compute_frontier(df, x=spec.x, y=y) if history else pareto_front(df, spec.x, y)
            fx, fy = _staircase(front, spec.x, y, float(df[spec.x].max()))
            fig.add_scatter(x=fx, y=fy, mode="lines", name="Pareto frontier",
                            line={"shape": "hv", "color": "black", "width": 2})
            if history:
                for label, _fam, colour, cs, ls in _fit_curves(runs, frontier_fit,
                                                                family_fits or {}):
                    fig.add_scatter(x=cs, y=ls, mode="lines", name=f"fit {label}",
                                    line={"dash": "dash", "color": colour, "width": 2})
            lo, hi, _ = _ylim(df[y].to_numpy(dtype=float))
            fig.update_yaxes(range=[lo, hi])
        if spec.x == "flops_per_example" and max_flops_per_example is not None:
            fig.add_vline(x=max_flops_per_example, line_dash="dot", line_color="gray",
                          annotation_text="serving cap")
        what = "every report" if history else "each trial's result (its last report)"
        fig.update_layout(xaxis_type="log", xaxis_title=spec.label, yaxis_title=Y_LABEL,
                          title=f"validation log loss vs {spec.x} ({what})", height=520,
                          template="plotly_white", legend={"font": {"size": 11}})
        divs.append(fig.to_html(full_html=False, include_plotlyjs=False))
    return divs


#: The file the report's page loads plotly.js from (written beside it, offline).
PLOTLY_JS = "plotly.min.js"


def write_plotly_js(out_dir: Path) -> Path:
    """plotly.js from the installed Python package, once, beside the report."""
    from plotly.offline import get_plotlyjs

    path = out_dir / PLOTLY_JS
    path.write_text(get_plotlyjs(), encoding="utf-8")
    return path
