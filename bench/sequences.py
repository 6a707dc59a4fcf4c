"""Behaviour histories on MovieLens-1M: what they cost to store, what they add, how fast.

Three parts, one JSON (``bench/results/sequences.json``):

1. **Data.** MovieLens-1M, label ``rating >= 4``, ``split: user_temporal`` (per user:
   last 10 % test, previous 10 % val), ``sequences: true``: encode seconds, the event
   table's and the offsets' bytes (no ``K`` in either) and the process's peak RSS.
2. **Quality.** One family (HSTU attention, 1 layer) with no history and with
   ``K`` in ``--ks``, every run trained on the same ``--examples`` examples (same
   seed, order and schedule) and scored on the first ``--eval`` validation examples.
   ``K = 256`` runs as ASTRO (``partitions = 4``, dynamic temperature) unless
   ``--full-256``. Short runs: the figures compare K's, they are not converged AUCs.
3. **Throughput.** Forward+backward examples/s of a 2-layer softmax stack at
   ``K`` in ``{16, 64, 256}``: full attention (``partitions = 1``) against partitions
   alone (``partitions = 4``) and ASTRO (``partitions = 4``, dynamic temperature),
   beside the analytic FLOPs.

4. **Equal FLOPs.** Softmax attention, HSTU and ASTRO (softmax, ``partitions = 4``,
   dynamic temperature), one layer each, at ``K`` in ``--ks``, each sized (``d_model``)
   to the FLOPs per example nearest ``--equal-flops`` (within ``EQUAL_TOLERANCE``; a
   variant that cannot get that cheap at a ``K``, e.g. full attention over 256 steps,
   is recorded as infeasible with its smallest cost), all trained on the same
   ``--equal-examples`` examples: loss vs ``K`` at equal FLOPs per example, hence equal
   training FLOPs. With ``--equal-evals N`` each run is scored at ``N`` evenly spaced
   points (its ``curve``: loss vs training FLOPs), plotted per ``K`` in
   ``bench/results/sequences_equal_flops.png``.

5. **HSTU's time bias.** The wall time of one training step (forward + backward) of a
   2-layer HSTU stack (d 32) on real batches, with its relative time bias and with the
   bias removed (the same weights otherwise), at ``K`` in ``--ks`` with ``partitions``
   1 and 4; the two alternate, and the fastest of ``TIME_BIAS_REPEATS`` each is kept, so
   a loaded machine's noise hits both alike.

6. **Trained as long** (``--as-long EPOCHS``). The best no-history config of the
   MovieLens-1M search (``bench/results/trust.json``'s export: ``fm`` block, 8 grouped
   tokens, ``embed_dim`` 16, no head, warmup-stable-decay over the run, its learning
   rates and batch) at ``K = 0`` and with histories at ``K`` in ``--ks`` (pooled into 4
   chunk-mean tokens, as the fm block reads them), every run trained for the same
   ``EPOCHS`` passes over the ``user_temporal`` training split, evaluated on the whole
   validation split twice per pass; the best evaluation's weights are scored on the
   whole test split. What the issue's targets are measured on: histories' AUC gain over
   the no-history config trained as long, and the best AUC reached. ``--seq-tokens``
   sets the pooled history tokens; ``--model JSON`` changes the base config (e.g. field
   tokens), and a row records that change as its ``model``.

The machine may be shared (the JSON records the load average before and after): read
examples/s as this machine at that moment. An existing ``--out`` file is updated: the
parts skipped this time keep their earlier figures.

    .venv/bin/python bench/sequences.py [--examples 60000] [--eval 20000] [--threads 2]
    .venv/bin/python bench/sequences.py --skip-throughput --skip-quality \
        --equal-flops 1e6 --equal-examples 10000 --eval 5000 [--equal-evals 4]
    .venv/bin/python bench/sequences.py --skip-throughput --skip-quality --skip-equal \
        --threads 1 --ks 64 256                                   # part 5 only
    .venv/bin/python bench/sequences.py --skip-throughput --skip-quality --skip-equal \
        --skip-time-bias --as-long 2 [--seq-tokens 4] [--model '{}']  # part 6 only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spaces import ModelConfig, build_model, model_cost
from spaces.blocks import BlockDimensionError
from trainers.data import DataConfig, load_dataset
from trainers.loop import TrainConfig, evaluate, train
from trainers.sequences import model_inputs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hstu(k: int, partitions: int = 1, temperature: str = "fixed") -> ModelConfig:
    return ModelConfig(**{"block": "attention", "n_layers": 1, "d_model": 32, "n_tokens": 4,
                          "embed_dim": 16, "head_hidden": (64,), "seq_len": k,
                          "attention": {"kind": "hstu", "n_heads": 2, "partitions": partitions,
                                        "temperature": temperature}})


def quality(ds: Any, ks: list[int], examples: int, n_eval: int, full_256: bool,
            save: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    train_cfg = TrainConfig(lr=3e-3, optimizer="adamw_split", embedding_lr=1e-2, batch_size=512,
                            max_examples=examples, eval_every=examples, eval_max_examples=n_eval,
                            seed=0)
    for k in [0, *ks]:
        astro = k >= 256 and not full_256
        cfg = hstu(k, 4, "dynamic") if astro else hstu(k)
        t0 = time.perf_counter()
        res = train(cfg, train_cfg, ds.spec, ds.train, ds.val)
        row = {"K": k, "variant": "astro p4 dynamic" if astro else "hstu p1",
               "val_auc": res.metrics["val_auc"], "val_logloss": res.metrics["val_logloss"],
               "flops_per_example": model_cost(cfg, ds.spec).flops_per_example,
               "examples": examples, "seconds": time.perf_counter() - t0,
               "examples_per_s": res.metrics["examples_per_s"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        save(rows)  # a run cut short keeps what it measured
    return rows


def throughput(ds: Any, ks: list[int], batch: int = 256, steps: int = 3) -> list[dict[str, Any]]:
    rows = []
    idx = torch.arange(batch)
    for k in ks:
        for name, parts, temp in (("full", 1, "fixed"), ("partitions4", 4, "fixed"),
                                  ("astro", 4, "dynamic")):
            cfg = ModelConfig(**{"block": "attention", "n_layers": 2, "d_model": 64,
                                 "n_tokens": 4, "embed_dim": 16, "seq_len": k,
                                 "attention": {"kind": "softmax", "n_heads": 4,
                                               "partitions": parts, "temperature": temp}})
            torch.manual_seed(0)
            model = build_model(cfg, ds.spec)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            inputs = model_inputs(model, ds.train, idx, "cpu")
            label = ds.train.label[:batch]
            times = []
            for step in range(steps + 1):
                t0 = time.perf_counter()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(*inputs), label)
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                if step:  # the first step warms up
                    times.append(time.perf_counter() - t0)
            fpe = model_cost(cfg, ds.spec).flops_per_example
            eps = batch / statistics.median(times)
            row = {"K": k, "attention": name, "examples_per_s": eps, "flops_per_example": fpe,
                   "achieved_gflops": 3 * fpe * eps / 1e9}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


#: how far (as a ratio) a sized model's FLOPs per example may be from the target
EQUAL_TOLERANCE = 1.3
EQUAL_VARIANTS = {"softmax": ("softmax", 1, "fixed"), "hstu": ("hstu", 1, "fixed"),
                  "astro": ("softmax", 4, "dynamic")}


def sized(variant: str, k: int, target: float, spec: Any) -> tuple[ModelConfig | None, float]:
    """The ``variant`` at history length ``k`` whose FLOPs per example are nearest
    ``target`` over ``d_model`` in 4..256 (step 4), and its cost; None (with the smallest
    cost found) when none is within ``EQUAL_TOLERANCE`` of it."""
    kind, parts, temp = EQUAL_VARIANTS[variant]
    best: tuple[float, ModelConfig, float] | None = None
    cheapest = float("inf")
    for d in range(4, 257, 4):
        cfg = ModelConfig(**{"block": "attention", "n_layers": 1, "d_model": d, "n_tokens": 4,
                             "embed_dim": 16, "head_hidden": (64,), "seq_len": k,
                             "attention": {"kind": kind, "n_heads": 2, "partitions": parts,
                                           "temperature": temp, "ffn_mult": 1}})
        try:
            fpe = float(model_cost(cfg, spec).flops_per_example)
        except (ValueError, BlockDimensionError):  # a width the block refuses
            continue
        cheapest = min(cheapest, fpe)
        gap = abs(math.log(fpe / target))
        if best is None or gap < best[0]:
            best = (gap, cfg, fpe)
    if best is None or best[0] > math.log(EQUAL_TOLERANCE):
        return None, cheapest
    return best[1], best[2]


def equal_flops(ds: Any, ks: list[int], target: float, examples: int, n_eval: int,
                save: Any, previous: list[dict[str, Any]], evals: int = 1) -> list[dict[str, Any]]:
    """Train every variant at every ``K`` of ``ks``, scoring each ``evals`` times; the
    ``previous`` rows of other ``(K, variant, target)`` are kept (a later run can add
    ``K = 0``, say)."""
    redo = {(k, v, target) for k in ks for v in EQUAL_VARIANTS}
    rows = [r for r in previous
            if (r["K"], r["variant"], r["target_flops_per_example"]) not in redo]
    batch = 512
    every = max(batch, examples // max(1, evals) // batch * batch)
    train_cfg = TrainConfig(lr=3e-3, optimizer="adamw_split", embedding_lr=1e-2, batch_size=batch,
                            max_examples=examples, eval_every=every, eval_max_examples=n_eval,
                            seed=0)
    for k in ks:
        for variant in EQUAL_VARIANTS:
            if k == 0 and variant == "astro":  # no history to partition
                continue
            cfg, fpe = sized(variant, k, target, ds.spec)
            row: dict[str, Any] = {"K": k, "variant": variant, "target_flops_per_example": target}
            if cfg is None:
                row.update(status="infeasible", cheapest_flops_per_example=fpe)
            else:
                t0 = time.perf_counter()
                res = train(cfg, train_cfg, ds.spec, ds.train, ds.val)
                row.update(status=res.status, d_model=cfg.d_model, flops_per_example=fpe,
                           val_auc=res.metrics["val_auc"], val_logloss=res.metrics["val_logloss"],
                           examples=examples, eval_examples=n_eval,
                           seconds=time.perf_counter() - t0,
                           examples_per_s=res.metrics["examples_per_s"])
                if evals > 1:
                    row["curve"] = [{k: float(h[k]) for k in CURVE_KEYS if k in h}
                                    for h in res.history]
            print(json.dumps(row), flush=True)
            rows.append(row)
            rows.sort(key=lambda r: (r["target_flops_per_example"], r["K"],
                                     list(EQUAL_VARIANTS).index(r["variant"])))
            save(equal=rows)  # a run cut short keeps what it measured
    return rows


CURVE_KEYS = ("examples_seen", "train_flops", "val_logloss", "val_auc")


def plot_equal_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Validation log loss against training FLOPs, one panel per ``K``, one line per
    variant and FLOPs-per-example target (rows that have a ``curve``); None if none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curve = [r for r in rows if r.get("curve")]
    if not with_curve:
        return None
    ks = sorted({r["K"] for r in with_curve})
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.6), squeeze=False,
                             sharey=True)
    colours = {"softmax": "tab:blue", "hstu": "tab:orange", "astro": "tab:green"}
    targets = sorted({r["target_flops_per_example"] for r in with_curve})
    styles = dict(zip(targets, ("-", "--", ":", "-.")))
    for ax, k in zip(axes[0], ks):
        for r in (r for r in with_curve if r["K"] == k):
            xs = [c["train_flops"] for c in r["curve"]]
            ys = [c["val_logloss"] for c in r["curve"]]
            ax.plot(xs, ys, styles[r["target_flops_per_example"]], marker="o", ms=3,
                    color=colours.get(r["variant"], "grey"),
                    label=f"{r['variant']} d{r['d_model']} @ {r['flops_per_example']:.2g} FLOPs/ex")
        ax.set_xscale("log")
        ax.set_title(f"K = {k}")
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("val log loss")
    fig.suptitle("Softmax vs HSTU vs ASTRO at equal FLOPs per example (MovieLens-1M, "
                 "user_temporal)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: the best no-history config of the 1e13 MovieLens-1M search (bench/results/trust.json,
#: "exported"), without the history; part 6 adds K to it
AS_LONG_MODEL: dict[str, Any] = {"block": "fm", "n_layers": 1, "d_model": 32, "n_tokens": 8,
                                 "embed_dim": 16, "tokenizer": "grouped", "head_hidden": (),
                                 "fm": {}}
AS_LONG_TRAIN: dict[str, Any] = {"lr": 5.08e-4, "optimizer": "adamw_split",
                                 "embedding_lr": 1.95e-2, "batch_size": 256, "schedule": "wsd",
                                 "warmup_frac": 0.0, "decay_frac": 0.3, "seed": 0}


def as_long_model(update: dict[str, Any]) -> dict[str, Any]:
    """The base config with ``update``; a block section set to null is removed (another
    block: ``{"block": "attention", "fm": null, "attention": {...}}``).

    Example:
        >>> as_long_model({"block": "attention", "fm": None, "attention": {}})["block"]
        'attention'
        >>> "fm" in as_long_model({"fm": None})
        False
    """
    merged = {**AS_LONG_MODEL, **update}
    for key, value in update.items():
        if value is None and isinstance(AS_LONG_MODEL.get(key), dict):
            del merged[key]
    return merged


def as_long(ds: Any, ks: list[int], epochs: float, seq_tokens: int, save: Any,
            previous: list[dict[str, Any]], model_update: dict[str, Any],
            train_update: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Part 6: the no-history config and the same with ``K`` in ``ks`` (history pooled
    into ``seq_tokens`` tokens, fewer when ``K`` is smaller; 0: not pooled, one token
    per step, which only the attention family takes), each trained for ``epochs``
    passes; ``model_update`` and ``train_update`` change the base config and its
    training (recorded as the row's ``model`` and ``train``); ``K = 0`` runs once,
    whether or not ``ks`` names it. The ``previous`` rows of other ``(model, train, K, epochs, seq_tokens)`` are kept."""
    variant = json.dumps(model_update, sort_keys=True) if model_update else ""
    training = json.dumps(train_update, sort_keys=True) if train_update else ""

    def key(r: dict[str, Any]) -> tuple[str, str, int, float, int]:
        return (r.get("model", ""), r.get("train", ""), r["K"], r["epochs"],
                r.get("seq_tokens", 4) if r["K"] else 0)

    todo = sorted({0, *ks})
    redo = {(variant, training, k, epochs, min(seq_tokens, k)) for k in todo}
    rows = [r for r in previous if key(r) not in redo]
    n = len(ds.train)
    train_args = {**AS_LONG_TRAIN, **(train_update or {})}
    bs = train_args["batch_size"]
    train_cfg = TrainConfig(**train_args, max_examples=int(epochs * n) // bs * bs,
                            eval_every=n // 2 // bs * bs, eval_max_examples=None)
    for k in todo:
        tokens = min(seq_tokens, k)
        cfg = ModelConfig(**as_long_model(model_update), seq_len=k, seq_tokens=tokens or None)
        t0 = time.perf_counter()
        res = train(cfg, train_cfg, ds.spec, ds.train, ds.val, keep_best=True)
        seconds = time.perf_counter() - t0
        assert res.best_state is not None
        res.model.load_state_dict(res.best_state)
        test = evaluate(res.model, ds.test, float(ds.train.label.float().mean()), prefix="test")
        row = {"model": variant, "train": training, "K": k, "epochs": epochs, "seq_tokens": tokens, "status": res.status,
               "flops_per_example": model_cost(cfg, ds.spec).flops_per_example,
               "best_val_auc": res.best["val_auc"], "best_val_logloss": res.best["val_logloss"],
               "best_examples_seen": res.best.get("examples_seen"),
               "last_val_auc": res.metrics["val_auc"], "last_val_logloss": res.metrics["val_logloss"],
               "test_auc": test["test_auc"], "test_logloss": test["test_logloss"],
               "val_rows": len(ds.val), "test_rows": len(ds.test), "train_rows": n,
               "seconds": seconds, "examples_per_s": res.metrics["examples_per_s"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        rows.sort(key=key)
        save(as_long_rows=rows)  # a run cut short keeps what it measured
    return rows


TIME_BIAS_REPEATS = 7


def time_bias_cost(ds: Any, ks: list[int], batch: int = 256) -> list[dict[str, Any]]:
    """Training-step milliseconds of HSTU with and without its time bias (part 5)."""
    rows = []
    idx = torch.arange(batch)
    for k in ks:
        for parts in (1, 4):
            models = {}
            for with_bias in (True, False):  # the same model, with and without the bias
                cfg = ModelConfig(**{"block": "attention", "n_layers": 2, "d_model": 32,
                                     "n_tokens": 4, "embed_dim": 16, "seq_len": k,
                                     "seq_time_bias": with_bias,
                                     "attention": {"kind": "hstu", "n_heads": 2,
                                                   "partitions": parts}})
                torch.manual_seed(0)
                models[with_bias] = build_model(cfg, ds.spec)
            inputs = model_inputs(models[True], ds.train, idx, "cpu")
            for m in models.values():
                m(*inputs).sum().backward()  # warm-up
            ms: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(TIME_BIAS_REPEATS):
                for with_bias, m in models.items():
                    t0 = time.perf_counter()
                    m(*inputs).sum().backward()
                    ms[with_bias].append(1e3 * (time.perf_counter() - t0))
            row = {"K": k, "partitions": parts, "batch": batch,
                   "ms_with_time_bias": min(ms[True]), "ms_without": min(ms[False]),
                   "overhead": min(ms[True]) / min(ms[False]) - 1}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=60_000)
    ap.add_argument("--eval", type=int, default=20_000)
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--full-256", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-equal", action="store_true")
    ap.add_argument("--skip-time-bias", action="store_true")
    ap.add_argument("--equal-flops", type=float, default=1e6,
                    help="FLOPs per example every model of the equal-FLOPs part is sized to")
    ap.add_argument("--equal-examples", type=int, default=10_000)
    ap.add_argument("--equal-evals", type=int, default=1,
                    help="evaluations per equal-FLOPs run (> 1: a loss-vs-FLOPs curve and a plot)")
    ap.add_argument("--equal-ks", type=int, nargs="+", default=None,
                    help="the K's of the equal-FLOPs part (default --ks; K = 0: no history, "
                         "every variant the same model)")
    ap.add_argument("--as-long", type=float, default=None, metavar="EPOCHS",
                    help="part 6: the no-history best and K in --ks, each trained EPOCHS passes")
    ap.add_argument("--seq-tokens", type=int, default=4,
                    help="part 6: history tokens after chunked mean pooling")
    ap.add_argument("--model", default="{}", metavar="JSON",
                    help='part 6: changes to the base config, e.g. \'{"tokenizer": "field", '
                         '"n_tokens": null, "embed_dim": 32}\'')
    ap.add_argument("--train", default="{}", metavar="JSON",
                    help="part 6: changes to the base config's training, e.g. '{\"lr\": 1e-3}'")
    ap.add_argument("--out", default="bench/results/sequences.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    ds = load_dataset(DataConfig(split="user_temporal", sequences=True))
    data = {"load_seconds": time.perf_counter() - t0, "peak_rss_mb_before": rss0,
            "peak_rss_mb_after_load": peak_rss_mb(), "rows": ds.meta["rows"],
            "base_rate": ds.meta["base_rate"], "sequences": ds.meta["sequences"],
            "fingerprint": ds.fingerprint}
    print(json.dumps(data), flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    run = {"argv": sys.argv[1:], "threads": args.threads, "loadavg_before": load_before}
    out.update({"machine": out.get("machine") or platform.processor() or platform.machine(),
                "threads": args.threads, "torch": torch.__version__, "data": data})
    out.setdefault("runs", []).append(run)

    def save(quality_rows: list[dict[str, Any]] | None = None,
             equal: list[dict[str, Any]] | None = None,
             as_long_rows: list[dict[str, Any]] | None = None) -> None:
        if quality_rows is not None:
            out["quality"] = quality_rows
        if equal is not None:
            out["equal_flops"] = equal
        if as_long_rows is not None:
            out["as_long"] = as_long_rows
        run["peak_rss_mb"] = peak_rss_mb()
        run["loadavg_after"] = os.getloadavg()
        path.write_text(json.dumps(out, indent=1))

    if not args.skip_throughput:
        out["throughput"] = throughput(ds, args.ks)
        save()
    if not args.skip_quality:
        quality(ds, args.ks, args.examples, args.eval, args.full_256, save)
    if not args.skip_equal:
        rows = equal_flops(ds, args.equal_ks or args.ks, args.equal_flops, args.equal_examples,
                           args.eval, save, list(out.get("equal_flops", [])), args.equal_evals)
        figure = plot_equal_curves(rows, path.with_name("sequences_equal_flops.png"))
        if figure is not None:
            print(f"wrote {figure}")
    if not args.skip_time_bias:
        out["time_bias"] = time_bias_cost(ds, args.ks)
    if args.as_long:
        as_long(ds, args.ks, args.as_long, args.seq_tokens, save, list(out.get("as_long", [])),
                json.loads(args.model), json.loads(args.train))
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
