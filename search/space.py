"""Search-space files: YAML -> typed :class:`SearchSpace` -> define-by-run sampling.

A space names the families to search, the knobs shared by every family, each family's
own knobs and the training knobs. Every knob is either a constant or one of::

    {choice: [a, b, c]}                 # categorical
    {int: [lo, hi], log: false, step: 1}
    {float: [lo, hi], log: true}

Every value a file gives (a constant, each ``choice`` entry, both ends of a range) is
checked at load against the type and range of the field it sets (``ModelConfig``, the
family's block config, ``TrainConfig``); a ``float`` range on an integer knob is an error.
The files ship in ``spaces/`` (:data:`SPACES_DIR`); the loader lives in ``search/``
because training knobs are ``trainers`` fields, and ``spaces`` depends on nothing above it.

Example (``spaces/unified.yaml`` is the full one)::

    name: tiny
    families: [tokenmixer, wukong]
    model:                      # shared knobs: ModelConfig fields
      n_layers: {int: [1, 3]}
      d_model: {choice: [16, 32]}
    blocks:                     # per-family knobs: that family's config fields
      wukong: {k: {choice: [4, 8]}}
    train:                      # TrainConfig fields
      lr: {float: [1.0e-4, 1.0e-2], log: true}

:meth:`SearchSpace.suggest` is the define-by-run function Optuna runs: it only calls
``trial.suggest_*`` (names are the dotted keys, e.g. ``model.wukong.k``; a family's knobs
are only sampled when that family is chosen) and returns the constants.
:func:`experiment_from_flat` turns the sampled flat dict back into typed configs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

import spaces
from spaces.blocks import get_block
from spaces.blocks.base import ConditionalKnobs
from spaces.model import ModelConfig
from trainers.config_io import did_you_mean, read_yaml_mapping
from trainers.contracts import UserError
from trainers.loop import TrainConfig

__all__ = [
    "Choice",
    "FloatRange",
    "IntRange",
    "SPACES_DIR",
    "SearchSpace",
    "SpaceError",
    "bundled_space",
    "bundled_spaces",
    "load_space",
    "unflatten",
]

#: Where the shipped space files live (package data of ``spaces``).
SPACES_DIR = Path(spaces.__file__).parent


class SpaceError(UserError):
    """A search-space file that cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Choice(_Strict):
    choice: list[Any] = Field(min_length=1)


class IntRange(_Strict):
    bounds: tuple[int, int] = Field(alias="int")
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _order(self) -> IntRange:
        lo, hi = self.bounds
        if lo > hi or (self.log and lo < 1):
            raise ValueError(f"bad int range {list(self.bounds)} (log={self.log})")
        return self


class FloatRange(_Strict):
    bounds: tuple[float, float] = Field(alias="float")
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> FloatRange:
        lo, hi = self.bounds
        if lo > hi or (self.log and lo <= 0):
            raise ValueError(f"bad float range {list(self.bounds)} (log={self.log})")
        return self


Knob = Choice | IntRange | FloatRange | Any


def _parse_knob(value: Any) -> Any:
    """A dict with one of the keys choice/int/float is a distribution; else a constant."""
    if isinstance(value, dict) and value.keys() & {"choice", "int", "float"}:
        if "choice" in value:
            return Choice(**value)
        if "int" in value:
            return IntRange(**value)
        return FloatRange(**value)
    return value


