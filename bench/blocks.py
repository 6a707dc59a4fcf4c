"""Forward+backward throughput of every block family, beside this machine's matmul peak.

For each family and two sizes, a stack of ``L`` blocks with the family's default knobs
trains on random tokens; we time forward+backward steps and report examples/s and the
achieved GFLOP/s (3 x analytic forward FLOPs per example x examples/s). In the same run
we measure float32 matmul GFLOP/s (square matmuls) with the same thread count, so the
ratio (achieved / matmul) is comparable across machines.

    .venv/bin/python bench/blocks.py [--threads 2] [--out bench/results/blocks.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from spaces.blocks import block_names, get_block

SIZES = {"small": {"n_tokens": 8, "d_model": 64, "batch": 256},
         "large": {"n_tokens": 16, "d_model": 256, "batch": 256}}
LAYERS = 2


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_family(name: str, t: int, d: int, batch: int, seconds: float) -> dict[str, float | str]:
    cls = get_block(name)
    cfg = cls.Config()
    torch.manual_seed(0)
    blocks, tokens = [], t
    for _ in range(LAYERS):
        blocks.append(cls(cfg, tokens, d))
        tokens = blocks[-1].out_tokens
    stack = torch.nn.Sequential(*blocks)
    fwd = sum(cls.count_flops(cfg, b.n_tokens, d).per_example for b in blocks)
    per_batch = sum(cls.count_flops(cfg, b.n_tokens, d).per_batch for b in blocks)
    opt = torch.optim.AdamW(stack.parameters(), lr=1e-4)
    x = torch.randn(batch, t, d)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        stack(x).square().mean().backward()
        opt.step()

    for _ in range(3):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - t0
    ex_s = steps * batch / elapsed
    gflops = 3 * (fwd * ex_s + per_batch * steps / elapsed) / 1e9
    return {"family": name, "n_tokens": t, "d_model": d, "layers": LAYERS, "batch": batch,
            "flops_per_example": fwd, "params": sum(p.numel() for p in stack.parameters()),
            "examples_per_s": ex_s, "gflops": gflops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default="bench/results/blocks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_gflops()
    rows = []
    for size, dims in SIZES.items():
        for name in block_names():
            row = bench_family(name, dims["n_tokens"], dims["d_model"], dims["batch"], args.seconds)
            row["size"] = size
            row["fraction_of_matmul"] = float(row["gflops"]) / peak
            rows.append(row)
            print(f"{size:5s} {name:15s} {row['examples_per_s']:10.0f} ex/s "
                  f"{row['gflops']:7.2f} GFLOP/s  ({row['fraction_of_matmul']:.1%} of matmul)",
                  flush=True)
    peak_after = matmul_gflops()
    out = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
           "torch": torch.__version__, "matmul_gflops": peak, "matmul_gflops_after": peak_after,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"float32 matmul: {peak:.1f} GFLOP/s before, {peak_after:.1f} after; written {args.out}")


if __name__ == "__main__":
    main()
