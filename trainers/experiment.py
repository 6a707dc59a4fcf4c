"""The experiment config: one YAML file with ``model``, ``train`` and ``data`` sections.

This is the format ``recscale export`` writes and ``recscale train`` reads. YAML goes
through ``yaml.safe_load`` only; every section becomes a typed, validated object, and any
problem becomes one :class:`ConfigError` line naming the file and the key. An unknown key
(``trian.lr``, ``model.wukong.kk``) is an error that names the nearest valid key, both
here and in :func:`experiment_from_flat` (the flat dotted form Ray and MLflow see).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spaces import ModelConfig, block_names, get_block
from trainers.config_io import (
    ConfigError,
    KeySchema,
    cached_key_schema,
    check_tree,
    read_yaml_mapping,
    save_key_schema,
)
from trainers.data import DataConfig
from trainers.loop import TrainConfig

__all__ = ["ConfigError", "ExperimentConfig", "check_keys", "data_dict", "experiment_from_flat", "flatten",
           "key_schema", "load_experiment", "validation_message"]


class ExperimentConfig(BaseModel):
    """Everything needed to train one model: what, how, on which data.

    ``provenance`` is free-form and optional: ``recscale export`` records where the
    config came from (search name, run ids, metrics); training ignores it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def to_dict(self, relative_to: str | Path | None = None) -> dict[str, Any]:
        """Nested plain dict (YAML form) that loads back into an equal object.

        The data section holds only the keys that apply to its dataset
        (:func:`data_dict`); with ``relative_to`` (a directory), its file paths are
        written relative to it.
        """
        out: dict[str, Any] = {
            "model": self.model.to_dict(),
            "train": self.train.model_dump(mode="json"),
            "data": data_dict(self.data, relative_to),
        }
        if self.provenance:
            out["provenance"] = self.provenance
        return out

    def to_yaml(self, path: str | Path) -> None:
        """Write the YAML, its data paths relative to the file's directory, so the file
        trains from any working directory (:func:`load_experiment` resolves them)."""
        path = Path(path)
        text = yaml.safe_dump(self.to_dict(relative_to=path.absolute().parent), sort_keys=False)
        path.write_text(text)

    def flat(self) -> dict[str, Any]:
        """Dotted keys for Ray and MLflow (``model.block``, ``train.lr``, ...)."""
        d = self.to_dict()
        d.pop("provenance", None)
        return flatten(d)


#: The data keys that apply to one kind of dataset only (``DataConfig.name``): a file
#: dataset's YAML carries no MovieLens label rule and no synthetic teacher, and so on.
#: None of them changes another kind's fingerprint (``trainers.data.dataset_fingerprint``).
_DATA_KEYS_OF = {"path": "file", "schema_path": "file", "label": "movielens-1m",
                 "synthetic": "synthetic"}
_DATA_PATHS = ("path", "schema_path")


