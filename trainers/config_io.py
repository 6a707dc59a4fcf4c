"""Reading config files, before any heavy import: YAML through ``yaml.safe_load`` only,
one-line errors, and the nearest valid key for a misspelt one.

Only yaml and the standard library are imported here, so the command line can refuse a
malformed file, or an experiment file with a misspelt section, without loading torch
(``bench/cli.py`` measures it). :mod:`trainers.experiment` checks everything else.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from trainers.contracts import UserError, cache_dir

__all__ = ["EXPERIMENT_SECTIONS", "ConfigError", "KeySchema", "cached_key_schema", "check_tree",
           "did_you_mean", "precheck_experiment", "read_yaml_mapping", "save_key_schema"]

#: The keys a config mapping may hold: each maps to the schema of its value, or None for
#: a leaf (or a free-form mapping). Built from the typed configs by
#: ``trainers.experiment.key_schema``.
KeySchema = dict[str, "KeySchema | None"]

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


def _first_leaf(value: Any, prefix: str = "") -> str:
    if isinstance(value, Mapping) and value:
        key, sub = next(iter(value.items()))
        return _first_leaf(sub, f"{prefix}{key}.")
    return prefix.rstrip(".")


def check_tree(tree: Mapping[str, Any], schema: KeySchema, source: str, prefix: str = "") -> None:
    """Raise a one-line :class:`ConfigError` at the first key of ``tree`` (nested, as in
    the YAML) that ``schema`` does not know, naming the nearest valid key.

    Example::

        >>> check_tree({"trian": {"lr": 0.1}}, {"train": {"lr": None}}, "best.yaml")
        Traceback (most recent call last):
        trainers.config_io.ConfigError: best.yaml: unknown key 'trian.lr' (did you mean 'train.lr'?)
    """
    for key, value in tree.items():
        if key not in schema:
            rest = _first_leaf(value)
            tail = f".{rest}" if rest else ""
            near = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = (f" (did you mean {prefix + near[0] + tail!r}?)" if near
                    else f" (valid here: {', '.join(schema)})")
            raise ConfigError(f"{source}: unknown key {prefix + str(key) + tail!r}{hint}")
        sub = schema[key]
        if sub is not None and isinstance(value, Mapping):
            check_tree(value, sub, source, f"{prefix}{key}.")


def _schema_file() -> Path:
    """The cache file of the experiment key schema, named by the code it comes from: the
    size and modification time of every module of ``spaces`` and ``trainers``."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for pkg in ("spaces", "trainers"):
        for path in sorted((root / pkg).rglob("*.py")):
            st = path.stat()
            digest.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return cache_dir() / "config-keys" / f"{digest.hexdigest()[:16]}.json"


def cached_key_schema() -> KeySchema | None:
    """The experiment key schema saved by an earlier run of this same code, if any."""
    try:
        schema = json.loads(_schema_file().read_text())
    except (OSError, ValueError):
        return None
    return schema if isinstance(schema, dict) else None


def save_key_schema(schema: KeySchema) -> None:
    """Save the experiment key schema for the next run (atomic; a failure costs nothing
    but that run's speed)."""
    path = _schema_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(schema))
        os.replace(tmp, path)
    except OSError:
        pass


def precheck_experiment(path: str | os.PathLike[str]) -> None:
    """The checks of an experiment file that need no model code: the file exists, is a
    YAML mapping, and holds only known keys — every key, nested ones included, once an
    earlier run of this code saved the key schema (:func:`save_key_schema`); else the
    top-level sections. :func:`trainers.experiment.load_experiment` does the rest (and
    these checks again)."""
    path = Path(path)
    raw = read_yaml_mapping(path, ConfigError, "file", "model/train/data sections")
    schema = cached_key_schema() or dict.fromkeys(EXPERIMENT_SECTIONS)
    check_tree(raw, schema, str(path))
