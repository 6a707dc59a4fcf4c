"""Chaos benchmark: one search, interrupted again and again, must lose nothing.

One ``recscale search`` on synthetic data is started as a user would start it, hit by a
fault at a random moment (drawn from ``--seed``), and resumed by running the very same
command, until it ends by itself. Faults, in a shuffled schedule:

* ``kill``: the driver's whole process group killed with SIGKILL (Ray's processes too);
* ``ctrl-c``: SIGINT to the driver (it must exit 130, parent KILLED, state saved);
* ``trial``: one trial's worker process killed with SIGKILL (Tune retries the trial);
* ``truncate``: after a ``kill``, the newest checkpoint file of an unfinished trial cut
  in half (the resume must fall back to the trial's previous checkpoint);
* ``oom``: one trial's worker process runs out of memory: its address space is capped
  at what it holds (``RLIMIT_AS``), so its next allocation fails as it would on a full
  machine (Tune retries the trial on a fresh worker from its last checkpoint);
* ``mlflow-down`` (with ``--server``: the search logs to an MLflow server on 127.0.0.1
  that the harness runs): the server killed, kept down for ``--outage`` seconds (30),
  then started again on the same port, while the search goes on.

Then :func:`analysis.audit.audit_search` checks the result (one run per trial, nothing
RUNNING, no duplicate or backward steps, spent FLOPs within the budget's bound and
covering every trained FLOP, Tune and MLflow agreeing), and the same search run once
without faults gives the reference: both audits and ``recscale analyze`` summaries are
compared.

    .venv/bin/python bench/chaos.py --kills 10 --out bench/results/chaos.json

Not covered here: a worker node removed and added back (``tests/test_cluster.py`` kills
one node of a two-node cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):  # run as a script: bench/search.py must not shadow `search`
    sys.path.insert(0, str(ROOT))


@dataclass
class Chaos:
    """One search under faults, in its own directory (store, storage, Ray temp)."""

    workdir: Path
    name: str = "chaos"
    budget_flops: float = 6e10
    trial_flops: float = 8e9
    rows: int = 6000
    seed: int = 0
    server: bool = False
    outage: float = 30.0
    log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.raytmp = tempfile.mkdtemp(prefix="ch", dir="/tmp")
        self.rng = random.Random(self.seed)
        self.mlflow: subprocess.Popen[bytes] | None = None
        self.port = _free_port() if self.server else 0
        if self.server:
            self.start_server()

    @property
    def uri(self) -> str:
        if self.server:
            return f"http://127.0.0.1:{self.port}"
        return f"sqlite:///{self.workdir / 'mlflow.db'}"

    def start_server(self) -> None:
        """The MLflow server the search logs to (127.0.0.1, its own process group)."""
        log = open(self.workdir / "mlflow-server.log", "ab")  # noqa: SIM115 - lives with it
        self.mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
             "--artifacts-destination", str(self.workdir / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                 "MLFLOW_DISABLE_TELEMETRY": "true"},
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while not _listening(self.port):
            if time.time() > deadline or self.mlflow.poll() is not None:
                raise RuntimeError(f"the MLflow server did not start (see {log.name})")
            time.sleep(0.5)

    def stop_server(self) -> None:
        if self.mlflow is not None and self.mlflow.poll() is None:
            os.killpg(self.mlflow.pid, signal.SIGKILL)
            self.mlflow.wait(30)
        self.mlflow = None

    def memory_cap_a_trial(self) -> int | None:
        """Cap one trial worker's address space at what it holds now; returns its PID."""
        victims = self.trial_processes()
        if not victims:
            return None
        victim = self.rng.choice(victims)
        try:
            vms = victim.memory_info().vms
            victim.rlimit(psutil.RLIMIT_AS, (vms, vms))
        except (psutil.Error, OSError):
            return None
        return int(victim.pid)

    @property
    def storage(self) -> Path:
        return self.workdir / "ray"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "recscale", "search", "--space", "unified",
                "--data", "synthetic", "--max-rows", str(self.rows), "--name", self.name,
                "--budget-flops", str(self.budget_flops), "--trial-flops", str(self.trial_flops),
                "--max-flops-per-example", "4e5", "--storage", str(self.storage),
                "--tracking-uri", self.uri, "--max-concurrent", "2", "--gpus", "off",
                "--seed", "0", "-v", "0"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_TMPDIR": self.raytmp, "RAY_ADDRESS": "",
                "RECSCALE_CACHE": str(self.workdir / "cache"), "PYTHONPATH": str(ROOT)}

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(), env=self.env(), cwd=self.workdir,
                                start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    def cleanup(self) -> None:
        """Ray processes a killed driver leaves behind (they carry our RAY_TMPDIR)."""
        subprocess.run(["pkill", "-9", "-f", self.raytmp], check=False)
        for p in psutil.process_iter(["cmdline"]):
            try:
                if self.raytmp in " ".join(p.info["cmdline"] or []) or \
                        p.environ().get("RAY_TMPDIR") == self.raytmp:
                    p.kill()
            except (psutil.Error, OSError):
                continue
        time.sleep(1)

    def trial_processes(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if cmd.startswith("ray::") and "IDLE" not in cmd and \
                        p.environ().get("RAY_TMPDIR") == self.raytmp:
                    out.append(p)
            except (psutil.Error, OSError):
                continue
        return out

    def reports(self) -> int:
        """Reports Tune has stored so far (lines of every trial's ``result.json``)."""
        total = 0
        for path in self.storage.glob(f"{self.name}/*/result.json"):
            try:
                with path.open("rb") as fh:
                    total += sum(1 for _ in fh)
            except OSError:
                continue
        return total

    def truncate_a_checkpoint(self) -> str | None:
        """Cut the newest ``state.pt`` of one trial in half; returns its path."""
        files = sorted(self.storage.glob(f"{self.name}/*/checkpoint_*/state.pt"),
                       key=lambda p: p.stat().st_mtime)
        if not files:
            return None
        target = files[-1]
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        return str(target)

    def segment(self, fault: str | None, wait: float) -> int | None:
        """Run the command; inject ``fault`` after ``wait`` seconds (if it still runs).
        Returns the exit code when the search ended by itself, else None."""
        t0 = time.time()
        proc = self.start()
        if fault is not None:  # the clock starts once the search has reported anew
            start_reports, deadline = self.reports(), time.time() + 300
            while proc.poll() is None and time.time() < deadline and \
                    self.reports() <= start_reports:
                time.sleep(0.5)
        started = time.time()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        entry: dict[str, Any] = {"fault": fault, "at_s": round(time.time() - t0, 1),
                                 "after_new_report_s": round(time.time() - started, 1)}
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            entry.update(ended=proc.returncode, stderr=err[-500:])
            self.log.append(entry)
            self.cleanup()
            return proc.returncode
        if fault in ("kill", "truncate"):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            self.cleanup()
            if fault == "truncate":
                entry["truncated"] = self.truncate_a_checkpoint()
        elif fault == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            entry["exit"] = proc.returncode
            err = proc.stderr.read() if proc.stderr else ""
            entry["last_line"] = ([ln for ln in err.splitlines() if ln.strip()] or [""])[-1]
            self.cleanup()
        elif fault in ("trial", "oom", "mlflow-down"):
            if fault == "trial":
                victims = self.trial_processes()
                entry["trial_processes"] = len(victims)
                if victims:
                    self.rng.choice(victims).kill()
            else:
                before = self.reports()
                if fault == "oom":
                    entry["capped_pid"] = pid = self.memory_cap_a_trial()
                    if pid is not None:  # until the capped worker has failed
                        while proc.poll() is None and psutil.pid_exists(pid) and \
                                time.time() < started + wait + 300:
                            time.sleep(0.5)
                else:
                    self.stop_server()
                    time.sleep(self.outage)
                    self.start_server()
                    entry["outage_s"] = self.outage
                # the search carries on by itself: two new reports (or its end) show it
                while proc.poll() is None and self.reports() < before + 2 and \
                        time.time() < started + wait + 600:
                    time.sleep(0.5)
                entry["reports_after"] = self.reports() - before
                entry["errored_trials"] = len(list(
                    self.storage.glob(f"{self.name}/*/error.txt")))
            try:  # the search goes on: let it end or be hit by the next fault
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                entry["then"] = "kill"
            self.cleanup()
            if proc.returncode == 0:
                entry["ended"] = 0
                self.log.append(entry)
                return 0
        self.log.append(entry)
        return None

    def run(self, faults: list[str], wait: tuple[float, float] = (0.0, 20.0),
            max_segments: int = 60) -> int:
        """Inject ``faults`` in order at random moments, then resume until the search
        ends by itself; returns its exit code."""
        for fault in faults:
            rc = self.segment(fault, self.rng.uniform(*wait))
            if rc is not None:
                return rc
        for _ in range(max_segments):
            rc = self.segment(None, 900.0)
            if rc is not None:
                return rc
        return -1


def schedule(kills: int, seed: int, server: bool = False) -> list[str]:
    faults = ["kill"] * max(0, kills - 1) + ["truncate", "ctrl-c", "trial", "oom"]
    if server:
        faults.append("mlflow-down")
    random.Random(seed).shuffle(faults)
    return faults


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    from analysis.audit import audit_search

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="driver SIGKILLs (one truncates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-flops", type=float, default=1.5e11)
    ap.add_argument("--server", action="store_true",
                    help="log to an MLflow server the harness runs (adds the mlflow-down fault)")
    ap.add_argument("--outage", type=float, default=30.0, help="mlflow-down: seconds down")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos"))
    t0 = time.time()
    reference = Chaos(work / "reference", budget_flops=args.budget_flops, seed=args.seed,
                      server=args.server)
    ref_rc = reference.run([])
    ref_audit = audit_search(reference.name, reference.uri)
    reference.stop_server()
    chaos = Chaos(work / "chaos", budget_flops=args.budget_flops, seed=args.seed,
                  server=args.server, outage=args.outage)
    faults = schedule(args.kills, args.seed, args.server)
    rc = chaos.run(faults)
    audit = audit_search(chaos.name, chaos.uri)
    chaos.stop_server()
    result = {
        "command": " ".join(sys.argv), "seed": args.seed, "faults": faults,
        "segments": chaos.log, "exit": rc, "audit": {"ok": audit.ok, "problems": audit.problems,
                                                     **audit.numbers},
        "reference": {"exit": ref_rc, "ok": ref_audit.ok, "problems": ref_audit.problems,
                      **ref_audit.numbers},
        "seconds": round(time.time() - t0),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("exit", "audit", "reference", "seconds")},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
