"""Tune checkpoints kept only as long as a resume needs them.

A trial checkpoints at every report (model, optimiser and loop state, so an interrupted
search resumes each unfinished trial exactly). Tune keeps the latest one per trial
(``CheckpointConfig(num_to_keep=1)`` in :func:`search.runner.build_tuner`), and
:class:`DropFinishedCheckpoints` deletes it once Tune has finished the trial (completed,
or stopped by ASHA): a finished trial is never resumed, and its record lives in MLflow.
Trials that failed keep theirs (a resumed search retries them from it), and so do trials
still running when a search is interrupted.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

from ray import tune

__all__ = ["DropFinishedCheckpoints"]

log = logging.getLogger(__name__)


class DropFinishedCheckpoints(tune.Callback):
    """Deletes a trial's ``checkpoint_*`` directories when Tune completes or stops it
    (``on_trial_complete``; never on an error), on whatever filesystem the search's
    storage is (local, NFS, object store)."""

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        try:
            from pyarrow.fs import FileSelector, FileType

            storage = trial.storage
            fs, base = storage.storage_filesystem, storage.trial_fs_path
            for entry in fs.get_file_info(FileSelector(base, allow_not_found=True)):
                name = posixpath.basename(entry.path)
                if entry.type == FileType.Directory and name.startswith("checkpoint_"):
                    fs.delete_dir(entry.path)
        except Exception as err:  # never fail a search over housekeeping
            log.warning("could not delete the checkpoints of trial %s: %s",
                        getattr(trial, "trial_id", "?"), err)
