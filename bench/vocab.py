"""Memory of a 1M-distinct-value field, with an exact vocabulary and hashed.

Writes a synthetic CSV (``--rows`` rows; a ``device`` field with exactly ``--distinct``
distinct values, plus two small fields and a label that depends on them), then, for
each case, in a fresh process (so peak RSS is the case's own):

  * ``exact``  — ``hash_buckets=0, min_count=1``: one embedding row per distinct train value;
  * ``hashed`` — the defaults: ``hash_buckets=2^17``, the device field hashed;

encodes it through ``load_dataset`` (read, split, vocabularies, cache write), builds the
model and trains it briefly with the project's training loop (AdamW, dense embedding
gradients, as a trial does), and records: embedding rows and ``params_embedding``
(``model_cost``), the size of the weights and of a resumable checkpoint (weights +
optimiser state, as a trial writes), encode and train seconds, peak RSS after encoding
and after training, and the validation log loss reached (a sanity check that both train,
not a quality comparison).

With ``--search``, each case is instead a whole ``recscale search`` over the same file
(the wukong space, 2 concurrent trials, the reference models first, a small budget), and
what is recorded is the memory of the search: the peak over time of the summed
proportional set size (PSS: shared pages divided among the processes that map them, so
Ray's object store is counted once) of the command and every process it starts (the
driver, Ray's GCS, raylet and workers), sampled every second; the largest trial's own peak
RSS (the trials' ``peak_rss_mb`` in MLflow); and the size of the search's folders.

    .venv/bin/python bench/vocab.py [--rows 1200000] [--distinct 1000000]
                                    [--out bench/results/vocab.json]
    .venv/bin/python bench/vocab.py --search [--budget-flops 4e10]   # -> the JSON's "search" key
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path[:] = [_ROOT] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

CASES = {"exact": {"hash_buckets": 0, "min_count": 1}, "hashed": {}}
MODEL = {"block": "wukong", "d_model": 16, "n_tokens": 2, "n_layers": 1, "embed_dim": 16}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_data(folder: Path, rows: int, distinct: int, seed: int = 0) -> tuple[Path, Path]:
    """A CSV whose ``device`` column holds exactly ``distinct`` distinct values."""
    rng = np.random.default_rng(seed)
    device = np.concatenate([np.arange(distinct), rng.integers(0, distinct, rows - distinct)])
    rng.shuffle(device)
    ad = rng.integers(0, 200, rows)
    hour = rng.integers(0, 24, rows)
    logit = -1.0 + 0.8 * np.sin(ad / 7.0) + 0.5 * np.cos(hour / 3.0)
    click = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    csv = folder / "wide.csv"
    pd.DataFrame({"device": np.char.add("dev-", device.astype(str)), "ad": ad, "hour": hour,
                  "click": click}).to_csv(csv, index=False)
    schema = folder / "wide.yaml"
    schema.write_text("label: click\ncategorical: [device, ad, hour]\n")
    return csv, schema


def run_case(name: str, csv: str, schema: str, cache: str, examples: int) -> dict[str, object]:
    """One case, in this (fresh) process."""
    import torch

    from spaces.model import ModelConfig, model_cost
    from trainers.data import DataConfig, load_dataset
    from trainers.loop import TrainConfig, train

    torch.set_num_threads(2)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    cfg = DataConfig(name="file", path=csv, schema_path=schema, **CASES[name])
    ds = load_dataset(cfg, cache)
    encode_s = time.perf_counter() - t0
    rss_encode = peak_rss_mb()
    model_cfg = ModelConfig(**MODEL)
    cost = model_cost(model_cfg, ds.spec)
    tcfg = TrainConfig(lr=3e-3, batch_size=1024, max_examples=examples, eval_every=examples,
                       eval_max_examples=50_000)
    t0 = time.perf_counter()
    res = train(model_cfg, tcfg, ds.spec, ds.train, ds.val)
    train_s = time.perf_counter() - t0
    weights = io.BytesIO()
    torch.save(res.model.state_dict(), weights)
    opt = torch.optim.AdamW(res.model.parameters())  # a checkpoint's optimiser state, filled
    for p in res.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    ckpt = io.BytesIO()
    torch.save({"model": res.model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    return {
        "case": name, "data_options": CASES[name],
        "embedding_rows": dict(zip(ds.spec.field_names, ds.spec.cardinalities, strict=False)),
        "device_vocab": ds.meta["vocab"]["device"],
        "params_embedding": cost.params_embedding, "params_dense": cost.params_dense,
        "embedding_mb": cost.params_embedding * 4 / 2**20,
        "weights_file_mb": len(weights.getvalue()) / 2**20,
        "checkpoint_mb": len(ckpt.getvalue()) / 2**20,
        "encode_s": encode_s, "train_s": train_s, "train_examples": examples,
        "peak_rss_mb_start": base, "peak_rss_mb_after_encode": rss_encode,
        "peak_rss_mb_after_train": peak_rss_mb(),
        "val_logloss": float(res.metrics["val_logloss"]), "train_rows": len(ds.train),
    }


def _tree_pss_mb(proc: psutil.Process) -> float:
    """Summed PSS of ``proc`` and its descendants, MB (processes that end meanwhile are skipped)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total / 2**20


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def search_case(name: str, csv: Path, schema: Path, work: Path, budget: float) -> dict[str, object]:
    """One ``recscale search`` over the file with the case's vocabulary options; its
    memory over time (see the module docstring)."""
    import os

    from mlflow.tracking import MlflowClient

    options = CASES[name]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    work.mkdir(parents=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "recscale", "search", "--data", str(csv), "--schema",
           str(schema), *flags, "--space", "wukong", "--name", f"vocab-{name}",
           "--budget-flops", str(budget), "--trial-flops", str(budget / 4),
           "--max-concurrent", "2", "--gpus", "off", "--storage", str(work / "ray"),
           "--tracking-uri", uri, "-v", "0"]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": _ROOT,
           "RECSCALE_CACHE": str(work / "cache")}
    t0 = time.perf_counter()
    # stderr to a file: a pipe read only at the end fills up and blocks the search
    err_path = work / "search.err"
    with err_path.open("wb") as err_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_file,
                                start_new_session=True)
    ps, peak, series = psutil.Process(proc.pid), 0.0, []
    while proc.poll() is None:
        pss = _tree_pss_mb(ps)
        peak = max(peak, pss)
        series.append((round(time.perf_counter() - t0, 1), round(pss, 1)))
        time.sleep(1)
    err = err_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"search {name} failed ({proc.returncode}): {err[-2000:]}")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"vocab-{name}")
    runs = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'trial'")
    trial_peaks = [r.data.metrics["peak_rss_mb"] for r in runs if "peak_rss_mb" in r.data.metrics]
    return {"case": name, "data_options": options, "budget_flops": budget,
            "wall_s": time.perf_counter() - t0, "trials": len(runs),
            "peak_pss_mb_search_tree": peak,
            "trial_peak_rss_mb_max": max(trial_peaks, default=float("nan")),
            "ray_storage_mb": _folder_mb(work / "ray"),
            "mlflow_artifacts_mb": _folder_mb(work / "mlartifacts") if (work / "mlartifacts").exists() else 0.0,
            "cache_mb": _folder_mb(work / "cache"), "pss_mb_series": series}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_200_000)
    ap.add_argument("--distinct", type=int, default=1_000_000)
    ap.add_argument("--examples", type=int, default=100_000, help="examples trained per case")
    ap.add_argument("--out", default=str(Path(_ROOT) / "bench" / "results" / "vocab.json"))
    ap.add_argument("--search", action="store_true",
                    help="measure a whole recscale search per case (the JSON's 'search' key)")
    ap.add_argument("--budget-flops", type=float, default=4e10, help="with --search")
    ap.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # child process
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    ap.add_argument("--schema", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.csv, args.schema, args.cache, args.examples)))
        return
    if args.search:
        with tempfile.TemporaryDirectory() as tmp:
            csv, schema = write_data(Path(tmp), args.rows, args.distinct)
            found = [search_case(case, csv, schema, Path(tmp) / case, args.budget_flops)
                     for case in CASES]
        for r in found:
            print(f"{r['case']}: search tree peak PSS {r['peak_pss_mb_search_tree']:.0f} MB, "
                  f"largest trial peak RSS {r['trial_peak_rss_mb_max']:.0f} MB, {r['trials']} "
                  f"trials in {r['wall_s']:.0f} s, Ray storage {r['ray_storage_mb']:.0f} MB",
                  flush=True)
        path = Path(args.out)
        record = json.loads(path.read_text()) if path.exists() else {}
        record["search"] = {"rows": args.rows, "distinct": args.distinct, "cases": found}
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"-> {args.out} ('search')")
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        csv, schema = write_data(Path(tmp), args.rows, args.distinct)
        print(f"wrote {csv.stat().st_size / 2**20:.0f} MB in {time.perf_counter() - t0:.0f} s",
              flush=True)
        results = []
        for case in CASES:
            proc = subprocess.run(
                [sys.executable, __file__, "--case", case, "--csv", str(csv), "--schema",
                 str(schema), "--cache", str(Path(tmp) / f"cache-{case}"), "--examples",
                 str(args.examples)], capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{case}: device rows {r['embedding_rows']['device']:,}, embedding "
                  f"{r['embedding_mb']:.1f} MB, checkpoint {r['checkpoint_mb']:.1f} MB, "
                  f"peak RSS {r['peak_rss_mb_after_train']:.0f} MB "
                  f"(after encoding {r['peak_rss_mb_after_encode']:.0f} MB), "
                  f"val_logloss {r['val_logloss']:.4f}", flush=True)
    rows_10m = 10_000_000 * MODEL["embed_dim"] * 4 / 2**20
    out = {"rows": args.rows, "distinct": args.distinct, "model": MODEL, "cases": results,
           **{k: v for k, v in (json.loads(Path(args.out).read_text()).items()
                                if Path(args.out).exists() else []) if k == "search"},
           "arithmetic_10M_distinct_exact_weights_mb": rows_10m,
           "arithmetic_10M_distinct_exact_weights_grad_adam_mb": 4 * rows_10m}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
