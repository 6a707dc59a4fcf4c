"""Propose a schema for a user's data file (``recscale schema DATA_FILE``).

The proposal is a starting point for the user to edit, written as YAML with comments: each
column's role (label, categorical, numeric, timestamp) and why, its number of distinct
values, and per-field hashing for very large vocabularies. It loads with
:func:`trainers.data_sources.load_schema` and works with ``recscale search --data F
--schema S`` as written. The format is documented in ``docs/data.md``.

Rules, in order, per column (types from the first ``sample_rows`` rows, distinct counts
from the whole column):

* **label**: the first 0/1 (or boolean) column, none missing, whose name looks like a
  label (``label, click, clicked, y, target, converted, ...``), else one named like a flag
  (``is_*, has_*, *_flag``), else the last 0/1 column of the file, else none (the YAML
  then says to fill it in). Other 0/1 columns are categorical features.
* **timestamp**: a column named like a time (``ts, time, timestamp, date, *_at, ...``)
  holding numbers or dates; dates in text are also taken when most values parse.
* **numeric**: numbers with more than ``numeric_min_distinct`` distinct values and not
  named like an id.
* **categorical**: everything else (text, ids, small integer codes); a column with one
  value, or a unique value per row that is not an id, is left out with a comment.
* **hashing**: a categorical column with more than ``DEFAULT_HASH_BUCKETS`` distinct
  values gets ``vocab: {col: {hash_buckets: N}}`` (N a power of two near a quarter of
  its distinct values, at least the default), so the proposal states the choice; the
  encoder would hash it at the default bucket count anyway.

Example:
    >>> text = propose_schema("clicks.csv").to_yaml()  # doctest: +SKIP
    >>> print(text.splitlines()[0])  # doctest: +SKIP
    # schema proposed by `recscale schema` for clicks.csv (10000 rows): edit, then ...
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trainers.data import DEFAULT_HASH_BUCKETS
from trainers.data_sources import (
    CSV_SUFFIXES,
    PARQUET_SUFFIXES,
    DataError,
    FieldOptions,
    FileSchema,
    _check_data_path,
    reading,
    require_rows,
)

__all__ = ["ColumnGuess", "SchemaProposal", "propose_schema"]

_LABEL_NAME = re.compile(
    r"^(label|labels|click|clicks|clicked|is_click|y|target|outcome|converted|conversion|"
    r"purchase|purchased|like|liked|.*_label|.*_target)$", re.IGNORECASE)
_WEAK_LABEL_NAME = re.compile(r"^(is_.+|has_.+|.*_flag)$", re.IGNORECASE)
_TIME_NAME = re.compile(
    r"^(ts|time|timestamp|datetime|date|day|event_time|.*_time|.*_ts|.*_at|.*_date)$",
    re.IGNORECASE)
_ID_NAME = re.compile(r"^(id|.*_id|.*id|.*_key|uid|sku|zip|zip_code|postcode)$", re.IGNORECASE)


@dataclass(frozen=True)
class ColumnGuess:
    """What the proposal says of one column.

    Args:
        name: the column.
        role: ``label``, ``categorical``, ``numeric``, ``timestamp`` or ``skip``.
        distinct: distinct non-missing values (whole column).
        missing: share of missing values (whole column).
        why: a short reason, written as the YAML comment.
    """

    name: str
    role: str
    distinct: int
    missing: float
    why: str


@dataclass(frozen=True)
class SchemaProposal:
    """A proposed schema and the per-column reasons behind it.

    Example:
        >>> p = SchemaProposal("f.csv", 4, [ColumnGuess("y", "label", 2, 0.0, "0/1"),
        ...     ColumnGuess("u", "categorical", 3, 0.0, "text")])
        >>> p.schema().categorical
        ('u',)
    """

    path: str
    rows: int
    columns: list[ColumnGuess]
    hash_buckets: dict[str, int] = field(default_factory=dict)

    def _names(self, role: str) -> list[str]:
        return [c.name for c in self.columns if c.role == role]

    def schema(self) -> FileSchema:
        """The proposal as a :class:`FileSchema` (raises ``DataError`` without a label)."""
        labels = self._names("label")
        if not labels:
            raise DataError(f"{self.path}: no 0/1 column to use as the label; "
                            "write the label column into the proposed schema")
        times = self._names("timestamp")
        return FileSchema(
            label=labels[0], categorical=tuple(self._names("categorical")),
            numeric=tuple(self._names("numeric")), timestamp=times[0] if times else None,
            vocab={c: FieldOptions(hash_buckets=b) for c, b in self.hash_buckets.items()},
        )

    def to_yaml(self) -> str:
        """The schema as commented YAML (cardinalities and reasons as comments)."""
        by_name = {c.name: c for c in self.columns}

        def note(c: ColumnGuess) -> str:
            miss = f", {100 * c.missing:.1f}% missing" if c.missing else ""
            return f"{c.distinct} distinct{miss}; {c.why}"

        def q(name: str) -> str:  # a YAML scalar that reads back as this string
            plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name) and name.lower() not in {
                "true", "false", "yes", "no", "on", "off", "null", "y", "n"}
            return name if plain else "'" + name.replace("'", "''") + "'"

        lines = [
            f"# schema proposed by `recscale schema` for {self.path} ({self.rows} rows):",
            "# check every role below and edit; the format is documented in docs/data.md.",
            "# Use it with: recscale search --data DATA_FILE --schema THIS_FILE ...",
        ]
        labels = self._names("label")
        if labels:
            lines.append(f"label: {q(labels[0])}  # {note(by_name[labels[0]])}")
        else:
            lines.append("label: FILL_IN  # no 0/1 column found: name the 0/1 label column")
        for role in ("categorical", "numeric"):
            names = self._names(role)
            if names:
                lines.append(f"{role}:")
                lines += [f"  - {q(n)}  # {note(by_name[n])}" for n in names]
            else:
                lines.append(f"{role}: []")
        times = self._names("timestamp")
        if times:
            lines.append(f"timestamp: {q(times[0])}  # {note(by_name[times[0]])}; "
                         "enables --split temporal")
        if self.hash_buckets:
            lines.append("vocab:  # per-field vocabulary options (docs/data.md)")
            for n, b in self.hash_buckets.items():
                lines.append(f"  {q(n)}: {{hash_buckets: {b}}}  # {by_name[n].distinct} "
                             "distinct values share this many embedding rows")
        skipped = [c for c in self.columns if c.role == "skip"]
        if skipped:
            lines.append("# left out (add them above if they are features):")
            lines += [f"#   {c.name}: {note(c)}" for c in skipped]
        return "\n".join(lines) + "\n"


def _read(path: Path, suffix: str, sample_rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A typed sample (pandas' own inference) and the whole file as text columns."""
    with reading(path, suffix):
        if suffix in PARQUET_SUFFIXES:
            whole = pd.read_parquet(path)
            sample = whole.head(sample_rows)
        else:
            sample = pd.read_csv(path, nrows=sample_rows)
            whole = pd.read_csv(path, dtype=str)  # as read_file reads categorical columns
    require_rows(path, whole)
    return sample, whole


