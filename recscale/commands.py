"""The commands' bodies. Each imports what it needs when it runs, so ``recscale --help``
and a one-line error for a bad file stay fast (``bench/cli.py`` measures them)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Literal

__all__ = ["cmd_analyze", "cmd_demo", "cmd_export", "cmd_search", "cmd_train", "cmd_ui",
           "print_best", "ui_url"]


class CliError(Exception):
    """A one-line, user-facing error about the command line itself."""


def _data_config(args: argparse.Namespace) -> Any:
    from trainers.data import DataConfig

    fields: dict[str, Any] = {"seed": args.data_seed}
    data = args.data
    if data in ("movielens-1m", "synthetic"):
        fields["name"] = data
    else:
        if not args.schema:
            raise CliError(f"--data {data}: a CSV/parquet file needs --schema SCHEMA.yaml")
        # recorded absolute, so the search's record (export, resume) works from any directory
        fields.update(name="file", path=str(Path(data).resolve()),
                      schema_path=str(Path(args.schema).resolve()))
    if args.max_rows:
        fields["max_rows"] = args.max_rows
    if args.label:
        fields["label"] = args.label
    if args.split:
        fields["split"] = args.split
    if getattr(args, "sequences", False):
        fields["sequences"] = True
    for flag, key in (("min_count", "min_count"), ("hash_buckets", "hash_buckets")):
        value = getattr(args, flag, None)
        if value is not None:
            if value < (1 if key == "min_count" else 0):
                raise CliError(f"--{flag.replace('_', '-')} must be "
                               f"{'>= 1' if key == 'min_count' else '>= 0 (0: never hash)'}, "
                               f"got {value}")
            fields[key] = value
    return DataConfig(**fields)


def _search_config(args: argparse.Namespace) -> Any:
    from search.settings import ResourceConfig, SearchConfig

    return SearchConfig(
        name=args.name, space=args.space, data=_data_config(args),
        budget_flops=args.budget_flops, trial_flops=args.trial_flops,
        max_flops_per_example=args.max_flops_per_example, grace_flops=args.grace_flops,
        reduction_factor=args.reduction_factor, searcher=args.searcher,
        startup_trials=args.startup_trials,
        # 0 turns it off; not given: the settings' default
        **({} if args.trial_patience is None else {"trial_patience": args.trial_patience or None}),
        scheduler=args.scheduler, objective=args.objective,
        max_concurrent=args.max_concurrent, seed=args.seed,
        reuse_actors=not args.no_reuse_actors,
        resources=ResourceConfig(cpus_per_trial=args.cpus_per_trial, gpus=args.gpus),
    )


def print_best(outcome: Any, n: int = 10) -> None:
    from trainers.contracts import OBJECTIVE, TIME_ATTR

    best = outcome.best(n)
    cols = [c for c in ("trial_id", "model.block", "model.d_model", "model.n_layers",
                        "model.n_tokens", "model.seq_len", "flops_per_example", TIME_ATTR, OBJECTIVE,
                        "val_auc", "trial_status") if c in best.columns]
    print(f"\nsearch {outcome.name}: {len(outcome.trials)} trials, spent "
          f"{outcome.spent_flops:.3g} of {outcome.budget_flops:.3g} training FLOPs "
          f"({outcome.rejected_samples} samples rejected before training)")
    if len(best):
        print(best[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    refs = getattr(outcome, "references", None)
    if refs is not None and len(refs):
        ref_cols = [c for c in ("trial_id", "model.block", "flops_per_example", TIME_ATTR,
                                OBJECTIVE, "val_auc", "trial_status") if c in refs.columns]
        print("reference models (trained first, same split and loop; part of the spend):")
        print(refs[ref_cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    winner = outcome.winner()
    if winner is not None:  # a trial's result is its last report: every number from it
        print(f"winner: {winner.get('model.block')} trial {winner['trial_id']} "
              f"({OBJECTIVE} {float(winner[OBJECTIVE]):.4g}, val_auc "
              f"{float(winner.get('val_auc', float('nan'))):.4g} at "
              f"{float(winner[TIME_ATTR]):.3g} training FLOPs, its last report)")
    lift = getattr(outcome, "lift", None)
    if lift is not None:
        for sentence in lift.sentences():
            print(f"lift: {sentence}")
    print(f"MLflow: {outcome.tracking_uri}  experiment {outcome.name!r} "
          f"(parent run {outcome.parent_run_id}); `recscale ui {outcome.name}` to compare "
          "trials")


def cmd_search(args: argparse.Namespace) -> int:
    from search.runner import run_search
    from trainers.data import load_dataset

    cfg = _search_config(args)
    resume: Literal["auto", "always", "never"] = (
        "always" if args.resume else "never" if args.no_resume else "auto")
    dataset = load_dataset(cfg.data)  # checked (one class, empty splits) before any run exists
    if args.verbose:
        print(dataset.describe(), flush=True)  # rows and positives per split
    outcome = run_search(cfg, tracking_uri=args.tracking_uri, storage=args.storage,
                         address=args.address, resume=resume, verbose=args.verbose,
                         dataset=dataset)
    print_best(outcome)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainers.config_io import precheck_experiment

    precheck_experiment(args.config)  # a malformed file fails before torch is imported
    from trainers.contracts import OBJECTIVE
    from trainers.experiment import load_experiment
    from trainers.full import describe_where, train_full

    exp = load_experiment(args.config)
    out = Path(args.out or Path("recscale_models") / Path(args.config).stem)
    res = train_full(exp, out, tracking_uri=args.tracking_uri, experiment_name=args.experiment,
                     progress=not args.no_progress, resume=args.resume)
    if res.status == "diverged":
        print(f"recscale: training diverged (status DIVERGED); run {res.run_id}", file=sys.stderr)
        return 3
    v, t = res.val, res.test
    print(f"{exp.model.block}: val_auc {v.get('val_auc', float('nan')):.4f} "
          f"{OBJECTIVE} {v.get(OBJECTIVE, float('nan')):.4f} | test_auc {t['test_auc']:.4f} "
          f"test_logloss {t['test_logloss']:.4f} test_ne {t['test_ne']:.4f} "
          f"({res.seconds:.0f} s); model saved in {res.model_dir}; MLflow run {res.run_id}")
    why = f" ({res.message})" if res.message else ""
    print(f"stopped at {describe_where(res.stopped_at)}{why}; best (saved, tested) at "
          f"{describe_where(res.best_at)}")
    return 0


def ui_url(host: str, port: int, experiment_id: str | None) -> str:
    """The page ``recscale ui`` opens: the search's runs in MLflow's machine-learning
    mode (MLflow 3.17 otherwise opens its GenAI overview) with recscale's shared view
    of the runs table (the result columns), or the experiment list."""
    from trainers.contracts import VIEW_KEY

    base = f"http://{host}:{port}/"
    if experiment_id is None:
        return base
    return (f"{base}#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def _wait_ready(proc: Any, url: str, timeout: float = 120.0) -> bool:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def _open_browser(url: str) -> bool:
    """Open ``url`` where a browser can show it (a desktop session); never blocks."""
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                  or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return webbrowser.open(url, new=2)
    except webbrowser.Error:
        return False


def cmd_ui(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    from analysis.runs import find_search
    from trainers.contracts import default_tracking_uri

    uri = default_tracking_uri(args.tracking_uri)
    found = find_search(args.name, uri)
    if args.name is not None and found is None:
        raise CliError(f"no search named {args.name!r} in {uri}")
    if found is not None:
        from mlflow.tracking import MlflowClient

        from trainers.tracking import experiment_id

        experiment_id(MlflowClient(uri), found[1])  # tags an older search for the ML mode
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = ui_url(args.host, args.port, found[0] if found else None)
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)  # stdout: the address alone

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # a service manager's stop ends the server too
    try:
        if not _wait_ready(proc, f"http://{args.host}:{args.port}/"):
            return proc.wait()
        what = f"search {found[1]!r}" if found else "no search yet"
        print(f"MLflow UI for {uri} ({what}): {url}  (Ctrl-C to stop)", flush=True)
        if not args.no_browser:
            _open_browser(url)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.pipeline import write_report

    out = Path(args.out or Path("reports") / args.name)
    report = write_report(args.name, args.tracking_uri, out, args.max_flops_per_example,
                          args.budget_flops)
    print(f"report: {report / 'report.html'} (+ PNG figures, summary.json); logged to the "
          f"search's parent run in MLflow")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from analysis.pipeline import export_best

    path = export_best(args.name, args.tracking_uri, args.output, args.max_flops_per_example,
                       args.budget_flops, force=args.force)
    print(f"exported {path}; train it with: recscale train {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recscale.demo import demo

    return demo(args)


