"""Behaviour sequences in the data layer: histories strictly before each example (no
leakage, ties excluded), the per-user temporal split, K-free storage, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trainers.data import DataConfig, DataError, load_dataset
from trainers.sequences import gap_buckets, model_inputs, user_temporal_split


def interactions(n: int = 3_000, users: int = 40, items: int = 120, seed: int = 0) -> pd.DataFrame:
    """Random interactions with many equal timestamps (coarse clock) per user."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "user": rng.integers(0, users, n).astype(str),
        "item": ("i" + pd.Series(rng.integers(0, items, n)).astype(str)).to_numpy(),
        "genre": rng.integers(0, 5, n).astype(str),
        "ts": rng.integers(0, 300, n) * 60,  # ~10 events per (user, minute) bucket collide
        "y": rng.integers(0, 2, n),
    })


def config(tmp: Path, frame: pd.DataFrame, split: str = "user_temporal", sequences: bool = True,
           **schema: object) -> DataConfig:
    frame.to_csv(tmp / "d.csv", index=False)
    keys = {"label": "y", "categorical": ["user", "item", "genre"], "timestamp": "ts",
            "user": "user", "item": "item", **schema}
    (tmp / "s.yaml").write_text(json.dumps({k: v for k, v in keys.items() if v is not None}))
    return DataConfig(name="file", path=str(tmp / "d.csv"), schema_path=str(tmp / "s.yaml"),
                      split=split, sequences=sequences)  # type: ignore[arg-type]


@pytest.mark.parametrize("split", ["user_temporal", "random"])
def test_histories_equal_a_brute_force_of_strictly_earlier_events(tmp_path: Path, split: str) -> None:
    frame = interactions(n=1_200, users=15, items=30)  # every item and user is in train
    frame["row"] = np.arange(len(frame))
    ds = load_dataset(config(tmp_path, frame.drop(columns="row"), split=split),
                      cache_dir=tmp_path / "c")
    k = 12
    assert ds.spec.cardinalities[:2] == (16, 31)
    item_vocab = sorted(frame["item"].unique())  # ids 1..V in sorted order (min_count 1)
    # each encoded example is known by its user id and its own timestamp: the events of
    # that user strictly earlier, in time then row order, are its history
    seen = 0
    for name in ("train", "val", "test"):
        s = ds.split(name)
        h = s.history
        assert h is not None
        got = h.gather(torch.arange(len(s)), k)
        users = s.cat[:, 0]
        user_vocab = sorted(frame["user"].unique())
        for j in range(len(s)):
            user = user_vocab[int(users[j]) - 1]
            t = float(h.time[j])
            earlier = frame[(frame["user"] == user) & (frame["ts"] < t)].sort_values(
                ["ts", "row"], kind="stable")
            want = [(item_vocab.index(it) + 1, y + 1, int(t - ts)) for it, y, ts in
                    zip(earlier["item"], earlier["y"], earlier["ts"], strict=True)][-k:]
            steps = [(int(a), int(b), int(sec)) for a, b, _, sec in got[j].tolist() if b != 0]
            assert steps == want  # item, action and the gap in seconds
            seen += 1
    assert seen == len(frame)


def test_planted_future_interaction_and_ties_never_appear(tmp_path: Path) -> None:
    frame = interactions()
    last = frame["ts"].max()
    # a planted interaction at the latest time of user 7, with an item nobody else has,
    # and a tie: user 3's planted item at the same timestamp as other events of user 3
    t3 = int(frame.loc[frame["user"] == "3", "ts"].median())
    planted = pd.DataFrame({"user": ["7", "3"], "item": ["FUTURE", "TIE"], "genre": ["0", "0"],
                            "ts": [last + 60, t3], "y": [1, 1]})
    partner = pd.DataFrame({"user": ["3"], "item": ["i0"], "genre": ["1"], "ts": [t3], "y": [0]})
    frame = pd.concat([frame, planted, partner,
                       planted.assign(user=["8", "9"], ts=[last + 120] * 2)],
                      ignore_index=True)  # the items also in train elsewhere: not OOV
    cfg = config(tmp_path, frame, split="random")
    ds = load_dataset(cfg, cache_dir=tmp_path / "c")
    item_vocab = sorted(frame["item"].unique())
    future, tie = item_vocab.index("FUTURE") + 1, item_vocab.index("TIE") + 1
    user_vocab = sorted(frame["user"].unique())
    u3, u7 = user_vocab.index("3") + 1, user_vocab.index("7") + 1
    ties = 0
    for name in ("train", "val", "test"):
        s = ds.split(name)
        assert s.history is not None
        got = s.history.gather(torch.arange(len(s)), 4096)[..., 0]  # every earlier event
        assert not (got[s.cat[:, 0] == u7] == future).any()
        at_tie = (s.cat[:, 0] == u3) & (s.history.time == t3)
        ties += int(at_tie.sum())
        assert not (got[at_tie] == tie).any()  # same user, same time: excluded
        later = (s.cat[:, 0] == u3) & (s.history.time > t3)
        if later.any():  # and it is there for the user's later examples
            assert (got[later] == tie).any(dim=1).all()
    assert ties >= 2  # the planted row and its partner at the same time


