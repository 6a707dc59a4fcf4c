"""Sequence length as a search knob: histories through Ray's object store, serving with
histories, the command line, and a search -> analyze -> export -> train round trip on a
small user file with user, item and time columns (built here; nothing is downloaded)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spaces import ModelConfig
from trainers.data import DataConfig, load_dataset

SPACE = """\
name: seq-tiny
description: attention with and without an 8-step history (a test space).
families: [attention]
model:
  seq_len: {choice: [0, 8]}
  n_layers: 1
  d_model: 16
  n_tokens: 4
  embed_dim: 8
  tokenizer: grouped
  pooling: mean
  head_hidden: [16]
blocks:
  attention:
    kind: {choice: [softmax, hstu]}
    n_heads: 2
    ffn_mult: 1
    partitions: 1
    temperature: fixed
train:
  lr: {float: [3.0e-3, 1.0e-2], log: true}
  batch_size: 256
  optimizer: adamw_split
  embedding_lr: 1.0e-2
"""


def sticky_interactions(users: int = 60, per_user: int = 40, items: int = 50,
                        seed: int = 0) -> pd.DataFrame:
    """Each user's label repeats their previous one with probability 0.9 (a mood that
    drifts over time): only a history can see it, the user id alone cannot."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        y = int(rng.integers(0, 2))
        for t in range(per_user):
            y = y if rng.random() < 0.9 else 1 - y
            rows.append((f"u{u}", f"i{rng.integers(0, items)}", 1_000 * t + u, y))
    return pd.DataFrame(rows, columns=["user", "item", "ts", "y"])


def write_user_file(tmp: Path) -> tuple[Path, Path]:
    sticky_interactions().to_csv(tmp / "d.csv", index=False)
    (tmp / "s.yaml").write_text(json.dumps({"label": "y", "categorical": ["user", "item"],
                                            "timestamp": "ts", "user": "user", "item": "item"}))
    return tmp / "d.csv", tmp / "s.yaml"


def data_config(tmp: Path, sequences: bool = True) -> DataConfig:
    data, schema = write_user_file(tmp)
    return DataConfig(name="file", path=str(data), schema_path=str(schema),
                      split="user_temporal", sequences=sequences)


def test_shared_dataset_carries_the_histories(tmp_path: Path) -> None:
    """What a trial rebuilds from the object-store arrays gathers the same histories as
    the dataset, for every K; a history-free dataset ships exactly the old arrays."""
    from search.trainable import _view, share_dataset

    ds = load_dataset(data_config(tmp_path), cache_dir=tmp_path / "cache")
    shared = share_dataset(ds)
    assert set(shared) == {"spec", "train", "val", "events"}
    for name in ("train", "val"):
        view = _view(shared[name], shared["events"])
        split = getattr(ds, name)
        assert view.history is not None and split.history is not None
        assert len(view) == len(split)
        idx = torch.arange(len(split))
        for k in (1, 8, 33):
            assert torch.equal(view.history.gather(idx, k), split.history.gather(idx, k))
    # the event table is shipped once and shared by both splits' views, not copied
    assert shared["events"]["item"].nbytes == ds.train.history.events.item.numel() * 4
    # without the event table (a caller that never reads histories) the view is history-free
    assert _view(shared["train"]).history is None

    (tmp_path / "plain").mkdir()
    plain = share_dataset(load_dataset(data_config(tmp_path / "plain", sequences=False),
                                       cache_dir=tmp_path / "cache"))
    assert set(plain) == {"spec", "train", "val"}
    assert set(plain["train"]) == {"cat", "num", "label"}
    assert _view(plain["train"]).history is None


