"""Chaos benchmark: one search, interrupted again and again, must lose nothing.

One ``recscale search`` on synthetic data is started as a user would start it, hit by a
fault at a random moment (drawn from ``--seed``), and resumed by running the very same
command, until it ends by itself. Faults, in a shuffled schedule:

* ``kill``: the driver's whole process group killed with SIGKILL (Ray's processes too);
* ``ctrl-c``: SIGINT to the driver (it must exit 130, parent KILLED, state saved);
* ``trial``: one trial's worker process killed with SIGKILL (Tune retries the trial);
* ``truncate``: after a ``kill``, the newest checkpoint file of an unfinished trial cut
  in half (the resume must fall back to the trial's previous checkpoint);
* ``oom``: the node runs out of memory mid-trial, as Ray sees it: Ray's memory monitor
  is given a kill threshold ``--oom-headroom`` GiB above what the machine used when the
  harness started (``RAY_memory_usage_threshold``), and a balloon process fills memory
  past it, so Ray kills a trial's worker with ``OutOfMemoryError`` (Tune retries the
  trial from its last checkpoint); the balloon is freed once a trial worker has died;
* ``mlflow-down`` (with ``--server``: the search logs to an MLflow server on 127.0.0.1
  that the harness runs): the server killed, kept down for ``--outage`` seconds (30),
  then started again on the same port, while the search goes on;
* ``node`` (with ``--cluster``: the search runs on a two-node Ray cluster on 127.0.0.1,
  head and worker with one CPU each, that the harness starts): every process of the
  worker node killed (its raylet and the trials on it), the node started again after
  ``--outage`` seconds; trials it ran are retried.

After a fault the driver lives through (``trial``, ``oom``, ``mlflow-down``, ``node``)
the driver is killed a moment later for the next fault, or, after the schedule's last
fault, left to end the search. :meth:`Chaos.run` also takes a tuple of such faults,
which strike one driver in turn (``tests/test_chaos.py`` puts an outage and a memory
kill in one driver).

Then :func:`analysis.audit.audit_search` checks the result (one run per trial, nothing
RUNNING, no duplicate or backward steps, spent FLOPs within the budget's bound and
covering every trained FLOP, Tune and MLflow agreeing), and the same search run once
without faults gives the reference: both audits and ``recscale analyze`` summaries are
compared: both audits, and the structure of both ``recscale analyze`` reports
(:func:`analysis.audit.report_structure`).

    .venv/bin/python bench/chaos.py --kills 10 --server --out bench/results/chaos.json
    .venv/bin/python bench/chaos.py --kills 3 --cluster --out bench/results/chaos_cluster.json

Every process the harness starts carries its own ``RAY_TMPDIR`` (and, for cluster
nodes, a marker in its environment) and is stopped by PID: nothing here runs
``ray stop`` or touches another Ray on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
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

GIB = 2**30
#: the environment variable that marks the processes of a harness-started Ray node
NODE_MARK = "RECSCALE_CHAOS_NODE"
#: the faults a driver lives through (the search goes on by itself); the others end it
IN_DRIVER = ("trial", "oom", "mlflow-down", "node")

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
    cluster: bool = False
    oom_headroom: float = 6.0
    log: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.raytmp = tempfile.mkdtemp(prefix="ch", dir="/tmp")
        self.rng = random.Random(self.seed)
        self.mlflow: subprocess.Popen[bytes] | None = None
        self._stderr: Path | None = None  # the running driver's stderr (start)
        self.port = _free_port() if self.server else 0
        vm = psutil.virtual_memory()  # Ray's own measure: total - available
        self.oom_threshold = min(0.9, (vm.total - vm.available + self.oom_headroom * GIB)
                                 / vm.total)
        self.mark = f"{os.getpid()}-{self.raytmp.rsplit('/', 1)[-1]}"
        self.gcs_port = _free_port() if self.cluster else 0
        if self.server:
            self.start_server()
        if self.cluster:
            self.start_node("head")
            self.start_node("worker")

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

    # ------------------------------------------------------------------ cluster nodes

    def _node_env(self, role: str) -> dict[str, str]:
        return {**os.environ, "RAY_TMPDIR": self.raytmp, "RAY_ADDRESS": "",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_memory_usage_threshold": f"{self.oom_threshold:.4f}",
                NODE_MARK: f"{self.mark}-{role}"}

    def start_node(self, role: str) -> None:
        """Start the head or the worker node (1 CPU, 127.0.0.1, ports of its own) and
        wait until the cluster counts it."""
        ray = str(Path(sys.executable).parent / "ray")
        common = ["--num-cpus=1", "--memory=2500000000", "--object-store-memory=250000000",
                  "--node-ip-address=127.0.0.1", "--block",
                  f"--dashboard-agent-listen-port={_free_port()}"]
        if role == "head":
            cmd = [ray, "start", "--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                   f"--ray-client-server-port={_free_port()}", f"--temp-dir={self.raytmp}",
                   *common]
        else:
            cmd = [ray, "start", f"--address=127.0.0.1:{self.gcs_port}", *common]
        log = open(self.workdir / f"node-{role}.log", "ab")  # noqa: SIM115 - lives with it
        subprocess.Popen(cmd, env=self._node_env(role), stdout=log, stderr=log,
                         start_new_session=True)
        want = 1 if role == "head" else 2
        deadline = time.time() + 180
        while self.alive_nodes() < want:
            if time.time() > deadline:
                raise RuntimeError(f"the {role} node did not join (see {log.name})")
            time.sleep(2)

    def alive_nodes(self) -> int:
        """Nodes the cluster's GCS counts alive (0 when it does not answer)."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', "
                "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))")
        try:
            out = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{self.gcs_port}"],
                                 env=self._node_env("probe"), capture_output=True, text=True,
                                 timeout=60)
            return int(out.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            return 0

    def nodes_settle_at(self, want: int, timeout: float = 120.0) -> int:
        """Nodes alive once the count is ``want`` or ``timeout`` has passed. Right after a
        node comes back the GCS is still declaring the killed one dead (its health check
        fails some seconds later) and a probe then may not answer."""
        deadline = time.time() + timeout
        while (alive := self.alive_nodes()) != want and time.time() < deadline:
            time.sleep(2)
        return alive

    def node_processes(self, role: str = "") -> list[psutil.Process]:
        """The processes of one harness-started node (of all of them with ``role=""``)."""
        want = f"{self.mark}-{role}"
        out = []
        for p in psutil.process_iter():
            try:
                mark = p.environ().get(NODE_MARK, "")
            except (psutil.Error, OSError):
                continue
            if (mark == want if role else mark.startswith(want)) and p.pid != os.getpid():
                out.append(p)
        return out

    def kill_node(self, role: str = "") -> int:
        """SIGKILL every process of a node (all nodes with ``role=""``); how many."""
        procs = self.node_processes(role)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=15)
        return len(procs)

    def stop(self) -> None:
        """Stop everything the harness started: cluster nodes, Ray, the MLflow server."""
        if self.cluster:
            self.kill_node()
        self.cleanup()
        self.stop_server()

    # ------------------------------------------------------------------ out of memory

    def oom_kills(self) -> int:
        """Workers Ray's memory monitor has killed so far (every raylet log of ours)."""
        total = 0
        for path in Path(self.raytmp).glob("**/logs/raylet*.out"):
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    m = re.search(r"Killing (\d+) worker\(s\), kill details: Memory", line)
                    total += int(m.group(1)) if m else 0
        return total

    def fill_memory_until_a_trial_dies(self, driver: subprocess.Popen[bytes] | None = None,
                                       timeout: float = 180.0) -> dict[str, Any]:
        """Fill memory past Ray's kill threshold with a balloon process and hold it until
        Ray's memory monitor has killed a worker (its raylet log says so) or the
        ``driver`` has exited, then free it."""
        before = self.oom_kills()
        workers = {p.pid: p for p in self.trial_processes()}
        vm = psutil.virtual_memory()
        need = self.oom_threshold * vm.total - (vm.total - vm.available) + GIB
        chunks = int(max(0.0, min(need, vm.available - 2 * GIB)) // (GIB / 4)) + 1
        code = ("import sys, time\nkeep = []\nfor _ in range(int(sys.argv[1])):\n"
                "    b = bytearray(2**28)\n    b[::4096] = bytes(2**16)\n"  # touch every page
                "    b[::4096] = b'x' * 2**16\n    keep.append(b)\n    time.sleep(0.05)\n"
                "time.sleep(900)\n")
        balloon = subprocess.Popen([sys.executable, "-c", code, str(chunks)])
        t0 = time.time()
        try:
            while time.time() < t0 + timeout and self.oom_kills() <= before and \
                    (driver is None or driver.poll() is None):
                time.sleep(0.5)
        finally:
            balloon.kill()
            balloon.wait(30)
        return {"trial_workers": len(workers), "balloon_gib": round(chunks / 4, 2),
                "oom_threshold": round(self.oom_threshold, 4),
                "killed_workers": sum(not p.is_running() for p in workers.values()),
                "after_s": round(time.time() - t0, 1), "oom_kills": self.oom_kills() - before}

    @property
    def storage(self) -> Path:
        return self.workdir / "ray"

    def command(self) -> list[str]:
        """The ``recscale search`` command, the same at every resume."""
        return [sys.executable, "-m", "recscale", "search", "--space", "unified",
                "--data", "synthetic", "--max-rows", str(self.rows), "--name", self.name,
                "--budget-flops", str(self.budget_flops), "--trial-flops", str(self.trial_flops),
                "--max-flops-per-example", "4e5", "--storage", str(self.storage),
                "--tracking-uri", self.uri, "--max-concurrent", "2", "--gpus", "off",
                "--seed", "0", "-v", "0"]

    def env(self, oom: bool = False) -> dict[str, str]:
        """The driver's environment: a local Ray of its own, or the harness's cluster;
        with ``oom``, the local Ray's memory monitor kills at the harness's threshold."""
        env = {**os.environ, "RAY_TMPDIR": self.raytmp, "RAY_ADDRESS": "",
               "RECSCALE_CACHE": str(self.workdir / "cache"), "PYTHONPATH": str(ROOT)}
        if self.cluster:
            env.update(RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}", RAY_AUTH_MODE="disabled")
        elif oom:
            env["RAY_memory_usage_threshold"] = f"{self.oom_threshold:.4f}"
        return env

    def start(self, oom: bool = False) -> subprocess.Popen[bytes]:
        """Start the driver. Its stderr goes to a file of its own: a pipe nobody reads
        until the driver exits fills up (an MLflow outage makes every client warn) and
        then blocks the driver mid-search."""
        self._stderr = self.workdir / f"driver-{len(self.log)}.err"
        with self._stderr.open("wb") as err:
            return subprocess.Popen(self.command(), env=self.env(oom), cwd=self.workdir,
                                    start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=err)

    def stderr_tail(self, chars: int = 500) -> str:
        """The end of the last driver's stderr."""
        try:
            return self._stderr.read_text(errors="replace")[-chars:] if self._stderr else ""
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Ray processes a killed driver leaves behind (they carry our RAY_TMPDIR). On
        the harness's cluster Ray itself ends a dead driver's job; the nodes stay."""
        if self.cluster and self.node_processes():
            time.sleep(1)
            return
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

    def parent_status(self) -> str | None:
        """The MLflow status of the search's parent run (None before it exists)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.name)
        if exp is None:
            return None
        parents = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'search'")
        return str(parents[0].info.status) if parents else None

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

    def segment(self, fault: str | tuple[str, ...] | None, wait: float,
                last: bool = False) -> int | None:
        """Run the command; inject ``fault`` after ``wait`` seconds (if it still runs).
        ``fault`` may be a tuple of faults the driver lives through (:data:`IN_DRIVER`):
        they strike the same driver one after another, ``wait`` seconds apart once the
        search has reported again after the one before. After a fault the driver lives
        through, the search is killed ``wait`` seconds later for the next fault, or, when
        this is the ``last`` one, left to run to its end. Returns the exit code when the
        search ended by itself, else None."""
        group = fault if isinstance(fault, tuple) else (fault,)
        if len(group) > 1 and not set(group) <= set(IN_DRIVER):
            raise ValueError(f"only faults the driver lives through strike together: {group}")
        t0 = time.time()
        proc = self.start(oom="oom" in group)
        if fault is not None:  # the clock starts once the search has reported anew
            start_reports, deadline = self.reports(), time.time() + 300
            while proc.poll() is None and time.time() < deadline and \
                    self.reports() <= start_reports:
                time.sleep(0.5)
        for i, one in enumerate(group):
            started = time.time()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
            entry: dict[str, Any] = {"fault": one, "at_s": round(time.time() - t0, 1),
                                     "after_new_report_s": round(time.time() - started, 1)}
            if proc.poll() is not None:
                entry.update(ended=proc.returncode, stderr=self.stderr_tail())
                self.log.append(entry)
                self.cleanup()
                return proc.returncode
            if one not in IN_DRIVER:
                break
            entry.update(self.strike(proc, one, started, wait))
            if i < len(group) - 1:  # the last one's entry is finished below
                self.log.append(entry)
        if one in ("kill", "truncate"):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            self.cleanup()
            if one == "truncate":
                entry["truncated"] = self.truncate_a_checkpoint()
        elif one == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            entry["exit"] = proc.returncode
            err = self.stderr_tail(4000)
            entry["last_line"] = ([ln for ln in err.splitlines() if ln.strip()] or [""])[-1]
            entry["parent_status"] = self.parent_status()
            self.cleanup()
        elif one in IN_DRIVER:
            try:  # the search goes on: let it end or be hit by the next fault
                proc.wait(timeout=900.0 if last else wait)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                entry["then"] = "kill"
            self.cleanup()
            if proc.returncode == 0:
                entry["ended"] = 0
                self.log.append(entry)
                return 0
            if "then" not in entry:  # it ended by itself, with an error: say which
                entry.update(exit=proc.returncode, stderr=self.stderr_tail())
        self.log.append(entry)
        return None

    def strike(self, proc: subprocess.Popen[bytes], fault: str, started: float,
               wait: float) -> dict[str, Any]:
        """Inject a fault the driver lives through into the running search, and wait
        until the search has reported twice more (or ended): what happened, for the log."""
        entry: dict[str, Any] = {}
        if fault == "trial":
            victims = self.trial_processes()
            entry["trial_processes"] = len(victims)
            if victims:
                self.rng.choice(victims).kill()
            return entry
        before = self.reports()
        if fault == "oom":
            entry.update(self.fill_memory_until_a_trial_dies(proc))
        elif fault == "node":
            on_worker = [p for p in self.trial_processes()
                         if p in self.node_processes("worker")]
            entry["trials_on_worker"] = len(on_worker)
            entry["killed_processes"] = self.kill_node("worker")
            time.sleep(self.outage)
            self.start_node("worker")
            entry["outage_s"] = self.outage
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
        entry["waited_s"] = round(time.time() - started, 1)
        entry["errored_trials"] = len(list(self.storage.glob(f"{self.name}/*/error.txt")))
        return entry

    def run(self, faults: list[str | tuple[str, ...]],
            wait: tuple[float, float] = (0.0, 20.0), max_segments: int = 60) -> int:
        """Inject ``faults`` in order at random moments (a tuple: into one driver, see
        :meth:`segment`), then resume until the search ends by itself; returns its exit
        code."""
        for i, fault in enumerate(faults):
            rc = self.segment(fault, self.rng.uniform(*wait), last=i == len(faults) - 1)
            if rc is not None:
                return rc
        for _ in range(max_segments):
            rc = self.segment(None, 900.0)
            if rc is not None:
                return rc
        return -1


def schedule(kills: int, seed: int, server: bool = False, cluster: bool = False) -> list[str]:
    """The shuffled fault schedule: ``kills`` driver kills (one of them truncating a
    checkpoint), Ctrl-C, a killed trial, an out-of-memory node, and with ``server`` an
    MLflow outage, with ``cluster`` a worker node lost and added back."""
    faults = ["kill"] * max(0, kills - 1) + ["truncate", "ctrl-c", "trial", "oom"]
    if server:
        faults.append("mlflow-down")
    if cluster:
        faults.append("node")
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


def analyze(chaos: Chaos) -> dict[str, Any]:
    """``recscale analyze``'s report of the harness's search, reduced to its structure."""
    from analysis.audit import report_structure
    from analysis.pipeline import write_report

    out = write_report(chaos.name, chaos.uri, chaos.workdir / "report")
    return report_structure(json.loads((out / "summary.json").read_text()))


def run_and_audit(chaos: Chaos, faults: list[str], max_wait: float = 20.0) -> dict[str, Any]:
    """Run ``faults`` (none: the reference), then audit the search and read its report."""
    from analysis.audit import audit_search

    try:
        rc = chaos.run(faults, wait=(0.0, max_wait))
        audit = audit_search(chaos.name, chaos.uri)
        structure = analyze(chaos) if rc == 0 else None
    finally:
        chaos.stop()
    return {"exit": rc, "ok": audit.ok, "problems": audit.problems, **audit.numbers,
            "report_structure": structure}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="driver SIGKILLs (one truncates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-flops", type=float, default=1.5e11)
    ap.add_argument("--server", action="store_true",
                    help="log to an MLflow server the harness runs (adds the mlflow-down fault)")
    ap.add_argument("--cluster", action="store_true",
                    help="run on a two-node Ray cluster the harness starts (adds the node fault)")
    ap.add_argument("--outage", type=float, default=30.0,
                    help="mlflow-down, node: seconds down")
    ap.add_argument("--oom-headroom", type=float, default=6.0,
                    help="oom: Ray's kill threshold, GiB above the machine's use at start")
    ap.add_argument("--max-wait", type=float, default=20.0,
                    help="a fault strikes 0..this many seconds after the search reports anew")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = ap.parse_args()
    # SIGTERM (kill, a CI timeout) ends the harness through its finally blocks, so the
    # cluster nodes and the MLflow server it started are stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos"))
    t0 = time.time()
    common = {"budget_flops": args.budget_flops, "seed": args.seed, "server": args.server,
              "cluster": args.cluster, "outage": args.outage, "oom_headroom": args.oom_headroom}
    reference = run_and_audit(Chaos(work / "reference", **common), [])
    t_ref = time.time() - t0
    chaos = Chaos(work / "chaos", **common)
    faults = schedule(args.kills, args.seed, args.server, args.cluster)
    faulted = run_and_audit(chaos, faults, args.max_wait)
    result = {
        "command": " ".join(sys.argv), "seed": args.seed, "faults": faults,
        "segments": chaos.log, "exit": faulted.pop("exit"), "audit": faulted,
        "reference": reference,
        "same_report_structure": faulted["report_structure"] == reference["report_structure"],
        "seconds": round(time.time() - t0), "reference_seconds": round(t_ref),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    short = {k: result[k] for k in ("exit", "same_report_structure", "seconds")}
    short["audit"] = {k: v for k, v in faulted.items() if k != "report_structure"}
    short["reference"] = {k: v for k, v in reference.items() if k != "report_structure"}
    short["injected"] = [e["fault"] for e in chaos.log if e["fault"]]
    print(json.dumps(short, indent=2, default=str))


if __name__ == "__main__":
    main()