def test_user_temporal_split_takes_each_users_latest() -> None:
    rng = np.random.default_rng(1)
    user = rng.integers(0, 30, 2_000)
    time = rng.permutation(2_000).astype(float)
    train, val, test = user_temporal_split(user, time, (0.8, 0.1, 0.1))
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(2_000))
    for u in range(30):
        tr, va, te = (time[p][user[p] == u] for p in (train, val, test))
        n = len(tr) + len(va) + len(te)
        assert len(te) == int(np.floor(n * 0.1 + 0.5)) and len(va) == int(np.floor(n * 0.1 + 0.5))
        assert tr.max() < va.min() <= va.max() < te.min()


def test_storage_is_independent_of_k_and_k0_is_todays_batches(tmp_path: Path) -> None:
    frame = interactions(n=4_000)
    with_seq = load_dataset(config(tmp_path, frame), cache_dir=tmp_path / "c")
    without = load_dataset(config(tmp_path, frame, sequences=False), cache_dir=tmp_path / "c")
    assert without.train.history is None and without.spec.sequence is None
    assert with_seq.fingerprint != without.fingerprint
    for name in ("train", "val", "test"):  # the same rows, ids and labels either way
        a, b = with_seq.split(name), without.split(name)
        assert torch.equal(a.cat, b.cat) and torch.equal(a.num, b.num)
        assert torch.equal(a.label, b.label)
    h = with_seq.train.history
    assert h is not None
    events = h.events
    assert len(events) == len(frame)
    assert events.nbytes == 13 * len(frame)  # int32 item + int8 action + float64 time
    assert h.nbytes == 24 * len(with_seq.train)  # two int64 offsets + a float64 time
    meta = with_seq.meta["sequences"]
    assert meta["event_table_bytes"] == events.nbytes and meta["events"] == len(frame)

    class Model(torch.nn.Module):
        seq_len = 0

    idx = torch.arange(64)
    model = Model()
    assert len(model_inputs(model, with_seq.train, idx, "cpu")) == 2  # K = 0: no history
    for k in (16, 256):  # a batch's histories exist for that batch only: B x K x 4
        model.seq_len = k
        cat, num, seq = model_inputs(model, with_seq.train, idx, "cpu")
        assert seq.shape == (64, k, 4) and torch.equal(cat, with_seq.train.cat[:64])
        assert events.nbytes == 13 * len(frame) and h.nbytes == 24 * len(with_seq.train)
    with pytest.raises(ValueError, match="sequences=True"):
        model_inputs(model, without.train, idx, "cpu")


def test_histories_survive_the_cache(tmp_path: Path) -> None:
    cfg = config(tmp_path, interactions(n=1_500))
    a = load_dataset(cfg, cache_dir=tmp_path / "c")
    b = load_dataset(cfg, cache_dir=tmp_path / "c")
    assert a.spec == b.spec and a.spec.sequence is not None
    assert b.train.history is not None and b.train.history.events is b.val.history.events  # type: ignore[union-attr]
    for name in ("train", "val", "test"):
        ha, hb = a.split(name).history, b.split(name).history
        assert ha is not None and hb is not None
        idx = torch.arange(len(ha))
        assert torch.equal(ha.gather(idx, 32), hb.gather(idx, 32))


def test_missing_columns_are_data_errors(tmp_path: Path) -> None:
    frame = interactions(n=600)
    with pytest.raises(DataError, match="needs user, item and time columns; missing: user"):
        load_dataset(config(tmp_path, frame, user=None, split="random"), cache_dir=tmp_path)
    with pytest.raises(DataError, match="missing: timestamp"):
        load_dataset(config(tmp_path, frame, timestamp=None, split="random"), cache_dir=tmp_path)
    with pytest.raises(DataError, match="schema key 'item': 'ts' is not a categorical column"):
        load_dataset(config(tmp_path, frame, item="ts"), cache_dir=tmp_path)
    with pytest.raises(DataError, match="split='user_temporal' needs"):
        load_dataset(config(tmp_path, frame, user=None, sequences=False), cache_dir=tmp_path)


def test_gap_buckets_are_log2_and_bounded() -> None:
    gaps = torch.tensor([0.0, 1.0, 3.0, 7.0, 1e12])
    assert gap_buckets(gaps).tolist() == [1, 2, 3, 4, 40]
