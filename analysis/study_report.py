"""The scaling study's report: isoFLOP curves, ``N*(C)``/``L*(C)`` with bands, the
verification points, ``summary.json`` and a Markdown page with every number a user acts
on (each with its interval and status).

Example::

    fit = analyze_study(record.points, n_train=record.n_train)
    build_study_report(record, fit, verify_outcome, "report/")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from analysis.isoflop import StudyFit

__all__ = ["build_study_report", "summary", "table_rows"]

# The seed papers' loss-vs-compute exponents (SCALING.md), for the comparison table.
PAPER_EXPONENTS = {"RankMixer (UniMixer paper)": 0.117, "UniMixing": 0.126,
                   "UniMixing-Lite": 0.135}


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}"


def _ci(pair: tuple[float, float] | None, digits: int = 4) -> str:
    lo, hi = pair if pair is not None else (None, None)
    return f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def table_rows(fit: StudyFit, verify: Any = None) -> list[tuple[str, str, str, str]]:
    """``(quantity, value, 95% interval, status)`` for every number a user acts on."""
    rows: list[tuple[str, str, str, str]] = []
    for fam, s in fit.families.items():
        rows.append((f"{fam}: N*(C) exponent a", _fmt(s.a, 3), _ci(s.ci.get("a"), 3),
                     s.status))
        rows.append((f"{fam}: L*(C) exponent b (pure power law)", _fmt(s.b, 3),
                     _ci(s.ci.get("b"), 3), s.status))
        floor_e = _fmt(s.floor[0]) if s.floor_status != "too_few_points" else "n/a"
        rows.append((f"{fam}: L*(C) floor E (floored law E + K*C^-b_f)", floor_e,
                     _ci(s.ci.get("E")), f"{s.floor_status}: {s.floor_message}"))
        if s.floor_ok:
            rows.append((f"{fam}: L*(C) exponent b_f (floored law)", _fmt(s.floor[1], 3),
                         _ci(s.ci.get("b_f"), 3), s.floor_status))
        for p in s.profiles:
            rows.append((f"{fam}: N* at C={p.budget:.3g}", _fmt(p.n_star, 3),
                         _ci(p.ci.get("n_star"), 3), p.status))
            rows.append((f"{fam}: L* at C={p.budget:.3g}", _fmt(p.l_star),
                         _ci(p.ci.get("l_star")), p.status))
    if fit.floor_loss is not None:
        rows.append(("the data's own loss floor (Bayes loss on validation)",
                     _fmt(fit.floor_loss), "", "from the data"))
    for c, f in fit.winners.items():
        rows.append((f"winner at C={c:.3g}", f, "", "measured"))
    if fit.dead:
        rows.append(("runs left out (did not beat the base rate)", str(len(fit.dead)),
                     "", "; ".join(fit.dead)))
    pk = fit.pick
    pred = pk.prediction
    tag = pk.status if pk.status != "extrapolated" else "EXTRAPOLATED: not an answer"
    rows.append((f"pick at C={pk.budget:.3g}: family", pk.family or "n/a", "", tag))
    if pred is not None:
        rows.append((f"pick at C={pk.budget:.3g}: N (FLOPs/example)", _fmt(pred.N, 3),
                     _ci(pred.n_ci, 3), tag))
        rows.append((f"pick at C={pk.budget:.3g}: D (examples)", _fmt(pred.D, 3),
                     _ci((pk.budget / (3 * pred.n_ci[1]), pk.budget / (3 * pred.n_ci[0]))
                         if all(math.isfinite(v) for v in pred.n_ci) else None, 3), tag))
        rows.append((f"pick at C={pk.budget:.3g}: loss ({pred.loss_law} law)", _fmt(pred.loss),
                     _ci(pred.loss_ci), tag))
        rows.append((f"pick at C={pk.budget:.3g}: passes over the training data",
                     _fmt(pk.epochs, 3) if fit.n_train else "fresh data",
                     f"measured up to {_fmt(pk.max_epochs_measured, 3)} at sizes >= N/2", tag))
    if verify is not None:
        for r in verify.rows:
            rows.append((f"verify {r.role} (N={r.N:.3g}, D={r.D:.3g}): predicted / measured",
                         f"{r.predicted:.4f} / {r.measured:.4f} ({r.error:+.4f})",
                         _ci(r.ci), "inside" if r.inside else "OUTSIDE"))
        b = verify.n_star_beats_neighbours
        rows.append(("verify: N* no worse than both neighbours",
                     "yes" if b else "NO" if b is not None else "n/a", "", "measured"))
    return rows


def summary(fit: StudyFit, record: Any = None, verify: Any = None) -> dict[str, Any]:
    """JSON-ready summary: the fit, the verification, the table."""
    out: dict[str, Any] = {"fit": fit.as_dict(),
                           "verify": verify.as_dict() if verify is not None else None,
                           "paper_exponents": PAPER_EXPONENTS,
                           "table": [dict(zip(("quantity", "value", "ci95", "status"), r))
                                     for r in table_rows(fit, verify)]}
    if record is not None:
        out.update({"study": record.name, "parent_run_id": record.parent_run_id,
                    "config": json.loads(record.config.model_dump_json())})
    return out


def _figures(fit: StudyFit, verify: Any, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fams = list(fit.families)
    target = fit.pick.budget
    cmap = plt.get_cmap("viridis")
    budgets = fit.budgets
    color = {c: cmap(i / max(1, len(budgets))) for i, c in enumerate(budgets)}
    paths = []

    fig, axes = plt.subplots(1, len(fams), figsize=(5.5 * len(fams), 4.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        s = fit.families[fam]
        all_n = [n for p in s.profiles for n in p.N]
        if verify is not None and verify.family == fam:
            all_n += [r.N for r in verify.rows]
        x_lo, x_hi = (min(all_n) / 2, max(all_n) * 2) if all_n else (1.0, 10.0)
        for p in s.profiles:
            col = color[p.budget]
            ax.scatter(p.N, p.L, color=col, s=18, zorder=3,
                       label=f"C={p.budget:.2g} ({p.status})")
            if math.isfinite(p.curvature) and p.curvature > 0:
                grid = np.geomspace(min(p.N) / 1.3, max(p.N) * 1.3, 80)
                ax.plot(grid, p.curve(grid), color=col, lw=1.2, ls="-" if p.ok else ":")
            if p.ok:  # minima outside the sizes measured are not drawn (hit_bound)
                ax.plot([p.n_star], [p.l_star], marker="*", ms=12, color=col, mec="k", zorder=4)
                lo, hi = p.ci.get("n_star", (math.nan, math.nan))
                if math.isfinite(lo):
                    ax.hlines(p.l_star, max(lo, x_lo), min(hi, x_hi), color=col, lw=2,
                              alpha=0.6)
        if verify is not None and verify.family == fam:
            ns = np.array([r.N for r in verify.rows], dtype=float)
            if s.ok:
                grid = np.geomspace(ns.min() / 1.5, ns.max() * 1.5, 60)
                ax.plot(grid, s.loss_at(verify.budget, grid), color="crimson", ls="--", lw=1,
                        label=f"predicted at C={verify.budget:.2g}")
            for r in verify.rows:
                ax.errorbar([r.N], [r.predicted],
                            yerr=[[r.predicted - r.ci[0]], [r.ci[1] - r.predicted]],
                            color="crimson", capsize=3, fmt="none")
                ax.scatter([r.N], [r.measured], marker="D", color="crimson", edgecolor="k",
                           zorder=5, s=36, label="verify: measured (bar: predicted 95%)"
                           if r is verify.rows[0] else None)
        ax.set_xscale("log")
        ax.set_xlim(x_lo, x_hi)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("N (forward FLOPs per example)")
        ax.set_ylabel("validation log loss")
        ax.set_title(f"{fam}: isoFLOP profiles\n(star: fitted minimum; bar under it: N* 95%)",
                     fontsize=10)
        # below the axes: a legend inside covered the points (a verify run at 0.74)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
                  frameon=False)
    fig.tight_layout()
    paths.append(out / "isoflop.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, (axn, axl) = plt.subplots(1, 2, figsize=(11, 4.2))
    cs = np.geomspace(min(budgets) / 1.5, max(target, max(budgets)) * 1.5, 60)
    for i, fam in enumerate(fams):
        s = fit.families[fam]
        col = plt.get_cmap("tab10")(i)
        good = [p for p in s.profiles if p.ok]
        if good:
            ax_n = [p.budget for p in good]
            axn.errorbar(ax_n, [p.n_star for p in good], fmt="o", color=col,
                         yerr=_yerr([p.n_star for p in good], [p.ci["n_star"] for p in good]))
            axl.errorbar(ax_n, [p.l_star for p in good], fmt="o", color=col,
                         yerr=_yerr([p.l_star for p in good], [p.ci["l_star"] for p in good]))
        if s.ok:
            axn.plot(cs, s.n_star(cs), color=col,
                     label=f"{fam}: a={s.a:.3f} [{s.ci['a'][0]:.3f}, {s.ci['a'][1]:.3f}]")
            band_lo, band_hi = s.band(cs, "n")
            axn.fill_between(cs, band_lo, band_hi, color=col, alpha=0.15)
            axl.plot(cs, s.loss_at(cs, s.n_star(cs)), color=col,
                     label=f"{fam} ({s.loss_law} law"
                           + (f", floor E={s.floor[0]:.4f}" if s.floor_ok else "") + ")")
            band_lo, band_hi = s.band(cs, "l")
            axl.fill_between(cs, band_lo, band_hi, color=col, alpha=0.15)
    if verify is not None and verify.center is not None:
        r = verify.center
        axn.scatter([r.budget], [r.N], marker="D", color="crimson", edgecolor="k", zorder=5,
                    label="verified N*")
        axl.errorbar([r.budget], [r.predicted], yerr=[[r.predicted - r.ci[0]], [r.ci[1] - r.predicted]],
                     color="crimson", capsize=3, fmt="none")
        axl.scatter([r.budget], [r.measured], marker="D", color="crimson", edgecolor="k",
                    zorder=5, label="measured at N* (bar: predicted 95%)")
    if fit.floor_loss is not None:
        axl.axhline(fit.floor_loss, color="k", ls="--", lw=1,
                    label=f"the data's Bayes loss {fit.floor_loss:.4f}")
    for ax in (axn, axl):
        ax.axvline(target, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training compute C (FLOPs)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    all_l = [v for s in fit.families.values() for p in s.profiles for v in p.L]
    all_n = [v for s in fit.families.values() for p in s.profiles for v in p.N]
    if verify is not None:
        all_l += [r.measured for r in verify.rows if math.isfinite(r.measured)]
    if all_l:  # bands from wild bootstrap replicates would otherwise set the scale
        span = max(all_l) - min(all_l)
        axl.set_ylim(min(all_l) - 0.5 * span - 0.01, max(all_l) + 0.2 * span + 0.01)
        axn.set_ylim(min(all_n) / 10, max(all_n) * 10)
    axn.set_yscale("log")
    axn.yaxis.set_minor_formatter(NullFormatter())
    axn.set_ylabel("N* (FLOPs per example)")
    axn.set_title("compute-optimal size N*(C) (band: 95%)")
    axl.set_ylabel("L*(C) validation log loss")
    axl.set_title("compute-optimal loss (band: 95%)")
    fig.tight_layout()
    paths.append(out / "scaling.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _yerr(v: list[float], ci: list[tuple[float, float]]) -> np.ndarray:
    lo = [max(0.0, x - a) if math.isfinite(a) else 0.0 for x, (a, _) in zip(v, ci)]
    hi = [max(0.0, b - x) if math.isfinite(b) else 0.0 for x, (_, b) in zip(v, ci)]
    return np.array([lo, hi])


def build_study_report(record: Any, fit: StudyFit, verify: Any, out_dir: str | Path,
                       log_to_mlflow: bool = False) -> Path:
    """Write ``isoflop.png``, ``scaling.png``, ``summary.json`` and ``report.md`` under
    ``out_dir`` (optionally also as artifacts of the study's parent run)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(fit, verify, out)
    data = summary(fit, record, verify)
    (out / "summary.json").write_text(json.dumps(_sanitize(data), indent=2,
                                                 default=_json_default, allow_nan=False))
    lines = [f"# Scaling study {getattr(record, 'name', '')}", "",
             f"Pick at C={fit.pick.budget:.3g}: **{fit.pick.status}**: {fit.pick.message}", "",
             "| quantity | value | 95% interval | status |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table_rows(fit, verify)]
    lines += ["", "Seed papers' loss-vs-compute exponents: "
              + ", ".join(f"{k} {v}" for k, v in PAPER_EXPONENTS.items())
              + "; Wukong: about 0.1% log loss per 4x compute.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figs]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if log_to_mlflow and record is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(record.tracking_uri)
        for p in [*figs, out / "summary.json", out / "report.md"]:
            client.log_artifact(record.parent_run_id, str(p), "study_report")
    return out


def _sanitize(o: Any) -> Any:
    """NaN/inf -> None, NumPy scalars -> Python, recursively (strict JSON)."""
    if isinstance(o, dict):
        return {str(k): _sanitize(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_sanitize(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
