"""Cluster files validate with Ray's own schema and open nothing to the internet; a real
two-node Ray cluster on 127.0.0.1 runs a search submitted with `ray job submit`, tracks
to an MLflow server started here, and survives losing its worker node mid-search."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_file_validates_with_rays_schema(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(_load(name)))
    validate_config(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    broken = copy.deepcopy(_load(name))
    broken["max_workers"] = "many"
    from jsonschema.exceptions import ValidationError

    with pytest.raises((ValidationError, ValueError, TypeError)):  # the schema really checks
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_file_opens_no_port_to_the_internet(name: str) -> None:
    text = (ROOT / name).read_text()
    cfg = _load(name)
    # no world-open rule (0.0.0.0/0), no server on all interfaces (--host 0.0.0.0)
    assert re.search(r"(?<![\d.])0\.0\.0\.0", text) is None
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts
    assert "mlflow server --host \"$(hostname -I" in starts  # the private address only
    if cfg["provider"]["type"] == "aws":
        assert cfg["provider"]["use_internal_ips"] is True
        for rule in cfg["provider"]["security_group"]["IpPermissions"]:
            for rng in rule["IpRanges"]:
                first = int(rng["CidrIp"].split(".")[0])
                assert first in (10, 172, 192), rng  # private ranges only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Cluster:
    """Head + worker Ray nodes and an MLflow server on 127.0.0.1, each its own process
    group so the test can kill exactly what it started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.raytmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        self.port, self.dash, self.mlport = _free_port(), _free_port(), _free_port()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "RAY_ADDRESS": "",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_TMPDIR": self.raytmp}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log,
                                            start_new_session=True, cwd=ROOT)

    def up(self) -> None:
        ray = str(VENV_BIN / "ray")
        node = ["--num-cpus=1", "--memory=3000000000", "--object-store-memory=300000000",
                "--node-ip-address=127.0.0.1", "--block"]
        self._start("head", [ray, "start", "--head", f"--port={self.port}",
                             f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1",
                             "--include-dashboard=true", f"--temp-dir={self.raytmp}", *node])
        self._wait(lambda: self._ray_nodes() >= 1, 90, "head node")
        self._start("worker", [ray, "start", f"--address=127.0.0.1:{self.port}", *node])
        self._wait(lambda: self._ray_nodes() >= 2, 90, "worker node")
        self._start("mlflow", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(self.mlport), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}"])
        self._wait(self._mlflow_up, 120, "MLflow server")

    def _ray_nodes(self) -> int:
        out = subprocess.run([str(VENV_BIN / "ray"), "list", "nodes", "--address",
                              f"http://127.0.0.1:{self.dash}", "--filter", "state=ALIVE",
                              "--format", "json"], env=self.env, capture_output=True, text=True)
        if out.returncode or not out.stdout.lstrip().startswith("["):
            return 0  # not up yet, or "No resource in the cluster"
        return len(json.loads(out.stdout))

    def _mlflow_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.mlport), timeout=1):
                return True
        except OSError:
            return False

    @staticmethod
    def _wait(cond, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            time.sleep(1)
        raise TimeoutError(f"{what} did not come up in {timeout} s")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def down(self) -> None:
        for name in ("worker", "head", "mlflow"):
            if name in self.procs:
                self.kill(name)
        subprocess.run(["pkill", "-9", "-f", self.raytmp], check=False)

    def submit(self, *args: str, wait: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{self.dash}"]
        if not wait:
            cmd.append("--no-wait")
        cmd += ["--", sys.executable, "-m", "search.cli", "search", *args]
        for _ in range(30):  # the head's job agent needs a moment after the nodes are up
            res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=600,
                                 cwd=ROOT)
            if "No available agent" not in res.stderr:
                return res
            time.sleep(2)
        return res


@pytest.fixture
def cluster(tmp_path):
    c = _Cluster(tmp_path)
    try:
        c.up()
        yield c
    finally:
        c.down()


def _search_args(c: _Cluster, name: str, budget: str) -> list[str]:
    return ["--space", "unified", "--data", "synthetic", "--max-rows", "6000", "--name", name,
            # grace = trial: every trial trains its full 2e10 FLOPs (seconds, not
            # milliseconds), so two concurrent trials overlap and fill both nodes' CPU
            "--budget-flops", budget, "--trial-flops", "2e10", "--grace-flops", "2e10",
            "--max-flops-per-example", "4e5",
            "--tracking-uri", f"http://127.0.0.1:{c.mlport}", "--storage", str(c.tmp / "shared"),
            "--max-concurrent", "2", "--gpus", "off", "--no-reuse-actors", "-v", "0"]


def _trial_runs(c: _Cluster, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{c.mlport}")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'trial'", max_results=1000)


@pytest.mark.slow
def test_job_submit_runs_trials_on_both_nodes(cluster) -> None:
    res = cluster.submit(*_search_args(cluster, "two-node", "8e10"))
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "succeeded" in (res.stdout + res.stderr).lower()
    runs = _trial_runs(cluster, "two-node")
    assert len(runs) >= 4
    nodes = {r.data.tags.get("ray.node_id") for r in runs}
    assert len(nodes - {None, ""}) == 2, nodes  # trials ran on both nodes
    assert all(r.data.tags.get("status") in {"COMPLETED", "STOPPED"} for r in runs)


@pytest.mark.slow
def test_search_survives_losing_the_worker_node(cluster) -> None:
    res = cluster.submit(*_search_args(cluster, "lose-worker", "1.6e11"), wait=False)
    assert res.returncode == 0, res.stderr[-2000:]
    job_id = re.findall(r"raysubmit_[A-Za-z0-9]+", res.stdout + res.stderr)[0]
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the worker has run and finished a trial
        runs = _trial_runs(cluster, "lose-worker")
        nodes = {r.data.tags.get("ray.node_id") for r in runs}
        if len(nodes) >= 2 and any(r.data.tags.get("status") in {"COMPLETED", "STOPPED"} for r in runs):
            break
        time.sleep(2)
    runs = _trial_runs(cluster, "lose-worker")
    assert len({r.data.tags.get("ray.node_id") for r in runs}) == 2, "the worker never ran a trial"
    finished_before = {r.data.tags["trial_id"] for r in runs
                       if r.data.tags.get("status") in {"COMPLETED", "STOPPED"}}
    assert finished_before
    cluster.kill("worker")  # the worker node's raylet and workers die mid-search
    status = ""
    end = time.time() + 420
    while time.time() < end:
        out = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address",
                              f"http://127.0.0.1:{cluster.dash}", job_id], env=cluster.env,
                             capture_output=True, text=True)
        status = (out.stdout + out.stderr).lower()
        if any(s in status for s in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(3)
    logs = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", "--address",
                           f"http://127.0.0.1:{cluster.dash}", job_id], env=cluster.env,
                          capture_output=True, text=True).stdout
    assert "succeeded" in status, (status[-1500:], logs[-3000:])
    runs = _trial_runs(cluster, "lose-worker")
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids))  # retried trials kept their runs: no duplicates
    finished_after = {r.data.tags["trial_id"] for r in runs
                      if r.data.tags.get("status") in {"COMPLETED", "STOPPED"}}
    assert finished_before <= finished_after  # nothing finished was lost
    assert all(r.data.tags.get("status") != "RUNNING" for r in runs)
