"""The GPU path measured: per-family training throughput and MFU, fp32 vs bf16, data
placement, and fractional packing of small trials (issue 15).

Every figure comes from the real training loop (``trainers.loop.train``) on random
synthetic data (16 categorical fields, 2 numeric; the data does not change the cost):

* **throughput / MFU** per block family at widths ``D`` (128, 256, 512 on a GPU), in
  fp32 and bf16 (``TrainConfig.precision``): examples/s over the steps after a warm-up,
  achieved FLOP/s = 3 x analytic forward FLOPs per example x examples/s (forward +
  backward, the convention of ``train_flops``), and MFU = achieved / the device's peak
  at that precision. The peak is ``--peak-tflops`` if given, else the table below by
  device name, else a square-matmul peak measured here (always so on a CPU).
* **placement**: one family and width under ``host``, ``resident`` and ``pinned``
  (``trainers.placement``). On a CPU all three read the same memory (the twins run;
  the figures only show that the twins cost nothing).
* **packing**: ``k`` small trials at once on one device (as Ray packs trials at a
  ``1/k`` GPU share; on a CPU each gets ``threads/k`` threads) against one at a time:
  trials/hour over ``k x trials_each`` trials, process start-up excluded.

``--check`` runs the GPU path's correctness checks on the device instead (SDPA against
the written-out attention in fp32 and bf16, the FLOPs counter against the analytic count,
bf16 vs fp32 training loss, every placement training the same weights) and exits 1 if one
fails, so a GPU session can run them in one call.

    PYTHONPATH=. .venv/bin/python bench/gpu.py --device cpu [--quick]   # < 3 min, small
    PYTHONPATH=. .venv/bin/python bench/gpu.py --device cuda            # < 8 min on one GPU
    PYTHONPATH=. .venv/bin/python bench/gpu.py --device cuda --check
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spaces import FeatureSpec, ModelConfig
from trainers.data import Split
from trainers.loop import TrainConfig, train

#: Dense peak FLOP/s by device-name substring: (fp32 without TF32, bf16), from the vendors'
#: data sheets (SXM parts; torch's default fp32 matmul does not use TF32).
PEAKS: dict[str, tuple[float, float]] = {
    "H200": (66.9e12, 989.4e12),
    "H100": (66.9e12, 989.4e12),
    "A100": (19.5e12, 312e12),
    "L40S": (91.6e12, 362.1e12),
    "A10G": (31.2e12, 70e12),
}
N_CAT, N_NUM, CARD = 16, 2, 1000

# per device: widths, tokens, layers, batch, measured steps, families, packing ks
PLANS: dict[str, dict[str, Any]] = {
    "cuda": {"widths": (128, 256, 512), "tokens": 16, "layers": 4, "batch": 4096, "steps": 30,
             "families": ("attention", "tokenmixer", "wukong", "unimixing", "unimixing_lite"),
             "ks": (1, 2, 4, 8), "trials_each": 2, "pack_examples": 200_000, "matmul_n": 8192},
    "cpu": {"widths": (64, 128), "tokens": 8, "layers": 2, "batch": 256, "steps": 5,
            "families": ("attention", "tokenmixer", "wukong", "unimixing"),
            "ks": (1, 2), "trials_each": 2, "pack_examples": 6_000, "matmul_n": 1024},
    "quick": {"widths": (32,), "tokens": 4, "layers": 1, "batch": 128, "steps": 4,
              "families": ("attention", "tokenmixer"),
              "ks": (1, 2), "trials_each": 1, "pack_examples": 1_000, "matmul_n": 512},
}
WARMUP = 3


def synthetic(n: int, seed: int) -> tuple[FeatureSpec, Split]:
    """Random ids, numerics and labels (throughput does not depend on what is learnt)."""
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(0, CARD, (n, N_CAT), generator=g)
    label = (torch.rand(n, generator=g) < 0.3).float()
    return FeatureSpec((CARD,) * N_CAT, N_NUM), Split(cat, torch.randn(n, N_NUM, generator=g),
                                                      label)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of square ``n x n`` matmuls on ``device`` (median of repeats)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        times.append((time.perf_counter() - t0) / 5)
    return 2 * n**3 / statistics.median(times)


def peaks_for(device: torch.device, override_tflops: float | None,
              n: int) -> tuple[dict[str, float], str]:
    """``{"fp32": FLOP/s, "bf16": FLOP/s}`` and where they came from."""
    if override_tflops is not None:
        return {"fp32": override_tflops * 1e12, "bf16": override_tflops * 1e12}, "argument"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (fp32, bf16) in PEAKS.items():
            if key in name:
                return {"fp32": fp32, "bf16": bf16}, f"table ({key})"
    return ({"fp32": matmul_peak(device, torch.float32, n),
             "bf16": matmul_peak(device, torch.bfloat16, n)}, "measured")


def model_config(family: str, d: int, plan: dict[str, Any]) -> ModelConfig:
    return ModelConfig(block=family, d_model=d, n_tokens=plan["tokens"], n_layers=plan["layers"],
                       embed_dim=min(64, d), head_hidden=(d,))


def measure(cfg: ModelConfig, device: torch.device, plan: dict[str, Any], precision: str,
            placement: str, data: tuple[FeatureSpec, Split, Split]) -> dict[str, Any]:
    """Examples/s of the training loop after ``WARMUP`` steps, and its FLOPs."""
    spec, tr, va = data
    bs, steps = plan["batch"], plan["steps"] + WARMUP
    marks: list[tuple[int, float]] = []

    def on_step(seen: int, loss: float) -> None:  # the loop syncs on the loss each step
        marks.append((seen, time.perf_counter()))

    tc = TrainConfig(batch_size=bs, max_examples=bs * steps, eval_every=bs * steps,
                     eval_max_examples=bs, precision=precision,  # type: ignore[arg-type]
                     placement=placement)  # type: ignore[arg-type]
    res = train(cfg, tc, spec, tr, va, on_step=on_step, device=device)
    (s0, t0), (s1, t1) = marks[WARMUP - 1], marks[-1]
    ex_s = (s1 - s0) / (t1 - t0)
    fpe = res.metrics["flops_per_example"]
    return {"examples_per_s": ex_s, "flops_per_example": fpe, "achieved_flops": 3 * fpe * ex_s,
            "final_train_loss": res.metrics["train_loss"], "status": res.status}


def throughput(device: torch.device, plan: dict[str, Any], peaks: dict[str, float],
               log: Any) -> list[dict[str, Any]]:
    n = plan["batch"] * 8
    spec, tr = synthetic(n, 0)
    data = (spec, tr, synthetic(plan["batch"], 1)[1])
    rows = []
    for family in plan["families"]:
        for d in plan["widths"]:
            for precision in ("fp32", "bf16"):
                r = measure(model_config(family, d, plan), device, plan, precision, "host", data)
                r.update(family=family, d_model=d, precision=precision, placement="host",
                         mfu=r["achieved_flops"] / peaks[precision])
                rows.append(r)
                log(f"{family:15s} D={d:4d} {precision} {r['examples_per_s']:11.0f} ex/s "
                    f"{r['achieved_flops'] / 1e12:8.3f} TFLOP/s  MFU {r['mfu']:6.1%}")
    return rows


def placements(device: torch.device, plan: dict[str, Any], peaks: dict[str, float],
               log: Any) -> list[dict[str, Any]]:
    d = plan["widths"][len(plan["widths"]) // 2]
    precision = "bf16" if device.type == "cuda" else "fp32"
    spec, tr = synthetic(plan["batch"] * 64, 0)
    data = (spec, tr, synthetic(plan["batch"], 1)[1])
    rows = []
    for placement in ("host", "resident", "pinned"):
        r = measure(model_config("tokenmixer", d, plan), device, plan, precision, placement, data)
        r.update(family="tokenmixer", d_model=d, precision=precision, placement=placement,
                 mfu=r["achieved_flops"] / peaks[precision])
        rows.append(r)
        log(f"placement {placement:8s} tokenmixer D={d} {precision} "
            f"{r['examples_per_s']:11.0f} ex/s")
    return rows


def _pack_worker(device: str, threads: int, plan: dict[str, Any], ready: Any, go: Any,
                 done: Any) -> None:
    """One packed trial slot: build everything, wait for the start, run the trials."""
    torch.set_num_threads(threads)
    spec, tr = synthetic(plan["pack_examples"], 0)
    va = synthetic(1024, 1)[1]
    cfg = ModelConfig(block="tokenmixer", d_model=64, n_tokens=8, n_layers=2, embed_dim=16,
                      head_hidden=(64,))
    bs = 512 if device == "cuda" else 128
    tc = TrainConfig(batch_size=bs, max_examples=plan["pack_examples"], eval_every=plan[
        "pack_examples"] // 2, eval_max_examples=1024, seed=0)
    train(cfg, tc.model_copy(update={"max_examples": bs * 2}), spec, tr, va, device=device)
    ready.put(1)
    go.wait()
    for i in range(plan["trials_each"]):
        train(cfg, tc.model_copy(update={"seed": i}), spec, tr, va, device=device)
    done.put(time.perf_counter())


def packing(device: torch.device, plan: dict[str, Any], threads: int,
            log: Any) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    rows = []
    for k in plan["ks"]:
        ready, go, done = ctx.Queue(), ctx.Event(), ctx.Queue()
        each = max(1, threads // k) if device.type == "cpu" else 1
        procs = [ctx.Process(target=_pack_worker, args=(device.type, each, plan, ready, go, done))
                 for _ in range(k)]
        for p in procs:
            p.start()
        # start-up (imports, data, one short warm-up trial) is excluded: all start at once
        for _ in procs:
            ready.get(timeout=600)
        t0 = time.perf_counter()
        go.set()
        ends = [done.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        wall = max(ends) - t0
        n = k * plan["trials_each"]
        rows.append({"trials_per_device": k, "share": 1 / k, "threads_each": each, "trials": n,
                     "wall_s": wall, "trials_per_hour": n / wall * 3600})
        log(f"packing k={k}: {n} trials in {wall:.1f} s -> {rows[-1]['trials_per_hour']:.0f}/h")
    base = rows[0]["trials_per_hour"]
    for r in rows:
        r["vs_one_per_device"] = r["trials_per_hour"] / base
    return rows


# ----------------------------------------------------------------------------- checks


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v.float()


def run_checks(device: torch.device, log: Any) -> bool:
    """The GPU path's correctness checks on ``device``; True if all pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from spaces.blocks.attention import Attention, AttentionConfig, softmax_attention
    from spaces.flops import torch_flops

    results: list[tuple[str, bool, str]] = []

    def record(name: str, ok: bool, detail: str) -> None:
        results.append((name, ok, detail))
        log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, 4, 16, 32, generator=g).to(device) for _ in range(3))
    ref = _reference_attention(q, k, v)
    err = float((softmax_attention(q, k, v) - ref).abs().max())
    record("sdpa fp32 = reference", err < 1e-4, f"max abs error {err:.2e}")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = softmax_attention(q, k, v)
    err = float((out.float() - ref).abs().max())
    record("sdpa bf16 ~ reference", err < 5e-2 and out.dtype == torch.bfloat16,
           f"max abs error {err:.2e}, dtype {out.dtype}")

    cfg = AttentionConfig(kind="softmax", n_heads=4, partitions=2)
    blk = Attention(cfg, 16, 64).to(device)
    x = torch.randn(8, 16, 64, device=device)
    analytic = 8 * Attention.count_flops(cfg, 16, 64).per_example
    math_count = torch_flops(blk, (x,))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        blk(x)
    fused = counter.get_total_flops()
    scores = 8 * 4 * 16 * 16 * 64 // 2
    record("flops: math backend = analytic", math_count == analytic,
           f"{math_count} vs {analytic}")
    # CUDA's flash / efficient kernels have counter formulas (exact); CPU's fused kernel
    # has none in torch 2.13, so only the score matmuls go missing there
    record("flops: default backend", fused in (analytic, analytic - scores),
           f"{fused} (analytic {analytic}, without scores {analytic - scores})")

    spec, tr = _planted(3000, 0)
    va = _planted(1000, 1)[1]
    mcfg = ModelConfig(block="attention", d_model=32, n_tokens=4, n_layers=1, embed_dim=8,
                       head_hidden=(32,), attention={"n_heads": 2})
    tc = TrainConfig(lr=3e-3, batch_size=100, max_examples=3000, eval_every=3000, seed=0)
    runs = {p: train(mcfg, tc.model_copy(update={"precision": p}), spec, tr, va, device=device)
            for p in ("fp32", "bf16")}
    a, b = (runs[p].metrics["val_logloss"] for p in ("fp32", "bf16"))
    record("bf16 vs fp32 val logloss", abs(a - b) < 0.03, f"{b:.4f} vs {a:.4f}")

    host = runs["fp32"].model.state_dict()
    for placement in ("resident", "pinned", "auto"):
        other = train(mcfg, tc.model_copy(update={"placement": placement}), spec, tr, va,
                      device=device).model.state_dict()
        diff = max(float((host[n] - other[n]).abs().max()) for n in host if host[n].numel())
        tol = 0.0 if device.type == "cpu" else 1e-4  # CUDA's embedding backward is atomic
        record(f"placement {placement} = host", diff <= tol, f"max weight difference {diff:.2e}")
    bad = [n for n, ok, _ in results if not ok]
    log("all checks passed" if not bad else f"{len(bad)} checks failed: {', '.join(bad)}")
    return not bad


