"""One driver per search: a lock with a named owner.

Two ``recscale search`` commands with the same name and storage would both restore the
same Tune state and both write the same MLflow runs. The driver therefore holds an
exclusive ``flock`` on ``<storage>/<name>.lock`` for as long as it runs; the file says
who holds it (pid, host, start time, command). The operating system releases a
``flock`` when its process dies, even by SIGKILL, so a killed search never leaves a
stale lock: the next command simply takes it.

Example::

    with SearchLock(Path("recscale_runs/my-search")):
        ...  # plan, restore, fit
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from trainers.contracts import UserError

__all__ = ["SearchLock", "SearchLocked"]


class SearchLocked(UserError):
    """Another live driver runs this search."""


class SearchLock:
    """An exclusive, process-lifetime lock on the search stored at ``exp_path``.

    Raises:
        SearchLocked: another live process holds it; the message names that process.
    """

    def __init__(self, exp_path: Path) -> None:
        self.path = exp_path.parent / f"{exp_path.name}.lock"
        self.name = exp_path.name
        self._fd: int | None = None

    def owner(self) -> dict[str, object]:
        """What the lock file says about its holder (empty when unreadable)."""
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def __enter__(self) -> SearchLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = self.owner()
            since = who.get("started")
            when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since)))  # type: ignore[arg-type]
                    if isinstance(since, (int, float)) else "an unknown time")
            raise SearchLocked(
                f"search {self.name!r} is already running (pid {who.get('pid', '?')} on "
                f"{who.get('host', '?')}, since {when}; lock {self.path}): wait for it to "
                "end or stop it, then run this command again") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.time(), "command": sys.argv}).encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