def test_predict_serves_history_models(tmp_path: Path) -> None:
    """``trainers.full.predict`` takes the examples' histories; without them a history
    model says what it needs; a history-free model is served as before."""
    from spaces import build_model
    from trainers.full import predict
    from trainers.loop import predict_logits

    ds = load_dataset(data_config(tmp_path), cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model(ModelConfig(block="attention", n_layers=1, d_model=16, n_tokens=4,
                                    embed_dim=8, seq_len=8), ds.spec)
    test = ds.test
    p = predict(model, test.cat, test.num, test.history)
    assert p.shape == (len(test),) and bool(((p > 0) & (p < 1)).all())
    assert torch.allclose(p, torch.sigmoid(predict_logits(model, test)))
    with pytest.raises(ValueError, match="sequences=True"):
        predict(model, test.cat, test.num)
    with pytest.raises(ValueError, match="histories for"):
        predict(model, test.cat[:3], test.num[:3], test.history)
    plain = build_model(ModelConfig(block="attention", n_layers=1, d_model=16, n_tokens=4,
                                    embed_dim=8), ds.spec)
    assert torch.equal(predict(plain, test.cat, test.num),
                       predict(plain, test.cat, test.num, test.history))


def test_cli_turns_on_sequences_and_the_user_temporal_split(tmp_path: Path) -> None:
    from recscale.cli import build_parser
    from recscale.commands import _data_config

    data, schema = write_user_file(tmp_path)
    args = build_parser().parse_args(["search", "--data", str(data), "--schema", str(schema),
                                      "--split", "user_temporal", "--sequences",
                                      "--budget-flops", "1e9"])
    cfg = _data_config(args)
    assert cfg.split == "user_temporal" and cfg.sequences is True
    plain = _data_config(build_parser().parse_args(["search", "--budget-flops", "1e9"]))
    assert plain.sequences is False and "sequences" not in plain.model_dump()


@pytest.mark.slow
def test_search_with_k_as_a_knob_round_trips(tmp_path: Path) -> None:
    """`recscale search` over a space with ``model.seq_len`` in {0, 8} on a user file with
    ``--split user_temporal --sequences``: trials with histories train in Ray, the
    references (history-free) too; analyze, export and train the exported best.yaml."""
    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from recscale.cli import main
    from trainers.contracts import OBJECTIVE

    data, schema = write_user_file(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must be short
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp,
             logging_level="ERROR", log_to_driver=False)
    try:
        rc = main(["search", "--space", str(space), "--data", str(data), "--schema", str(schema),
                   "--split", "user_temporal", "--sequences", "--budget-flops", "4e9",
                   "--trial-flops", "5e8", "--scheduler", "fifo", "--searcher", "random",
                   "--name", "seqs", "--tracking-uri", uri, "--storage", str(tmp_path / "st"),
                   "--max-concurrent", "2", "-v", "0"])
    finally:
        ray.shutdown()
    assert rc == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("seqs")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_k: dict[str, list[float]] = {}
    for r in runs:
        if "model.seq_len" in r.data.params and OBJECTIVE in r.data.metrics:
            by_k.setdefault(r.data.params["model.seq_len"], []).append(r.data.metrics[OBJECTIVE])
    assert "8" in by_k, by_k  # trials with histories trained and reported
    assert all(math.isfinite(v) for vs in by_k.values() for v in vs)

    assert main(["analyze", "seqs", "--tracking-uri", uri, "-o", str(tmp_path / "rep")]) == 0
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert "sequence_length" in summary
    best = tmp_path / "best.yaml"
    assert main(["export", "seqs", "--tracking-uri", uri, "-o", str(best), "--force"]) == 0
    exported = yaml.safe_load(best.read_text())
    assert exported["data"]["sequences"] is True and exported["data"]["split"] == "user_temporal"
    exported["train"]["epochs"] = 1  # a short run: the round trip, not the quality
    best.write_text(yaml.safe_dump(exported))
    assert main(["train", str(best), "-o", str(tmp_path / "model"), "--tracking-uri", uri,
                 "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "model" / "model" / "metrics.json").read_text())
    assert 0.0 < metrics["test_auc"] <= 1.0


def _seq_trials() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nine trials: K in {0, 16, 64}; a longer history costs more FLOPs per example and
    (planted) helps at equal cost; one diverged trial with the lowest loss."""
    rows, hist = [], []
    for i, (k, fpe, loss) in enumerate([
            (0, 1.0e4, 0.60), (0, 3.0e4, 0.58), (0, 1.2e5, 0.575),
            (16, 1.2e4, 0.55), (16, 3.5e4, 0.54), (16, 1.5e5, 0.535),
            (64, 3.2e4, 0.53), (64, 1.3e5, 0.52), (64, 1.4e5, 0.10)]):
        run = f"r{i}"
        row = {"run_id": run, "trial_id": f"t{i}", "block": "attention",
               "status": "DIVERGED" if loss < 0.2 else "FINISHED", "val_logloss": loss,
               "val_auc": 1.2 - loss, "flops_per_example": fpe, "params_dense": fpe / 2,
               "train_flops": 3 * fpe * 1e4, "examples_seen": 1e4, "model.block": "attention"}
        if k:  # a history-free config does not log the knob
            row["model.seq_len"] = k
        rows.append(row)
        for j in (1, 2):
            hist.append({"run_id": run, "step": j * 1.5 * fpe * 1e4,
                         "train_flops": j * 1.5 * fpe * 1e4, "examples_seen": j * 5e3,
                         "val_logloss": loss + 0.05 * (2 - j), "flops_per_example": fpe})
    return pd.DataFrame(rows), pd.DataFrame(hist)


def test_loss_vs_k_at_equal_flops(tmp_path: Path) -> None:
    """The analysis reads K from the trials: best per K, the comparison in bands of
    FLOPs per example, a figure and an HTML section; a history-free search has none."""
    from analysis.report import build_report, sequence_length
    from analysis.runs import runs_from_frames

    trials, hist = _seq_trials()
    runs = runs_from_frames(trials, hist, "seq")
    seq = sequence_length(runs)
    assert seq is not None
    by_k = {r["seq_len"]: r for r in seq["by_seq_len"]}
    assert sorted(by_k) == [0, 16, 64]
    assert [by_k[k]["trials"] for k in (0, 16, 64)] == [3, 3, 2]  # the diverged one left out
    assert by_k[0]["val_logloss"] == 0.575 and by_k[0]["flops_per_example"] == 1.2e5
    assert by_k[64]["val_logloss"] == 0.52 and by_k[64]["trial_id"] == "t7"
    assert seq["best_seq_len"] == 64
    bands = {round(b["flops_per_example"][0]): b for b in seq["equal_flops"]}
    # half-decade bands: [1e4, 3.16e4) holds K=0 and 16 (the K=64 trial at 3.2e4 is above)
    assert bands[10_000]["best_val_logloss"] == {"0": 0.58, "16": 0.55}
    assert bands[31_623]["best_val_logloss"] == {"16": 0.54, "64": 0.53}
    assert bands[100_000]["best_val_logloss"] == {"0": 0.575, "16": 0.535, "64": 0.52}
    assert all(b["best_seq_len"] == max(int(k) for k in b["best_val_logloss"])
               for b in seq["equal_flops"])

    res = build_report(runs, tmp_path / "rep", n_boot=0)
    assert res.summary["sequence_length"]["best_seq_len"] == 64
    assert (tmp_path / "rep" / "loss_vs_seq_len.png").stat().st_size > 10_000
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "History length K" in page and "K=64" in page

    plain = runs_from_frames(trials.drop(columns=["model.seq_len"]), hist, "plain")
    assert sequence_length(plain) is None
    res = build_report(plain, tmp_path / "plain", n_boot=0)
    assert "sequence_length" not in res.summary
    assert not (tmp_path / "plain" / "loss_vs_seq_len.png").exists()


def test_evaluation_batches_shrink_with_long_histories(tmp_path: Path) -> None:
    """Evaluation memory does not grow with K: the batch shrinks as 16/K beyond K = 16,
    and the logits do not depend on the batch."""
    from spaces import build_model
    from trainers.loop import predict_logits
    from trainers.sequences import eval_batch_size

    ds = load_dataset(data_config(tmp_path), cache_dir=tmp_path / "cache")
    sizes = {}
    for k in (0, 16, 64, 256):
        cfg = ModelConfig(block="attention", n_layers=1, d_model=16, n_tokens=4, embed_dim=8,
                          seq_len=k)
        sizes[k] = eval_batch_size(build_model(cfg, ds.spec), 8192)
    assert sizes == {0: 8192, 16: 8192, 64: 2048, 256: 512}
    torch.manual_seed(0)
    model = build_model(ModelConfig(block="attention", n_layers=1, d_model=16, n_tokens=4,
                                    embed_dim=8, seq_len=64), ds.spec)
    assert torch.allclose(predict_logits(model, ds.val), predict_logits(model, ds.val, 7),
                          atol=1e-5)


def _seq_study(tmp: Path, **over: object) -> object:
    from search.study import StudyConfig, ladder

    fields: dict[str, object] = dict(
        name="k-sweep", data=data_config(tmp), families=("attention",), seq_lens=(0, 8),
        budgets=ladder(6e7, 2, 2.0), sizes=3, span=4.0, center_ratio=0.2,
        widths=(4, 8, 16, 32), depths=(1,),
        model={"n_tokens": 4, "embed_dim": 8, "head_hidden": [8], "tokenizer": "grouped",
               "pooling": "mean", "attention": {"kind": "hstu", "n_heads": 1}},
        train={"batch_size": 32, "lr": 3e-3, "optimizer": "adamw_split", "embedding_lr": 1e-2},
        min_steps=5, eval_max_examples=200, max_concurrent=2)
    fields.update(over)
    return StudyConfig(**fields)  # type: ignore[arg-type]


def test_a_study_plans_one_series_per_history_length(tmp_path: Path) -> None:
    from search.study import StudyError, plan_study, split_series, study_config

    cfg = _seq_study(tmp_path)
    ds = load_dataset(cfg.data, cache_dir=tmp_path / "c")  # type: ignore[attr-defined]
    points = plan_study(cfg, ds.spec, len(ds.train))  # type: ignore[arg-type]
    series = sorted({p.family for p in points})
    assert series == ["attention@K=0", "attention@K=8"]
    for p in points:
        family, k = split_series(p.family)
        assert family == p.flat["model.block"] == "attention"
        assert p.flat.get("model.seq_len", 0) == k
        assert p.key.startswith(p.family + "/")
    # at one width, the history's tokens cost FLOPs: K = 8 has the larger N
    n_by = {(p.family, p.flat["model.d_model"]): p.N for p in points}
    shared = [w for (f, w) in n_by if f == "attention@K=0" and ("attention@K=8", w) in n_by]
    assert shared and all(n_by["attention@K=8", w] > n_by["attention@K=0", w] for w in shared)
    with pytest.raises(StudyError, match="load the data with sequences"):
        study_config(name="x", budgets=(1e9, 4e9), families=("attention",), seq_lens=(0, 16))
    with pytest.raises(StudyError, match="distinct history lengths"):
        study_config(name="x", budgets=(1e9, 4e9), seq_lens=(0, 0))


def test_scale_cli_sweeps_k_on_a_user_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from recscale.cmd_study import _config, add_parsers
    from trainers.contracts import UserError

    data, schema = write_user_file(tmp_path)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="cmd"))
    base = ["scale", "--name", "s", "--budgets", "1e9,4e9", "--data", str(data)]
    cfg = _config(parser.parse_args([*base, "--schema", str(schema), "--seq-lens", "16,0,64",
                                     "--split", "user_temporal", "--families", "attention"]))
    assert cfg.seq_lens == (0, 16, 64) and cfg.data.sequences is True
    assert cfg.data.split == "user_temporal" and cfg.data.name == "file"
    # recorded absolute (verify runs from anywhere), whatever directory the study ran in
    monkeypatch.chdir(tmp_path)
    rel = _config(parser.parse_args(["scale", "--name", "s", "--budgets", "1e9,4e9", "--data",
                                     data.name, "--schema", schema.name]))
    assert rel.data.path == str(data.resolve()) and rel.data.schema_path == str(schema.resolve())
    assert cfg.series() == ("attention@K=0", "attention@K=16", "attention@K=64")
    with pytest.raises(UserError, match="needs --schema"):
        _config(parser.parse_args(base))
    with pytest.raises(UserError, match="integers >= 0"):
        _config(parser.parse_args([*base, "--schema", str(schema), "--seq-lens=-1,8"]))
    plain = _config(parser.parse_args(["scale", "--name", "s", "--budgets", "1e9,4e9"]))
    assert plain.seq_lens == () and plain.data.sequences is False


@pytest.mark.slow
def test_a_k_sweep_study_runs_end_to_end(tmp_path: Path) -> None:
    """A real (tiny) isoFLOP study over K in {0, 8} through Ray Tune and MLflow: every
    point trains with its history, logs model.seq_len, and the fit has one series per K."""
    import ray
    from mlflow.tracking import MlflowClient

    from analysis.isoflop import analyze_study
    from search.study import load_study, run_study
    from trainers.contracts import TAG_BLOCK

    cfg = _seq_study(tmp_path)
    ds = load_dataset(cfg.data, cache_dir=tmp_path / "c")  # type: ignore[attr-defined]
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    try:
        out = run_study(cfg, tracking_uri=uri, storage=tmp_path / "ray", dataset=ds)  # type: ignore[arg-type]
    finally:
        ray.shutdown()
    assert len(out.results) == 12 and (out.results["error"] == "").all(), out.results
    rec = load_study("k-sweep", uri)
    assert len(rec.points) == 12 and set(rec.points["family"]) == {"attention@K=0",
                                                                   "attention@K=8"}
    assert rec.points["loss"].map(math.isfinite).all()
    client = MlflowClient(uri)
    for run_id, fam in zip(rec.points["run_id"], rec.points["family"], strict=True):
        run = client.get_run(run_id)
        assert run.data.params.get("model.seq_len", "0") == fam.rsplit("=", 1)[1]
        assert run.data.tags[TAG_BLOCK] == "attention"  # the block, not the series
    fit = analyze_study(rec.points, n_train=rec.n_train, n_boot=20)
    assert set(fit.families) == {"attention@K=0", "attention@K=8"}