def _planted(n: int, seed: int) -> tuple[FeatureSpec, Split]:
    """A learnable pairwise-interaction task (labels from planted field embeddings)."""
    g = torch.Generator().manual_seed(seed)
    teach = [torch.randn(10, 4, generator=torch.Generator().manual_seed(99 + i)) for i in range(4)]
    cat = torch.randint(0, 10, (n, 4), generator=g)
    emb = [teach[f][cat[:, f]] for f in range(4)]
    logit = sum((emb[i] * emb[j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    label = (torch.as_tensor(logit) > torch.as_tensor(logit).median()).float()
    return FeatureSpec((10,) * 4, 0), Split(cat, torch.zeros(n, 0), label)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test's smoke run)")
    parser.add_argument("--check", action="store_true", help="correctness checks only")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak (TFLOP/s) for MFU; default: table or measured")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="default bench/results/gpu_<device>.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.check:
        return 0 if run_checks(device, log) else 1
    plan = PLANS["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    started = time.perf_counter()
    peaks, source = peaks_for(device, args.peak_tflops, plan["matmul_n"])
    log(f"peak ({source}): fp32 {peaks['fp32'] / 1e12:.3f}, bf16 {peaks['bf16'] / 1e12:.3f} "
        "TFLOP/s")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    out: dict[str, Any] = {
        "device": device.type, "device_name": name, "threads": args.threads,
        "torch": torch.__version__, "quick": args.quick, "peak_flops": peaks,
        "peak_source": source, "load_average_start": list(os.getloadavg()), "plan": {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in plan.items()},
    }
    out["throughput"] = throughput(device, plan, peaks, log)
    out["placement"] = placements(device, plan, peaks, log)
    out["packing"] = packing(device, plan, args.threads, log)
    out["wall_s"] = time.perf_counter() - started
    out["load_average_end"] = list(os.getloadavg())  # shared cores: read the figures with it
    path = Path(args.out or f"bench/results/gpu_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    log(f"written {path} in {out['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
