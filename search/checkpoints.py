"""Tune checkpoints kept only as long as a resume (or the search's own end) needs them.

A trial checkpoints (model, optimiser and loop state, so an interrupted search resumes
each unfinished trial exactly) at every report by default, so a fault costs at most one
report interval per trial, which the budget's overshoot bound allows for (a longer
``TrialContext.checkpoint_every_s`` checkpoints only at ASHA's milestones, the end and
that often: :func:`search.trainable.checkpoint_due`). What a resume needs is the
checkpoint Tune's *saved* experiment state names for each unfinished trial, and that
state is saved every few seconds, not at every report: a checkpoint newer than the last
save may be all a trial has, and the one the save names may be older (a driver killed
before the next save restores from it; the work since counts as spent, see
:func:`search.runner.reconcile_resumed`). So Tune keeps every checkpoint of a
running trial (``CheckpointConfig(num_to_keep=None)`` in
:func:`search.runner.build_tuner`), and

* :class:`DropFinishedCheckpoints` prunes a finished trial (completed, or stopped by
  ASHA) down to its last checkpoint, its result, once an experiment state saved after it
  finished is in the storage (before that, a resume would still restore the trial from
  an older one);
* at the end of the search :func:`prune_finished` drops every finished trial's
  checkpoints but the winner's last (its weights serve the paired lift over the
  references, see :mod:`search.references`).

Trials that failed keep theirs (a resumed search retries them from it).
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray import tune

__all__ = ["DropFinishedCheckpoints", "prune_checkpoints", "prune_finished"]

log = logging.getLogger(__name__)


def prune_checkpoints(fs: Any, trial_path: str, keep_last: bool) -> int:
    """Delete a trial's ``checkpoint_*`` directories (all, or all but the newest) on
    whatever file system the storage is (local, NFS, object store); returns how many.
    Never raises: housekeeping must not fail a search."""
    try:
        from pyarrow.fs import FileSelector, FileType

        dirs = sorted(entry.path for entry in fs.get_file_info(
            FileSelector(trial_path, allow_not_found=True))
            if entry.type == FileType.Directory
            and posixpath.basename(entry.path).startswith("checkpoint_"))
        doomed = dirs[:-1] if keep_last else dirs
        for path in doomed:
            fs.delete_dir(path)
        return len(doomed)
    except Exception as err:
        log.warning("could not delete the checkpoints in %s: %s", trial_path, err)
        return 0


def _trial_location(trial: Any) -> tuple[Any, str] | None:
    try:
        return trial.storage.storage_filesystem, str(trial.storage.trial_fs_path)
    except AttributeError:
        return None


class DropFinishedCheckpoints(tune.Callback):
    """Prunes each finished trial to its last checkpoint once a later experiment state
    is saved in ``exp_path`` (checked at most every ``every`` seconds)."""

    def __init__(self, exp_path: str | Path, every: float = 5.0) -> None:
        self.exp_path = Path(exp_path)
        self.every = every
        self._pending: list[tuple[float, Any, str]] = []
        self._checked = 0.0

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with its state
        state = self.__dict__.copy()
        state["_pending"], state["_checked"] = [], 0.0  # pruned at the search's end instead
        return state

    def _saved_at(self) -> float:
        stamps = [p.stat().st_mtime for p in self.exp_path.glob("experiment_state-*.json")]
        return max(stamps, default=0.0)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        where = _trial_location(trial)
        if where is not None:
            self._pending.append((time.time(), *where))

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        now = time.time()
        if not self._pending or now - self._checked < self.every:
            return
        self._checked = now
        saved = self._saved_at()
        due = [p for p in self._pending if p[0] < saved]
        self._pending = [p for p in self._pending if p[0] >= saved]
        for _, fs, path in due:
            prune_checkpoints(fs, path, keep_last=True)


def prune_finished(trials: Iterable[Any], keep: str | None) -> int:
    """At the end of a search: every finished (``TERMINATED``) trial loses its
    checkpoints, but trial ``keep`` (the winner) keeps its last; returns how many went."""
    dropped = 0
    for trial in trials:
        if getattr(trial, "status", None) != "TERMINATED":
            continue
        where = _trial_location(trial)
        if where is not None:
            dropped += prune_checkpoints(*where, keep_last=trial.trial_id == keep)
    return dropped
