"""Checks on the data before anything trains: one-class labels, splits without positives
or negatives or too small; stratified random splits for a rare positive class; positives
per split recorded; refused data leaves nothing in MLflow or the cache."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from trainers.data import (
    DataConfig,
    DataError,
    check_splits,
    load_dataset,
    split_indices,
)


def write(tmp: Path, frame: pd.DataFrame, schema: dict[str, object], **cfg: object) -> DataConfig:
    frame.to_csv(tmp / "f.csv", index=False)
    (tmp / "s.yaml").write_text(yaml.safe_dump(schema))
    return DataConfig(name="file", path=str(tmp / "f.csv"), schema_path=str(tmp / "s.yaml"), **cfg)


def clicks(n: int, rate: float, seed: int = 0) -> pd.DataFrame:
    """``n`` rows with exactly ``round(n·rate)`` positives at random rows."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=int)
    y[rng.choice(n, size=round(n * rate), replace=False)] = 1
    return pd.DataFrame({"user": rng.integers(0, 300, n), "ad": rng.integers(0, 50, n),
                         "ts": np.arange(n), "click": y})


SCHEMA = {"label": "click", "categorical": ["user", "ad"], "timestamp": "ts"}


@pytest.mark.parametrize(("value", "positives"), [(0, 0), (1, 10_000)])
def test_one_class_label_is_one_line_naming_the_numbers(tmp_path: Path, value: int,
                                                        positives: int) -> None:
    cfg = write(tmp_path, clicks(10_000, 0.0).assign(click=value), SCHEMA)
    with pytest.raises(DataError) as err:
        load_dataset(cfg, tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and "f.csv" in msg
    assert f"label column 'click' has one class: 10000 rows, {positives} positives" in msg
    assert not (tmp_path / "cache").exists()  # nothing cached for refused data


def test_temporal_split_without_late_positives_is_refused(tmp_path: Path) -> None:
    frame = clicks(1_000, 0.0)
    frame.loc[:99, "click"] = 1  # every positive among the earliest rows
    cfg = write(tmp_path, frame, SCHEMA, split="temporal")
    with pytest.raises(DataError) as err:
        load_dataset(cfg, tmp_path / "cache")
    msg = str(err.value)
    assert "val split has no positives: 100 rows, 0 positives" in msg
    assert "100 positives in 1000 rows; temporal split, fractions 0.8/0.1/0.1" in msg
    assert "random split" in msg and "\n" not in msg
    # the same data split at random (stratified) is fine: every split has positives
    ds = load_dataset(cfg.model_copy(update={"split": "random"}), tmp_path / "cache")
    assert ds.meta["positives"] == {"train": 80, "val": 10, "test": 10}


def test_split_without_negatives_is_refused() -> None:
    with pytest.raises(DataError, match="test split has no negatives: 40 rows, 40 positives"):
        check_splits({"train": 320, "val": 40, "test": 40}, {"train": 100, "val": 5, "test": 40},
                     "x.csv", "temporal", (0.8, 0.1, 0.1))


def test_too_small_split_is_refused_and_the_floor_is_a_knob(tmp_path: Path) -> None:
    cfg = write(tmp_path, clicks(150, 0.3), SCHEMA)  # val and test: 15 rows each
    with pytest.raises(DataError) as err:
        load_dataset(cfg, tmp_path / "cache")
    assert "val split has 15 rows, fewer than min_split_rows=20 (150 rows; random split" in str(
        err.value)
    ds = load_dataset(cfg.model_copy(update={"min_split_rows": 10}), tmp_path / "cache")
    assert ds.meta["rows"] == {"train": 120, "val": 15, "test": 15}
    # a cached dataset is checked again against a larger floor (the cache key ignores it)
    with pytest.raises(DataError, match="fewer than min_split_rows=20"):
        load_dataset(cfg.model_copy(update={"min_split_rows": 20}), tmp_path / "cache")


@pytest.mark.parametrize("seed", range(5))
def test_stratified_split_keeps_a_rare_class_in_every_split(tmp_path: Path, seed: int) -> None:
    """0.4% positives in 10k rows: 40 positives; 32 / 4 / 4, whatever the seed."""
    cfg = write(tmp_path, clicks(10_000, 0.004, seed=seed), SCHEMA, seed=seed)
    ds = load_dataset(cfg, tmp_path / "cache")
    assert ds.meta["positives"] == {"train": 32, "val": 4, "test": 4}
    assert ds.meta["rows"] == {"train": 8_000, "val": 1_000, "test": 1_000}
    assert ds.meta["stratified"] is True
    stats = ds.split_stats()
    assert {k: v["positives"] for k, v in stats.items()} == ds.meta["positives"]
    assert stats["val"]["base_rate"] == pytest.approx(0.004)
    assert "val 1000 rows (4 positives, 0.40%)" in ds.describe()


def test_stratified_indices_partition_and_depend_on_the_seed() -> None:
    y = (np.random.default_rng(1).random(5_001) < 0.01).astype(np.float32)
    parts = split_indices(len(y), (0.7, 0.15, 0.15), seed=3, label=y)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    assert [len(p) for p in parts] == [len(p) for p in split_indices(len(y), (0.7, 0.15, 0.15), 3)]
    n_pos = int(y.sum())
    assert [int(y[p].sum()) for p in parts[1:]] == [round(n_pos * 0.15)] * 2
    other = split_indices(len(y), (0.7, 0.15, 0.15), seed=4, label=y)
    assert not np.array_equal(parts[1], other[1])
    again = split_indices(len(y), (0.7, 0.15, 0.15), seed=3, label=y)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_unstratified_split_would_lose_the_rare_class() -> None:
    """Why stratify: at 0.4% of 10k rows a plain random split leaves some seed's val
    split without a positive (the stratified one never does, test above)."""
    y = np.zeros(10_000, dtype=np.float32)
    y[np.random.default_rng(0).choice(10_000, 40, replace=False)] = 1
    counts = [int(y[split_indices(10_000, (0.8, 0.1, 0.1), s)[1]].sum()) for s in range(60)]
    assert min(counts) == 0 and max(counts) >= 7
    strat = {int(y[split_indices(10_000, (0.8, 0.1, 0.1), s, label=y)[1]].sum()) for s in range(60)}
    assert strat == {4}


# --------------------------------------------------------------------------- via the CLI


def _runs_left_running(db: Path) -> list[tuple[str, str]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return list(con.execute("select run_uuid, status from runs where status = 'RUNNING'"))
        except sqlite3.OperationalError:  # no runs table: nothing was ever logged
            return []


def _cli(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECSCALE_CACHE": str(tmp / "cache"), "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "recscale", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp)


def test_cli_search_and_train_refuse_a_one_class_label(tmp_path: Path) -> None:
    """Exit 2, one line naming the numbers, before any MLflow run exists (search: the
    dataset is loaded in ``plan_search``, before ``open_tracking``; train: before the
    ``RunWriter``), and no Tune state is written."""
    write(tmp_path, clicks(2_000, 0.0), SCHEMA)
    db = tmp_path / "m.db"
    search = _cli(["search", "--data", "f.csv", "--schema", "s.yaml", "--budget-flops", "1e9",
                   "--tracking-uri", f"sqlite:///{db}", "--storage", str(tmp_path / "ray")],
                  tmp_path)
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"model": {"block": "wukong"}, "data": {
        "name": "file", "path": str(tmp_path / "f.csv"), "schema_path": str(tmp_path / "s.yaml")}}))
    train = _cli(["train", str(exp), "--tracking-uri", f"sqlite:///{db}", "--no-progress"],
                 tmp_path)
    for proc in (search, train):
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("recscale: error:"), lines
        assert "label column 'click' has one class: 2000 rows, 0 positives" in lines[0]
    assert _runs_left_running(db) == []
    assert not db.exists()  # nothing was logged at all
    assert not (tmp_path / "ray" / "recscale").exists()
    assert not (tmp_path / "cache" / "datasets").exists() or not any(
        (tmp_path / "cache" / "datasets").iterdir())


def test_cli_search_refuses_a_split_too_small_for_the_budget(tmp_path: Path) -> None:
    """A budget whose one trial would pass over the training split hundreds of times,
    even with the largest model the space allows: one line naming the numbers, exit 2,
    nothing written."""
    write(tmp_path, clicks(600, 0.3), SCHEMA)
    db = tmp_path / "m.db"
    res = _cli(["search", "--data", "f.csv", "--schema", "s.yaml", "--budget-flops", "8e13",
                "--tracking-uri", f"sqlite:///{db}", "--storage", str(tmp_path / "ray")],
               tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert lines[-1].startswith("recscale: error: training split too small for the budget: ")
    assert "480 rows" in lines[-1] and "passes over it" in lines[-1]
    assert "Traceback" not in res.stderr
    assert not db.exists() and not (tmp_path / "ray").exists()