def _is_binary(s: pd.Series) -> bool:
    """Two values, both 0/1 (numbers, text or booleans), none missing."""
    if s.isna().any():
        return False
    values = set(s.astype(str).str.lower().unique())
    return len(values) == 2 and values <= {"0", "1", "0.0", "1.0", "true", "false"}


def _all_numbers(s: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(s):
        return False
    if pd.api.types.is_numeric_dtype(s):
        return True
    present = s.dropna()
    return bool(len(present)) and bool(pd.to_numeric(present, errors="coerce").notna().all())


def _parses_as_dates(s: pd.Series) -> bool:
    text = s.dropna().astype(str).head(200)
    if text.empty or pd.to_numeric(text, errors="coerce").notna().all():
        return False
    parsed = pd.to_datetime(text, errors="coerce", utc=True, format="mixed")
    return bool(parsed.notna().mean() > 0.9)


def _guess(name: str, sample: pd.Series, whole: pd.Series, n: int,
           numeric_min_distinct: int) -> ColumnGuess:
    distinct = int(whole.nunique(dropna=True))
    n_missing = int(whole.isna().sum())
    missing = n_missing / max(n, 1)
    numeric = _all_numbers(sample) and _all_numbers(whole)
    if distinct <= 1:
        return ColumnGuess(name, "skip", distinct, missing, "one value: carries no signal")
    if _is_binary(whole):
        role = "label" if _LABEL_NAME.match(name) else "binary"
        return ColumnGuess(name, role, distinct, missing, "0/1 column")
    if not n_missing and _TIME_NAME.match(name) and (
            numeric or pd.api.types.is_datetime64_any_dtype(sample) or _parses_as_dates(sample)):
        return ColumnGuess(name, "timestamp", distinct, missing, "named like a time")
    if not n_missing and (pd.api.types.is_datetime64_any_dtype(sample)
                          or _parses_as_dates(sample)):
        return ColumnGuess(name, "timestamp", distinct, missing, "dates")
    if numeric and not _ID_NAME.match(name):
        if distinct > numeric_min_distinct:
            return ColumnGuess(name, "numeric", distinct, missing, "numbers")
        return ColumnGuess(name, "categorical", distinct, missing,
                           f"few distinct numbers (<= {numeric_min_distinct}): codes")
    if distinct == n - n_missing and not _ID_NAME.match(name):
        return ColumnGuess(name, "skip", distinct, missing,
                           "a different value in every row (a row key?)")
    why = "named like an id" if _ID_NAME.match(name) else "text"
    return ColumnGuess(name, "categorical", distinct, missing, why)


def _buckets_for(distinct: int, default: int) -> int:
    """A power of two near a quarter of ``distinct``, at least ``default``, at most 2^22."""
    return int(min(max(default, 2 ** round(math.log2(max(distinct, 1) / 4))), 2**22))


def propose_schema(path: str | Path, sample_rows: int = 100_000,
                   numeric_min_distinct: int = 20,
                   hash_above: int = DEFAULT_HASH_BUCKETS) -> SchemaProposal:
    """Propose a schema for the CSV or parquet file ``path``.

    Args:
        path: a ``.csv``, ``.csv.gz`` or ``.parquet`` file.
        sample_rows: rows read for type inference (distinct counts use every row).
        numeric_min_distinct: a numeric column with at most this many distinct values
            is proposed as categorical (codes such as age buckets).
        hash_above: categorical columns with more distinct values get ``hash_buckets``.

    Raises:
        DataError: the file cannot be read (one line).
    """
    path = Path(path)
    suffix = _check_data_path(path)
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:  # _check_data_path refuses these
        raise DataError(f"{path}: unsupported extension {suffix!r}")
    sample, whole = _read(path, suffix, sample_rows)
    n = len(whole)
    guesses = [_guess(str(c), sample[c], whole[c], n, numeric_min_distinct)
               for c in whole.columns]
    # the label: a label-like 0/1 column, else the last 0/1 column; other 0/1 columns
    # are categorical features
    label = next((g for g in guesses if g.role == "label"), None)
    if label is None:
        label = next((g for g in guesses if g.role == "binary" and _WEAK_LABEL_NAME.match(g.name)),
                     None)
    if label is None:
        label = next((g for g in reversed(guesses) if g.role == "binary"), None)
    out: list[ColumnGuess] = []
    for g in guesses:
        if g is label:
            out.append(ColumnGuess(g.name, "label", g.distinct, g.missing,
                                   "0/1 column" + (", named like a label"
                                                   if _LABEL_NAME.match(g.name) else
                                                   "; check it is the label")))
        elif g.role in ("label", "binary"):
            out.append(ColumnGuess(g.name, "categorical", g.distinct, g.missing,
                                   "0/1 feature"))
        else:
            out.append(g)
    times = [g for g in out if g.role == "timestamp"]
    for extra in times[1:]:  # one timestamp; later date columns become categorical
        out[out.index(extra)] = ColumnGuess(extra.name, "categorical", extra.distinct,
                                            extra.missing, "a second time column")
    hashing = {g.name: _buckets_for(g.distinct, hash_above) for g in out
               if g.role == "categorical" and g.distinct > hash_above}
    return SchemaProposal(str(path), n, out, hashing)
