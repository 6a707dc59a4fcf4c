"""The experiment config: one YAML file with ``model``, ``train`` and ``data`` sections.

This is the format ``recscale export`` writes and ``recscale train`` reads. YAML goes
through ``yaml.safe_load`` only; every section becomes a typed, validated object, and any
problem becomes one :class:`ConfigError` line naming the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spaces import ModelConfig
from spaces.blocks import BlockDimensionError, UnknownBlockError
from trainers.contracts import UserError
from trainers.data import DataConfig
from trainers.loop import TrainConfig

__all__ = ["ConfigError", "ExperimentConfig", "flatten", "load_experiment", "validation_message"]


class ConfigError(UserError):
    """A config that cannot be used; the message is one line naming the problem."""


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

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (YAML form) that loads back into an equal object."""
        out: dict[str, Any] = {
            "model": self.model.to_dict(),
            "train": self.train.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
        }
        if self.provenance:
            out["provenance"] = self.provenance
        return out

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def flat(self) -> dict[str, Any]:
        """Dotted keys for Ray and MLflow (``model.block``, ``train.lr``, ...)."""
        d = self.to_dict()
        d.pop("provenance", None)
        return flatten(d)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists and tuples stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def validation_message(err: BaseException, source: str = "config") -> str:
    """One line for a pydantic/config error: ``source: key: problem``."""
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if p not in ("mixer",)) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        return f"{source}: {loc}: {msg}{more}"
    if isinstance(err, UnknownBlockError | BlockDimensionError):
        return f"{source}: {err}"
    return f"{source}: {err}"


def load_experiment(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and validate an experiment YAML; any problem is one ``ConfigError`` line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with model/train/data sections")
    try:
        return ExperimentConfig(**raw)
    except (ValidationError, ValueError) as err:
        raise ConfigError(validation_message(err, str(path))) from None


def experiment_from_flat(flat: dict[str, Any], data: DataConfig | None = None) -> ExperimentConfig:
    """Typed configs from a flat dotted-key sample (what Ray Tune hands a trial).

    Keys outside ``model.``/``train.`` are ignored; ``data`` replaces any data keys.
    """
    tree: dict[str, Any] = {"model": {}, "train": {}}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head not in tree or not rest:
            continue
        node = tree[head]
        *parents, leaf = rest.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return ExperimentConfig(model=tree["model"], train=tree["train"], data=data or DataConfig())
