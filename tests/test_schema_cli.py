"""``recscale schema DATA_FILE``: a proposed schema that loads back and encodes as
written; schema validation errors that name the key and show a valid value; the schema
documentation linked from ``--help``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recscale.cli import build_parser, main
from trainers.data import DataConfig, DataError, load_dataset
from trainers.data_sources import load_schema
from trainers.schema_infer import propose_schema

ROOT = Path(__file__).resolve().parent.parent


def movie_like(n: int = 3_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user_id": rng.integers(0, 400, n),
        "item": [f"m{i}" for i in rng.integers(0, 150, n)],
        "age": rng.choice([1, 18, 25, 35, 45, 50, 56], n),
        "price": rng.normal(10, 3, n).round(3),
        "is_weekend": rng.integers(0, 2, n),
        "ts": 1_000_000_000 + rng.permutation(n),
        "row": [f"r{i}" for i in range(n)],
        "const": 7,
        "click": (rng.random(n) < 0.25).astype(int),
    })


def test_proposal_roles_cardinalities_and_label(tmp_path: Path) -> None:
    df = movie_like()
    df.to_csv(tmp_path / "f.csv", index=False)
    proposal = propose_schema(tmp_path / "f.csv")
    roles = {c.name: c.role for c in proposal.columns}
    assert roles == {"user_id": "categorical", "item": "categorical", "age": "categorical",
                     "price": "numeric", "is_weekend": "categorical", "ts": "timestamp",
                     "row": "skip", "const": "skip", "click": "label"}
    distinct = {c.name: c.distinct for c in proposal.columns}
    assert distinct["user_id"] == df["user_id"].nunique() and distinct["item"] == 150
    text = proposal.to_yaml()
    assert f"  - user_id  # {df['user_id'].nunique()} distinct; named like an id" in text
    assert "label: click  # 2 distinct; 0/1 column, named like a label" in text
    assert "docs/data.md" in text and "#   row:" in text  # left-out columns as comments
    assert not proposal.hash_buckets


def test_proposal_round_trips_and_encodes_as_written(tmp_path: Path) -> None:
    movie_like().to_csv(tmp_path / "f.csv", index=False)
    out = tmp_path / "s.yaml"
    out.write_text(propose_schema(tmp_path / "f.csv").to_yaml())
    schema = load_schema(out)
    assert schema == propose_schema(tmp_path / "f.csv").schema()
    assert schema.label == "click" and schema.timestamp == "ts"
    for split in ("random", "temporal"):
        ds = load_dataset(DataConfig(name="file", path=str(tmp_path / "f.csv"),
                                     schema_path=str(out), split=split), tmp_path / "cache")
        assert ds.spec.field_names == ("user_id", "item", "age", "is_weekend", "price")
        assert ds.spec.cardinalities[2] == 8  # 7 age codes + OOV


def test_parquet_and_a_huge_field_get_hashing(tmp_path: Path) -> None:
    n = 6_000
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"device": [f"d{i}" for i in rng.permutation(n)][: n - 500] * 1
                       + [f"d{i}" for i in range(500)],
                       "site": rng.integers(0, 20, n), "target": rng.integers(0, 2, n)})
    df.to_parquet(tmp_path / "f.parquet", index=False)
    proposal = propose_schema(tmp_path / "f.parquet", hash_above=1_000)
    assert proposal.hash_buckets == {"device": 1_024}  # ~1/4 of 6k distinct, as a power of 2
    (tmp_path / "s.yaml").write_text(proposal.to_yaml())
    schema = load_schema(tmp_path / "s.yaml")
    assert schema.label == "target" and schema.vocab["device"].hash_buckets == 1_024
    ds = load_dataset(DataConfig(name="file", path=str(tmp_path / "f.parquet"),
                                 schema_path=str(tmp_path / "s.yaml")), tmp_path / "cache")
    assert ds.spec.cardinalities[0] == 1_025 and ds.meta["vocab"]["device"]["hashed"]


def test_label_is_found_by_name_then_by_position(tmp_path: Path) -> None:
    df = pd.DataFrame({"is_new": [0, 1] * 50, "shop": list("abcde") * 20,
                       "bought": [1, 0, 0, 1] * 25})
    df.to_csv(tmp_path / "f.csv", index=False)
    # no label-like name: a flag-like name (is_*) wins over position
    assert propose_schema(tmp_path / "f.csv").schema().label == "is_new"
    df.rename(columns={"is_new": "new"}).to_csv(tmp_path / "g.csv", index=False)
    assert propose_schema(tmp_path / "g.csv").schema().label == "bought"  # the last 0/1
    df.assign(y=[0, 1] * 50).to_csv(tmp_path / "h.csv", index=False)
    assert propose_schema(tmp_path / "h.csv").schema().label == "y"  # named like a label


def test_cli_writes_refuses_overwrite_and_reports(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    movie_like().to_csv(tmp_path / "f.csv", index=False)
    out = tmp_path / "s.yaml"
    assert main(["schema", str(tmp_path / "f.csv"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "label click, 4 categorical, 1 numeric, timestamp ts, 2 left out" in err
    assert f"--schema {out}" in err
    assert load_schema(out).label == "click"
    assert main(["schema", str(tmp_path / "f.csv"), "-o", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"recscale: error: {out} exists; pass --force to overwrite it"]
    assert main(["schema", str(tmp_path / "f.csv"), "-o", str(out), "--force"]) == 0
    capsys.readouterr()
    assert main(["schema", str(tmp_path / "f.csv")]) == 0  # to stdout
    assert capsys.readouterr().out == out.read_text()
    assert main(["schema", str(tmp_path / "absent.csv")]) == 2
    assert "absent.csv: file not found" in capsys.readouterr().err


def test_no_label_column_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pd.DataFrame({"a": list("xyz") * 10, "b": np.arange(30.0) / 7}).to_csv(
        tmp_path / "f.csv", index=False)
    assert main(["schema", str(tmp_path / "f.csv"), "-o", str(tmp_path / "s.yaml")]) == 0
    assert "no 0/1 label column found" in capsys.readouterr().err
    assert load_schema(tmp_path / "s.yaml").label == "FILL_IN"
    with pytest.raises(DataError, match="no 0/1 column to use as the label"):
        propose_schema(tmp_path / "f.csv").schema()


# --------------------------------------------------------------------------- messages

GOOD = "label: click\ncategorical: [user]\n"
BAD_SCHEMAS = {
    "string for a list": ("label: click\ncategorical: user_id\n",
                          "schema key 'categorical' must be a list of column names, "
                          "e.g. [user_id, item_id]; got 'user_id'"),
    "number in a list": ("label: click\ncategorical: [user, 2019]\n",
                         "schema key 'categorical' must be a list of column names, e.g. "
                         "[user_id, item_id]; item 2 is 2019, not a column name"),
    "numeric not a list": ("label: click\nnumeric: {price: 1}\n",
                           "schema key 'numeric' must be a list of column names, "
                           "e.g. [price, age]"),
    "list for the label": ("label: [click]\ncategorical: [user]\n",
                           "schema key 'label' must be one column name, e.g. label: click; "
                           "got ['click']"),
    "timestamp a number": (GOOD + "timestamp: 5\n",
                           "schema key 'timestamp' must be one column name, e.g. timestamp: ts"),
    "missing label": ("categorical: [user]\n",
                      "required schema key 'label' is missing: one column name, "
                      "e.g. label: click"),
    "unknown key": (GOOD + "weights: w\n",
                    "unknown schema key 'weights' (valid: label, categorical, numeric, "
                    "timestamp, user, item, vocab; see docs/data.md)"),
    "no features": ("label: click\n", "schema lists no categorical or numeric columns"),
    "vocab a list": (GOOD + "vocab: [user]\n",
                     "schema key 'vocab' must be a mapping from categorical columns to "
                     "options, e.g. {user_id: {min_count: 5, hash_buckets: 1048576}}"),
    "vocab option out of range": (GOOD + "vocab: {user: {min_count: 0}}\n",
                                  "schema key 'vocab.user.min_count' must be an integer >= 1, "
                                  "e.g. min_count: 5; got 0"),
    "vocab option not an integer": (GOOD + "vocab: {user: {hash_buckets: 1.5e6}}\n",
                                    "schema key 'vocab.user.hash_buckets' must be an integer "
                                    ">= 0 (0 = never hash)"),
    "vocab unknown option": (GOOD + "vocab: {user: {buckets: 10}}\n",
                             "schema key 'vocab.user.buckets' is unknown (valid options: "
                             "min_count, hash_buckets)"),
    "vocab of a non-categorical column": (GOOD + "vocab: {price: {min_count: 2}}\n",
                                          "'price' is not a categorical column "
                                          "(categorical: user)"),
    "vocab field not a mapping": (GOOD + "vocab: {user: 3}\n",
                                  "schema key 'vocab.user' must be a mapping of options"),
}


@pytest.mark.parametrize("case", list(BAD_SCHEMAS))
def test_schema_errors_name_the_key_and_a_valid_value(case: str, tmp_path: Path) -> None:
    text, expected = BAD_SCHEMAS[case]
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        load_schema(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert expected in msg, msg
    assert "Input should be" not in msg  # never pydantic's own words


def test_help_points_at_the_schema_documentation() -> None:
    search = next(a for a in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
                  if a.dest == "command").choices["search"]
    help_text = search.format_help()
    assert "docs/data.md" in help_text and "--min-count" in help_text
    assert "--hash-buckets" in help_text and "recscale schema" in help_text
    assert "docs/data.md" in build_parser().format_help()
    doc = (ROOT / "docs" / "data.md").read_text()
    for key in ("label", "categorical", "numeric", "timestamp", "vocab", "min_count",
                "hash_buckets", "RECSCALE_CACHE", "min_split_rows"):
        assert f"`{key}" in doc, key
    assert "docs/data.md" in (ROOT / "README.md").read_text()


def test_the_documented_example_loads_and_encodes(tmp_path: Path) -> None:
    """docs/data.md's worked example (CSV and schema blocks) works as printed."""
    doc = (ROOT / "docs" / "data.md").read_text()
    csv = doc.split("```csv\n", 1)[1].split("```", 1)[0]
    schema = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "clicks.csv").write_text(csv)
    (tmp_path / "clicks.yaml").write_text(schema)
    s = load_schema(tmp_path / "clicks.yaml")
    assert s.label == "click" and s.vocab
    frame = pd.read_csv(tmp_path / "clicks.csv")
    assert set(s.columns) <= set(frame.columns)
    # the example is a few rows; repeated it makes a file the checks accept
    pd.concat([frame] * 20, ignore_index=True).to_csv(tmp_path / "big.csv", index=False)
    ds = load_dataset(DataConfig(name="file", path=str(tmp_path / "big.csv"),
                                 schema_path=str(tmp_path / "clicks.yaml")), tmp_path / "cache")
    assert ds.spec.n_categorical == len(s.categorical)


