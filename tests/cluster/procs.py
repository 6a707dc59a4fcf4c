"""Processes a cluster test started, found by a marker in their environment.

Every process a cluster test starts gets ``RECSCALE_TEST_NODE=<unique id>`` in its
environment, and every process those start inherits it (Ray's daemons and workers, the
job driver, MLflow, sshd sessions through the test's ForceCommand). So the test stops
exactly what it started, by PID, and never touches another session's Ray or MLflow:
no ``ray stop`` (which stops every Ray process on the machine), no ``pkill``.
Linux only (reads /proc).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable

MARK = "RECSCALE_TEST_NODE"


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:  # gone, or a kernel thread
        return b""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def ancestors(pid: int | None = None) -> set[int]:
    """``pid`` (default: this process) and every process above it."""
    out, p = set(), pid or os.getpid()
    while p > 1 and p not in out:
        out.add(p)
        p = _ppid(p)
    return out


def marked(mark: str, prefix: str = "") -> list[int]:
    """PIDs whose environment carries ``MARK=<mark><anything>``, but never this process
    or its ancestors (the test itself may carry the mark)."""
    needle = f"{MARK}={mark}{prefix}".encode()
    mine = ancestors()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in mine:
            env = _environ(int(entry))
            if any(var.startswith(needle) for var in env.split(b"\0")):
                out.append(int(entry))
    return out


def is_ray_process(pid: int) -> bool:
    """Ray's own definition (what ``ray stop`` kills), applied to one process."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    comm, args = _comm(pid), " ".join(_cmdline(pid))
    return any(key in (comm if by_name else args) for key, by_name in RAY_PROCESSES)


def kill(pids: Iterable[int], grace: float = 0.0) -> list[int]:
    """SIGTERM (if ``grace``) then SIGKILL ``pids``; returns the PIDs still alive after."""
    pids = list(pids)
    if grace:
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        end = time.time() + grace
        while time.time() < end and any(_alive(p) for p in pids):
            time.sleep(0.2)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    end = time.time() + 10
    while time.time() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "Z":  # a zombie our process has not reaped yet is dead enough
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
        return True
    except OSError:
        return False