def data_dict(data: DataConfig, relative_to: str | Path | None = None) -> dict[str, Any]:
    """The YAML form of ``data``: only the keys that apply to its dataset, and with
    ``relative_to`` (a directory) the file paths relative to it (absolute where no
    relative path exists, e.g. another drive). Loading it back (paths resolved against
    the same directory) gives a config with the same dataset fingerprint.

    Example:
        >>> sorted(data_dict(DataConfig(name="synthetic")))
        ['fractions', 'hash_buckets', 'max_rows', 'min_count', 'min_split_rows', 'name', 'seed', 'split', 'synthetic']
    """
    out: dict[str, Any] = {k: v for k, v in data.model_dump(mode="json").items()
                           if _DATA_KEYS_OF.get(k, data.name) == data.name}
    for key in _DATA_PATHS:
        value = out.get(key)
        if value is not None and relative_to is not None:
            absolute = os.path.abspath(value)  # in memory a relative path is the cwd's
            try:
                out[key] = os.path.relpath(absolute, os.path.abspath(relative_to))
            except ValueError:
                out[key] = absolute
    return out


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """``raw`` with its relative ``data.path`` / ``data.schema_path`` joined to ``base``
    (the YAML file's directory), so a config trains from any working directory."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    fixed = dict(data)
    for key in _DATA_PATHS:
        value = fixed.get(key)
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            fixed[key] = os.path.normpath(os.path.join(base, value))
        elif isinstance(value, str) and value:
            fixed[key] = os.path.expanduser(value)
    return {**raw, "data": fixed}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists and tuples stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _section_schemas(schema: type[BaseModel]) -> dict[str, type[BaseModel] | None]:
    """The keys a mapping for ``schema`` may hold, each with the model its value is
    checked against (None: a leaf, or a free-form mapping such as ``provenance``).

    ``ModelConfig`` holds a section per block family (``model.wukong``) instead of
    its ``mixer`` field.
    """
    out: dict[str, type[BaseModel] | None] = {}
    for name, field in schema.model_fields.items():
        kinds = typing.get_args(field.annotation) or (field.annotation,)
        nested = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        out[name] = nested[0] if nested else None
    if schema is ModelConfig:
        out.pop("mixer")
        out.update({name: get_block(name).Config for name in block_names()})
    return out


def key_schema(schema: type[BaseModel]) -> KeySchema:
    """Every key a mapping for ``schema`` may hold, nested (the plain form
    :func:`trainers.config_io.check_tree` checks and the command line caches)."""
    return {key: (key_schema(sub) if sub is not None else None)
            for key, sub in _section_schemas(schema).items()}


def check_keys(tree: Mapping[str, Any], schema: type[BaseModel], source: str,
               prefix: str = "") -> None:
    """Raise a one-line :class:`ConfigError` at the first key of ``tree`` (nested, as in
    the YAML) that ``schema`` does not know, naming the nearest valid key.

    Example::

        >>> check_keys({"trian": {"lr": 0.1}}, ExperimentConfig, "best.yaml")
        Traceback (most recent call last):
        trainers.config_io.ConfigError: best.yaml: unknown key 'trian.lr' (did you mean 'train.lr'?)
    """
    check_tree(tree, key_schema(schema), source, prefix)


def validation_message(err: BaseException, source: str = "config") -> str:
    """One line for a pydantic/config error: ``source: key: problem``."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if p not in ("mixer",)) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        return f"{source}: {loc}: {msg}{more}"
    return f"{source}: {err}"


def load_experiment(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate an experiment YAML; any problem is one ``ConfigError`` line.

    Relative ``data.path`` and ``data.schema_path`` are relative to the YAML file's
    directory (as :meth:`ExperimentConfig.to_yaml` writes them); the loaded config
    holds them absolute.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, ConfigError, "file", "model/train/data sections")
    schema = key_schema(ExperimentConfig)
    if cached_key_schema() != schema:  # lets the next command check keys without torch
        save_key_schema(schema)
    check_tree(raw, schema, str(path))
    raw = _resolve_data_paths(raw, path.absolute().parent)
    try:
        return ExperimentConfig(**raw)
    except (ValidationError, ValueError) as err:
        raise ConfigError(validation_message(err, str(path))) from None


def experiment_from_flat(flat: Mapping[str, Any], data: DataConfig | None = None,
                         source: str = "config") -> ExperimentConfig:
    """Typed configs from a flat dotted-key sample (what Ray Tune hands a trial).

    Every key must name a field: ``model.*``, ``train.*`` or ``data.*`` (an unknown one
    is a :class:`ConfigError` naming it and the nearest valid key). ``data``, when
    given, replaces the ``data.*`` keys. ``experiment_from_flat(exp.flat()) == exp``.
    """
    tree: dict[str, Any] = {"model": {}}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: key {key!r} nests under the value of {p!r}")
            node = child
        node[leaf] = list(value) if isinstance(value, tuple) else value
    check_keys(tree, ExperimentConfig, source)
    if "provenance" in tree:
        raise ConfigError(f"{source}: provenance is not part of a flat config")
    if data is not None:
        tree["data"] = data
    return ExperimentConfig(**tree)
