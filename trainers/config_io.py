"""Reading config files, before any heavy import: YAML through ``yaml.safe_load`` only,
one-line errors, and the nearest valid key for a misspelt one.

Only yaml and the standard library are imported here, so the command line can refuse a
malformed file, or an experiment file with a misspelt section, without loading torch
(``bench/cli.py`` measures it). :mod:`trainers.experiment` checks everything else.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from trainers.contracts import UserError

__all__ = ["EXPERIMENT_SECTIONS", "ConfigError", "did_you_mean", "precheck_experiment",
           "read_yaml_mapping"]

#: The top-level keys of an experiment file (``ExperimentConfig``'s fields; a test
#: checks they agree).
EXPERIMENT_SECTIONS = ("model", "train", "data", "provenance")


class ConfigError(UserError):
    """A config that cannot be used; the message is one line naming the problem."""


def did_you_mean(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name nearest ``key``, else ``""``."""
    near = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def read_yaml_mapping(path: Path, error: type[UserError], what: str,
                      expected: str) -> dict[str, Any]:
    """``yaml.safe_load`` of a file that must hold a mapping; a missing file, malformed
    YAML or another shape is one ``error`` line naming ``path`` (and the YAML line)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise error(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping with {expected}")
    return raw


def precheck_experiment(path: str | os.PathLike[str]) -> None:
    """The checks of an experiment file that need no model code: the file exists, is a
    YAML mapping, and holds only known sections. :func:`trainers.experiment.load_experiment`
    does the rest (and these checks again)."""
    path = Path(path)
    raw = read_yaml_mapping(path, ConfigError, "file", "model/train/data sections")
    for key, value in raw.items():
        if key not in EXPERIMENT_SECTIONS:
            first = next(iter(value), "") if isinstance(value, dict) else ""
            tail = f".{first}" if first else ""
            near = difflib.get_close_matches(str(key), EXPERIMENT_SECTIONS, n=1)
            hint = (f" (did you mean {near[0] + tail!r}?)" if near
                    else f" (valid here: {', '.join(EXPERIMENT_SECTIONS)})")
            raise ConfigError(f"{path}: unknown key {str(key) + tail!r}{hint}")
