"""`ray up` with the local-provider file, end to end, against an sshd on 127.0.0.1.

The sshd comes from Debian's openssh-server (installed here when missing and apt can),
listens on 127.0.0.1:22 only, with host and user keys and an authorized_keys file in
the test's own directory; the test stops it by PID. The cluster file is
cluster-local.yaml pointed at 127.0.0.1 with no workers, its set-up commands replaced
by this venv (no package downloads), and Ray's head on free ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.test_cluster import ROOT, VENV_BIN, _free_port

pytestmark = pytest.mark.slow
SSHD = "/usr/sbin/sshd"


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ensure_sshd() -> None:
    """sshd and rsync (the launcher syncs its bootstrap config with it), from Debian."""
    if Path(SSHD).exists() and shutil.which("rsync"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("openssh-server/rsync are missing and cannot be installed (not root/apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server",
                 "rsync"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            pytest.skip(f"cannot install openssh-server/rsync: {proc.stderr.strip()[-300:]}")


@pytest.fixture
def sshd(tmp_path):
    _ensure_sshd()
    if _port_taken(22):
        pytest.skip("127.0.0.1:22 is already in use")
    d = Path(tempfile.mkdtemp(prefix="sshd", dir="/tmp"))
    os.chmod(d, 0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    shutil.copy(d / "id.pub", d / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort 22\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nSubsystem sftp internal-sftp\n")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sshd.log", "wb"),  # noqa: SIM115
                            start_new_session=True)
    for _ in range(50):
        if _port_taken(22):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.skip(f"sshd did not start: {(tmp_path / 'sshd.log').read_text()[-300:]}")
    try:
        yield d
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def test_ray_up_local_provider_end_to_end(sshd, tmp_path) -> None:
    cfg = yaml.safe_load((ROOT / "cluster-local.yaml").read_text())
    port, dash = _free_port(), _free_port()
    raytmp = tempfile.mkdtemp(prefix="ru", dir="/tmp")
    ray = f"RAY_TMPDIR={raytmp} RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 {VENV_BIN / 'ray'}"
    name = f"recscale-test-{port}"
    cfg.update({
        "cluster_name": name,
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": {"ssh_user": "root", "ssh_private_key": str(sshd / "id")},
        "min_workers": 0, "max_workers": 0, "file_mounts": {},
        "setup_commands": [f"{sys.executable} -c 'import spaces, search, ray'"],
        "head_setup_commands": [],
        # no `ray stop` here: it would stop every Ray process of this user on the machine
        "head_start_ray_commands": [
            f"{ray} start --head --port={port} --dashboard-port={dash} --dashboard-host=127.0.0.1 "
            f"--num-cpus=1 --memory=2000000000 --object-store-memory=200000000 "
            f"--node-ip-address=127.0.0.1 --temp-dir={raytmp}"],
        "worker_start_ray_commands": [],
    })
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_TMPDIR": raytmp, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    try:
        up = subprocess.run([str(VENV_BIN / "ray"), "up", "-y", "--no-config-cache", str(path)],
                            env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, (up.stdout[-3000:], up.stderr[-3000:])
        probe = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}'); "
             "print('CPUS', ray.cluster_resources().get('CPU'))"],
            env=env, capture_output=True, text=True, timeout=120)
        assert "CPUS 1.0" in probe.stdout, probe.stderr[-2000:]
        ex = subprocess.run([str(VENV_BIN / "ray"), "exec", str(path), f"{ray} status --address 127.0.0.1:{port}"],
                            env=env, capture_output=True, text=True, timeout=120)
        assert ex.returncode == 0 and "1.0 CPU" in ex.stdout.replace("0.0/1.0 CPU", "1.0 CPU"), ex.stdout[-2000:]
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "down", "-y", str(path)], env=env,
                       capture_output=True, text=True, timeout=120)
        subprocess.run(["pkill", "-9", "-f", raytmp], check=False)
        Path(f"/tmp/cluster-{name}.state").unlink(missing_ok=True)
