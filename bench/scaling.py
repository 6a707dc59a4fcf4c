"""isoFLOP scaling studies, then ``verify`` at 10x the largest budget studied.

    .venv/bin/python bench/scaling.py --families tokenmixer   # both datasets, ~24 min
    .venv/bin/python bench/scaling.py --parts synthetic_small5 --dry-run   # plan and cost

For each dataset: a study (budget ladder x sizes per family, each point trained for
D = C/(3N) with a WSD schedule) through Ray Tune + MLflow (SQLite under --work), the
isoFLOP fits, ``verify`` at the target (N*, N*/2, 2N*), and the report
(``bench/results/scaling_<part>/``: isoflop.png, scaling.png, summary.json, report.md).
Numbers go to ``bench/results/scaling.json``. The default parts (``synthetic_small5``,
``movielens_small4``) are the ones verified at 10x; the others are the earlier studies
bench/RESULTS.md describes. ~24 minutes on 2 quiet cores with ``--families tokenmixer``.

    .venv/bin/python bench/scaling.py --refit-recorded --parts synthetic_small6

refits recorded parts from the profiles in ``scaling.json`` with today's analysis (no
training and no MLflow store needed: the store under --work is temporary), under
``refit`` and ``bench/results/scaling_<part>_refit/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, not a shadowing bench/ module

for k, v in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled"),
             ("MLFLOW_DISABLE_TELEMETRY", "true"), ("RAY_AIR_NEW_OUTPUT", "0")):
    os.environ.setdefault(k, v)

from search.study import StudyConfig, ladder, plan_study  # noqa: E402
from trainers.data import DataConfig, SyntheticConfig, load_dataset  # noqa: E402

# Throughput model for the dry run (bench/RESULTS.md, 1 thread, batch 256): ~35k
# examples/s while per-step overhead dominates, ~18 GFLOP/s of training once FLOPs do.
_EX_PER_S, _FLOPS_PER_S, _TRIAL_S = 35_000.0, 18e9, 3.0

FAMILIES = ("tokenmixer", "unimixing_lite")
ML_WIDTHS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
SYN_WIDTHS = (4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
#: per-family knobs of the ``*_families`` parts: the defaults put UniMixing's and
#: Wukong's smallest sizes 4-30x above tokenmixer's (a 16-wide mixing block needs
#: T*D >= 16; Wukong's FM MLP is 128 wide), so no small budget could bracket N*
FAMILY_KNOBS: dict[str, dict[str, int]] = {
    "unimixing_lite": {"block_size": 4, "rank": 2, "n_bases": 2},
    "unimixing": {"block_size": 4},
    "wukong": {"n_fm": 2, "n_lc": 2, "k": 4, "mlp_hidden": 16},
}


def configs(parts: list[str], families: tuple[str, ...] = FAMILIES) -> dict[str, StudyConfig]:
    common = dict(families=families, sizes=5, span=16.0, warmup_frac=0.05, decay_frac=0.2,
                  train={"batch_size": 256, "lr": 3e-3, "optimizer": "adamw_split",
                         "embedding_lr": 1e-2},
                  model={"n_tokens": 4, "embed_dim": 8, "head_hidden": [32],
                         "tokenizer": "grouped", "pooling": "mean"},
                  max_concurrent=2)
    small_frame = {"n_tokens": 2, "embed_dim": 8, "head_hidden": [8],
                   "tokenizer": "grouped", "pooling": "mean"}

    def small(widths: tuple[int, ...], **kw: object) -> dict[str, object]:
        """The small frame (2 tokens, head [8]) with these widths."""
        return {**common, "model": small_frame, "widths": widths, **kw}

    def teacher(n_rows: int) -> DataConfig:
        return DataConfig(name="synthetic", synthetic=SyntheticConfig(
            n_rows=n_rows, n_cat_fields=8, cardinality=100, order=3, n_interactions=6,
            noise=0.1, seed=0))

    out = {}
    if "synthetic" in parts:
        # fresh examples: every point, and every verify run, sees each row at most once
        out["synthetic"] = StudyConfig(
            name="bench-scaling-synthetic", data=teacher(7_000_000),
            budgets=ladder(1.25e9, 4, 4.0), center_ratio=15.0, max_epochs=1.0,
            eval_max_examples=100_000, **common)  # type: ignore[arg-type]
    if "movielens" in parts:
        out["movielens"] = StudyConfig(
            name="bench-scaling-movielens", data=DataConfig(name="movielens-1m"),
            budgets=ladder(1e9, 4, 4.0), center_ratio=30.0,
            eval_max_examples=100_000, **common)  # type: ignore[arg-type]
    if "movielens_small" in parts:
        # a second MovieLens study after the first found N* at or below its smallest
        # sizes: a smaller frame (2 tokens, head [8], widths from 2) and spreads centred
        # at D/N = 300 (the first study's converged minimum implies ~350), 3 budgets
        out["movielens_small"] = StudyConfig(
            name="bench-scaling-movielens-small", data=DataConfig(name="movielens-1m"),
            budgets=ladder(1e9, 3, 4.0), center_ratio=300.0,
            eval_max_examples=100_000, **small(ML_WIDTHS))  # type: ignore[arg-type]
    if "movielens_small4" in parts:
        # movielens_small with a fourth budget (6.4e10), so that two profiles can
        # converge (1.6e10 did; 1e9 and 4e9 sit below the smallest size that trains), and
        # spreads centred at D/N = 1000 (the 1.6e10 minimum implied ~1000)
        out["movielens_small4"] = StudyConfig(
            name="bench-scaling-movielens-small4", data=DataConfig(name="movielens-1m"),
            budgets=ladder(1e9, 4, 4.0), center_ratio=1000.0,
            eval_max_examples=100_000, **small(ML_WIDTHS))  # type: ignore[arg-type]
    if "synthetic_small" in parts:
        # the first synthetic study centred its spreads at D/N = 15 and found N* at or
        # below its smallest sizes; its converged minima implied D/N ~ 45-130. This one:
        # a smaller frame (2 tokens, head [8]), one depth (2) so neighbouring sizes differ
        # only in width, spreads centred at D/N = 100, budgets low enough that the
        # verify runs at 10x fit the time box; 10M fresh rows so nothing repeats
        out["synthetic_small"] = StudyConfig(
            name="bench-scaling-synthetic-small", data=teacher(10_000_000),
            budgets=ladder(6.25e8, 4, 4.0), center_ratio=100.0, max_epochs=1.0,
            eval_max_examples=100_000, **small(SYN_WIDTHS, depths=(2,)))  # type: ignore[arg-type]
    if "synthetic_small5" in parts:
        # synthetic_small with two more 4x rungs (1.6e11 and, at the 10x target, verify
        # at 1.6e12): its two converged profiles (1e10, 4e10) gave a law that missed the
        # 0.005-nat target and picked an N* that lost to N*/2. 30M fresh rows (24M train)
        # so that neither the largest study point nor a verify run at 1.6e12 repeats one
        out["synthetic_small5"] = StudyConfig(
            name="bench-scaling-synthetic-small5", data=teacher(30_000_000),
            budgets=ladder(6.25e8, 5, 4.0), center_ratio=100.0, max_epochs=1.0,
            eval_max_examples=100_000, **small(SYN_WIDTHS + (160, 192, 256), depths=(2,)))  # type: ignore[arg-type]
    if "synthetic_small6" in parts:
        # synthetic_small5 with a sixth rung (6.4e11) and verify at 6.4e12: at 1.6e12 its
        # L*(C) power law was 0.008 nats optimistic (the curve bends toward a floor) and
        # a fifth converged budget gives a floored law two degrees of freedom. 50M fresh
        # rows (40M train) so that no study point and no verify run repeats one
        out["synthetic_small6"] = StudyConfig(
            name="bench-scaling-synthetic-small6", data=teacher(50_000_000),
            budgets=ladder(6.25e8, 6, 4.0), center_ratio=100.0, max_epochs=1.0,
            eval_max_examples=100_000,
            **small(SYN_WIDTHS + (160, 192, 256, 320, 384, 512), depths=(2,)))  # type: ignore[arg-type]
    if "synthetic_families" in parts:
        # the other families on synthetic_small5's frame and data, for their exponents:
        # budgets 2.5e9 ... 1.6e11 (6.25e8 cannot spread them; it was hit_bound for
        # tokenmixer too), each family's own knobs shrunk (FAMILY_KNOBS) so its sizes
        # reach ~1e3 FLOPs/example like tokenmixer's
        fams = tuple(f for f in families if f != "tokenmixer")
        out["synthetic_families"] = StudyConfig(
            name="bench-scaling-synthetic-families", data=teacher(30_000_000),
            budgets=ladder(2.5e9, 4, 4.0), center_ratio=100.0, max_epochs=1.0,
            eval_max_examples=100_000,
            **{**small(SYN_WIDTHS + (160, 192, 256), depths=(2,)), "families": fams,
               "model": {**small_frame, **{f: FAMILY_KNOBS[f] for f in fams if f in FAMILY_KNOBS}}})  # type: ignore[arg-type]
    if "movielens_families" in parts:
        # the other families on movielens_small4's frame: budgets 4e9 ... 6.4e10 (at 1e9
        # three of tokenmixer's five sizes never beat the base rate), FAMILY_KNOBS
        fams = tuple(f for f in families if f != "tokenmixer")
        out["movielens_families"] = StudyConfig(
            name="bench-scaling-movielens-families", data=DataConfig(name="movielens-1m"),
            budgets=ladder(4e9, 3, 4.0), center_ratio=1000.0, eval_max_examples=100_000,
            **{**small(ML_WIDTHS), "families": fams,
               "model": {**small_frame, **{f: FAMILY_KNOBS[f] for f in fams if f in FAMILY_KNOBS}}})  # type: ignore[arg-type]
    return out


def _seconds(n: float, d: float) -> float:
    return d / min(_EX_PER_S, _FLOPS_PER_S / (3 * n)) + _TRIAL_S


def recorded_points(fit: dict[str, Any]) -> pd.DataFrame:
    """A recorded fit's points back as rows: every profile keeps the best run per size
    (``family``, ``budget``, ``N``, ``D``, ``loss``), which is what the fit reads."""
    rows = [{"family": fam, "budget": prof["budget_flops"], "N": n, "D": d, "loss": loss}
            for fam, f in fit["families"].items() for prof in f["profiles"]
            for n, d, loss in zip(prof["N"], prof["D"], prof["loss"])]
    return pd.DataFrame(rows)


def refit_recorded(parts: list[str], work: Path, out_path: Path) -> int:
    """Refit parts from the points recorded in ``out_path`` with today's analysis (no
    MLflow store needed); the data's floor is read from the recorded fit or, for
    synthetic data recorded before it was kept, from the regenerated dataset."""
    from analysis.isoflop import analyze_study
    from analysis.study_report import build_study_report
    from search.study import data_floor

    results = json.loads(out_path.read_text())
    for part in parts:
        before = results.get(part)
        if not isinstance(before, dict) or "fit" not in before:
            print(f"[{part}] nothing recorded in {out_path}", flush=True)
            continue
        recorded_cfg = StudyConfig.model_validate(before["config"])
        floor = (before["fit"].get("data_floor_logloss")
                 or before.get("refit", {}).get("data_floor_logloss"))
        if floor is None and recorded_cfg.data.name == "synthetic":
            floor = data_floor(load_dataset(recorded_cfg.data, cache_dir=work / "cache").meta)
        target = 10 * max(recorded_cfg.budgets)
        fit = analyze_study(recorded_points(before["fit"]), target, None, before["n_train"],
                            floor_loss=floor)
        print(f"[{part}] refit from recorded profiles; floor {floor}; pick "
              f"{fit.pick.status}: {fit.pick.message}", flush=True)
        record = SimpleNamespace(name=recorded_cfg.name, parent_run_id=None,
                                 config=recorded_cfg)
        build_study_report(record, fit, None, ROOT / f"bench/results/scaling_{part}_refit")
        results[part] = {**before, "refit": json.loads(json.dumps(fit.as_dict(), default=float)),
                         "refit_source": "profiles recorded under fit (MLflow store gone); "
                                         "dead runs were left out then"}
        out_path.write_text(json.dumps(results, indent=2, default=str))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="synthetic_small5,movielens_small4")
    ap.add_argument("--work", default="/tmp/recscale-bench-scaling",
                    help="MLflow SQLite, Ray state, data cache")
    ap.add_argument("--out", default=str(ROOT / "bench/results/scaling.json"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--verify-all", action="store_true",
                    help="verify every family (default: the pick's family only)")
    ap.add_argument("--no-verify", action="store_true",
                    help="study (resumed if done), fits and report only; a part verified "
                         "before keeps that verify and its report, the new fit goes "
                         "under refit")
    ap.add_argument("--also-verify", default="",
                    help="comma-separated extra targets (FLOPs) to verify the pick's family "
                         "at, recorded under verify_also (e.g. an out-of-sample check of a "
                         "rule changed after the main verify)")
    ap.add_argument("--refit-recorded", action="store_true",
                    help="refit each part from the profiles recorded in --out (when its "
                         "MLflow store is gone): no training; the new fit goes under refit "
                         "and its report under scaling_<part>_refit")
    ap.add_argument("--dry-run", action="store_true", help="plan and estimate cost only")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if args.refit_recorded:
        return refit_recorded(parts, Path(args.work), Path(args.out))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    results: dict[str, object] = {}
    out_path = Path(args.out)
    if out_path.exists():
        results = json.loads(out_path.read_text())
    for part, cfg in configs(parts, tuple(args.families.split(","))).items():
        t0 = time.perf_counter()
        ds = load_dataset(cfg.data, cache_dir=work / "cache")
        n_train = len(ds.train)
        points = plan_study(cfg, ds.spec, n_train)
        est = sum(_seconds(p.N, p.D) for p in points) / cfg.max_concurrent
        target = 10 * max(cfg.budgets)
        print(f"[{part}] {len(points)} points, n_train={n_train}, est. study {est:.0f} s "
              f"(2 slots); N range {min(p.N for p in points):.3g}..{max(p.N for p in points):.3g};"
              f" max epochs {max(p.D / n_train for p in points):.2f}", flush=True)
        for fam in cfg.families:
            n_c = math.sqrt(target / (3 * cfg.center_ratio))
            v = sum(_seconds(n, target / (3 * n)) for n in (n_c / 2, n_c, 2 * n_c))
            print(f"[{part}] verify {fam} at {target:.3g} if N*~{n_c:.3g}: ~{v:.0f} s of slots",
                  flush=True)
        if args.dry_run:
            continue
        from analysis.isoflop import analyze_study
        from analysis.study_report import build_study_report
        from analysis.verify import run_verify
        from search.study import load_study, run_study

        study = run_study(cfg, tracking_uri=uri, storage=work / "ray", dataset=ds, verbose=0)
        t_study = time.perf_counter() - t0
        record = load_study(cfg.name, uri)
        fit = analyze_study(record.points, target, None, record.n_train,
                            floor_loss=record.floor_loss)
        print(f"[{part}] study {t_study:.0f} s; pick {fit.pick.status}: {fit.pick.message}",
              flush=True)
        verifies = {}
        for fam in (() if args.no_verify else
                    cfg.families if args.verify_all else (fit.pick.family,)):
            if not fam or not fit.families[fam].ok:
                print(f"[{part}] verify {fam}: skipped ({fit.pick.message})")
                continue
            t1 = time.perf_counter()
            ver = run_verify(cfg.name, target, uri, work / "ray", family=fam, dataset=ds)
            print(ver.table(), f"\n[{part}] verify {fam} {time.perf_counter() - t1:.0f} s",
                  flush=True)
            verifies[fam] = ver
        prior = results.get(part)
        before: dict[str, Any] = prior if isinstance(prior, dict) else {}
        also = dict(before.get("verify_also", {}))
        for extra in (float(x) for x in args.also_verify.split(",") if x):
            fam = fit.pick.family
            if not fam or not fit.families[fam].ok:
                continue
            t1 = time.perf_counter()
            ver = run_verify(cfg.name, extra, uri, work / "ray", family=fam, dataset=ds)
            print(ver.table(), f"\n[{part}] verify {fam} at {extra:.3g} "
                  f"{time.perf_counter() - t1:.0f} s", flush=True)
            also[f"{extra:.3g}"] = {**ver.as_dict(), "seconds": time.perf_counter() - t1}
            # the study's points are the same (verify runs are kept apart): refit only
            extra_fit = analyze_study(record.points, extra, None, record.n_train,
                                      floor_loss=record.floor_loss)
            build_study_report(load_study(cfg.name, uri), extra_fit, ver,
                               ROOT / f"bench/results/scaling_{part}_at_{extra:.3g}")
        record = load_study(cfg.name, uri)
        main_fam = fit.pick.family if fit.pick.family in verifies else next(iter(verifies), None)
        if args.no_verify and before.get("verify"):
            # a study re-analysed (or verified at another target) keeps the main verify
            # as it was recorded, with the report built then
            from analysis.verify import rescore_verify

            ids = [r["run_id"] for v in before["verify"].values() for r in v["rows"]]
            rescored = rescore_verify(record, fit, target, run_ids=ids)
            results[part] = {**before, "verify_also": also,
                             "refit": json.loads(json.dumps(fit.as_dict(), default=float)),
                             "verify_rescored": rescored.as_dict() if rescored else None}
            if rescored is not None:  # the recorded runs against today's law (post hoc)
                print(rescored.table(), flush=True)
                build_study_report(record, fit, rescored,
                                   ROOT / f"bench/results/scaling_{part}_refit")
            out_path.write_text(json.dumps(results, indent=2, default=str))
            continue
        report = build_study_report(record, fit, verifies.get(main_fam) if main_fam else None,
                                    ROOT / f"bench/results/scaling_{part}")
        for fam, ver in verifies.items():
            if fam != main_fam:
                build_study_report(record, fit, ver,
                                   ROOT / f"bench/results/scaling_{part}_{fam}")
        results[part] = {
            "config": json.loads(cfg.model_dump_json()), "n_train": n_train,
            "n_points": len(study.points), "study_seconds": t_study,
            "total_seconds": time.perf_counter() - t0,
            "fit": json.loads(json.dumps(fit.as_dict(), default=float)),
            "verify": {f: v.as_dict() for f, v in verifies.items()},
            "verify_also": also,
            "report": str(report.relative_to(ROOT)),
        }
        out_path.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