def _as_tuples(value: Any) -> Any:
    """YAML has lists only; tuple fields (``head_hidden``) validate strictly as tuples."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


_REASONS = {"int_type": "is not an integer", "int_parsing": "is not an integer",
            "int_from_float": "is not an integer", "float_type": "is not a number",
            "float_parsing": "is not a number", "bool_type": "is not true or false",
            "string_type": "is not a string"}


def _check_value(adapter: TypeAdapter[Any], where: str, value: Any) -> None:
    """Raise ``ValueError("<where> <value> <what a valid value looks like>")`` unless
    ``value`` is valid for the field (strictly: ``"3"`` is not an integer)."""
    try:
        adapter.validate_python(_as_tuples(value), strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        reason = _REASONS.get(first["type"], first["msg"].replace("Input should", "should"))
        item = f"item {'.'.join(str(p) for p in first['loc'])} " if first["loc"] else ""
        raise ValueError(f"{where} {value!r}: {item}{reason}" if item
                         else f"{where} {value!r} {reason}") from None


def _check_knob(key: str, knob: Any, field: FieldInfo) -> None:
    """Every value ``knob`` can take is a valid value of ``field``."""
    annotated: Any = Annotated[field.annotation, field]  # the field's type and constraints
    adapter: TypeAdapter[Any] = TypeAdapter(annotated)
    if isinstance(knob, Choice):
        for i, value in enumerate(knob.choice):
            _check_value(adapter, f"{key}: choice[{i}]", value)
    elif isinstance(knob, IntRange | FloatRange):
        kind = "int" if isinstance(knob, IntRange) else "float"
        if kind == "float":
            try:
                adapter.validate_python(0.5, strict=True)
            except ValidationError as err:
                if err.errors()[0]["type"] in ("int_type", "int_from_float"):
                    raise ValueError(f"{key}: a float range on an integer knob; "
                                     f"use {{int: [lo, hi]}}") from None
        for i, value in enumerate(knob.bounds):
            _check_value(adapter, f"{key}: {kind}[{i}]", value)
    else:
        _check_value(adapter, f"{key}:", knob)


def _check_section(section: str, knobs: dict[str, Any], fields: dict[str, FieldInfo],
                   what: str) -> None:
    """Every key of ``knobs`` names one of ``fields``, and each value fits that field."""
    for key, knob in knobs.items():
        if key not in fields:
            raise ValueError(f"{section}.{key} is not {what}{did_you_mean(key, fields)}; "
                             f"valid: {sorted(fields)}")
        _check_knob(f"{section}.{key}", knob, fields[key])


class TrialLike(Protocol):
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...


def _sample(trial: TrialLike, name: str, knob: Any) -> Any:
    if isinstance(knob, Choice):
        if any(isinstance(c, list | dict) for c in knob.choice):
            # Optuna stores primitives only: sample the JSON text, return the value
            return json.loads(trial.suggest_categorical(name, [json.dumps(c) for c in knob.choice]))
        return trial.suggest_categorical(name, knob.choice)
    if isinstance(knob, IntRange):
        return trial.suggest_int(name, knob.bounds[0], knob.bounds[1], step=knob.step, log=knob.log)
    if isinstance(knob, FloatRange):
        return trial.suggest_float(name, knob.bounds[0], knob.bounds[1], log=knob.log)
    return knob


class SearchSpace(_Strict):
    """A validated search space (see the module docstring for the file format)."""

    name: str = "space"
    description: str = ""
    families: list[str] = Field(min_length=1)
    model: dict[str, Any] = Field(default_factory=dict)
    blocks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str]) -> list[str]:
        for name in families:
            get_block(name)  # raises with the list of valid names
        if len(set(families)) != len(families):
            raise ValueError(f"families listed twice: {families}")
        return families

    @field_validator("model", "train")
    @classmethod
    def _parse_shared(cls, knobs: dict[str, Any]) -> dict[str, Any]:
        return {k: _parse_knob(v) for k, v in knobs.items()}

    @field_validator("blocks")
    @classmethod
    def _parse_blocks(cls, blocks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {fam: {k: _parse_knob(v) for k, v in knobs.items()} for fam, knobs in blocks.items()}

    @model_validator(mode="after")
    def _known_keys_and_values(self) -> SearchSpace:
        model_fields = {k: f for k, f in ModelConfig.model_fields.items() if k not in ("block", "mixer")}
        _check_section("model", self.model, model_fields, "a model knob")
        for fam, knobs in self.blocks.items():
            if fam not in self.families:
                raise ValueError(f"blocks.{fam} given but {fam!r} is not in families {self.families}")
            _check_section(f"blocks.{fam}", knobs, get_block(fam).Config.model_fields, f"a {fam} knob")
        _check_section("train", self.train, TrainConfig.model_fields, "a training knob")
        return self

    def suggest(self, trial: TrialLike) -> dict[str, Any]:
        """Define-by-run sampling: only ``trial.suggest_*`` calls; returns the constants.

        The sampled and constant values together form one flat dict with dotted keys
        (``model.block``, ``model.d_model``, ``model.<family>.<knob>``, ``train.lr``).
        """
        constants: dict[str, Any] = {}

        def put_value(name: str, knob: Any, value: Any) -> None:
            structured = isinstance(knob, Choice) and isinstance(value, list | dict)
            if structured or not isinstance(knob, Choice | IntRange | FloatRange):
                constants[name] = value  # returned values override Optuna's raw sample

        def put(name: str, knob: Any) -> None:
            put_value(name, knob, _sample(trial, name, knob))

        def put_conditional(prefix: str, knobs: dict[str, Any], cfg_cls: type[ConditionalKnobs],
                            unset_inactive: bool) -> None:
            # knobs other knobs depend on (the tokenizer, attention's kind) are sampled
            # first; a knob ignored for the values drawn (n_tokens with field tokens,
            # hstu's ffn_mult) is not sampled, and set to None where its default would
            # contradict them (``unset_inactive``)
            parents = {p for p, _ in cfg_cls.conditions.values()}
            values: dict[str, Any] = {}
            for key in sorted(knobs, key=lambda k: k not in parents):
                if cfg_cls.is_active(key, values):
                    values[key] = _sample(trial, f"{prefix}{key}", knobs[key])
                    put_value(f"{prefix}{key}", knobs[key], values[key])
                elif unset_inactive:
                    constants[f"{prefix}{key}"] = None

        family = trial.suggest_categorical("model.block", list(self.families))
        put_conditional("model.", self.model, ModelConfig, unset_inactive=True)
        put_conditional(f"model.{family}.", self.blocks.get(str(family), {}),
                        get_block(str(family)).Config, unset_inactive=False)
        for key, knob in self.train.items():
            put(f"train.{key}", knob)
        return constants

    def sample(self, trial: Any) -> dict[str, Any]:
        """The full flat config of one trial, merged as Ray's OptunaSearch merges it:
        Optuna's sampled values, overridden by what :meth:`suggest` returns."""
        constants = self.suggest(trial)
        return {**trial.params, **constants}

    def dimensions(self) -> dict[str, Any]:
        """Every knob by dotted name (for reports and the search's parent run)."""
        out: dict[str, Any] = {"model.block": self.families}
        out.update({f"model.{k}": v for k, v in self.model.items()})
        for fam, knobs in self.blocks.items():
            out.update({f"model.{fam}.{k}": v for k, v in knobs.items()})
        out.update({f"train.{k}": v for k, v in self.train.items()})
        return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1} -> {"a": {"b": 1}}`` (inverse of ``trainers.experiment.flatten``)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML; any problem is one ``SpaceError`` line."""
    path = Path(path)
    if not path.exists() and (SPACES_DIR / path.name).exists() and path.parent == Path("."):
        path = SPACES_DIR / path.name
    raw = read_yaml_mapping(path, SpaceError, "search-space file", "families/model/blocks/train")
    try:
        return SearchSpace(**raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise SpaceError(f"{path}: {loc}: {msg}" if loc else f"{path}: {msg}") from None


def bundled_space(name: str) -> Path:
    """Path of a space file shipped in ``spaces/`` (``unified`` -> ``spaces/unified.yaml``)."""
    path = SPACES_DIR / f"{name}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise SpaceError(f"no bundled space {name!r}; shipped: {', '.join(shipped)}")
    return path


def bundled_spaces() -> list[Path]:
    """Every space file shipped in ``spaces/``."""
    return sorted(SPACES_DIR.glob("*.yaml"))

