"""Start-up cost of the command line: what a person waits for before anything runs.

Measures, as fresh processes (the way a person runs them), the wall time of
``recscale --help``, ``recscale search --help`` and the one-line error of
``recscale train`` on a bad file (malformed YAML; a misspelt section, both refused
before torch loads; a misspelt key inside ``model``, which needs the block registry and
so torch the first time after the code changes, and no torch once the key schema is
cached: both are measured). Each command runs
``--repeats`` times after one warm-up run (the OS file cache warm, as on a second
invocation); the median and the worst are recorded.

    .venv/bin/python bench/cli.py [--repeats 7] [--out bench/results/cli.json]

What it does not show: a cold start right after boot (first import of torch from disk
takes longer), or the time of the commands' real work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _time(cmd: list[str], repeats: int, fresh_cache: bool = False) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, capture_output=True, env=env, check=False)  # warm-up
    times, last = [], None
    for _ in range(repeats):
        if fresh_cache:  # no key schema saved yet: the first command after a code change
            env["RECSCALE_CACHE"] = tempfile.mkdtemp(prefix="rs-cli-")
        t0 = time.perf_counter()
        last = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        times.append(time.perf_counter() - t0)
    assert last is not None
    stderr = [ln for ln in last.stderr.splitlines() if ln.strip()]
    return {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
            "exit": last.returncode, "stderr_lines": len(stderr),
            "stderr_last": stderr[-1] if stderr else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cli.json"))
    args = parser.parse_args()
    exe = [sys.executable, "-m", "recscale"]
    with tempfile.TemporaryDirectory() as tmp:
        malformed = Path(tmp) / "malformed.yaml"
        malformed.write_text("model: {block: wukong\n")
        misspelt = Path(tmp) / "misspelt.yaml"
        misspelt.write_text("model: {block: tokenmixer, d_model: 16, n_tokens: 4}\n"
                            "trian: {lr: 0.01}\n")
        nested = Path(tmp) / "nested.yaml"
        nested.write_text("model: {block: tokenmixer, d_modle: 16, n_tokens: 4}\n")
        cases = {
            "recscale --help": [*exe, "--help"],
            "recscale search --help": [*exe, "search", "--help"],
            "recscale train malformed.yaml": [*exe, "train", str(malformed)],
            "recscale train misspelt.yaml": [*exe, "train", str(misspelt)],
            "recscale train nested.yaml": [*exe, "train", str(nested)],
        }
        results = {name: _time(cmd, args.repeats) for name, cmd in cases.items()}
        results["recscale train nested.yaml, no cached key schema"] = _time(
            cases["recscale train nested.yaml"], args.repeats, fresh_cache=True)
    out = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "repeats": args.repeats,
           "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:34s} median {r['median_s']:.2f} s  max {r['max_s']:.2f} s  "
              f"exit {r['exit']}  {r['stderr_last'][:90]}")


if __name__ == "__main__":
    main()