def test_awkward_column_names_are_quoted_and_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 400
    pd.DataFrame({"2019": np.char.add("v", rng.integers(0, 30, n).astype(str)),
                  "on": list("abcd") * 100,
                  "my col": rng.integers(0, 9, n), "it's": rng.normal(size=n),
                  "label": rng.integers(0, 2, n)}).to_csv(tmp_path / "f.csv", index=False)
    proposal = propose_schema(tmp_path / "f.csv")
    (tmp_path / "s.yaml").write_text(proposal.to_yaml())
    schema = load_schema(tmp_path / "s.yaml")
    assert schema == proposal.schema()
    assert set(schema.categorical) == {"2019", "on", "my col"} and schema.numeric == ("it's",)
    ds = load_dataset(DataConfig(name="file", path=str(tmp_path / "f.csv"),
                                 schema_path=str(tmp_path / "s.yaml")), tmp_path / "cache")
    assert ds.spec.n_categorical == 3 and ds.spec.n_numeric == 1


def test_stable_buckets_of_mixed_objects_hash_their_text() -> None:
    from trainers.data import stable_buckets

    mixed = np.array(["7", 7, 7.5, "x"], dtype=object)
    as_text = np.array(["7", "7", "7.5", "x"], dtype=object)
    assert stable_buckets(mixed, 97).tolist() == stable_buckets(as_text, 97).tolist()
