"""`recscale train`: a config YAML in, a trained, scored, saved and logged model out;
bad input is one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from trainers.data import DataConfig, load_dataset
from trainers.experiment import ConfigError, ExperimentConfig, load_experiment
from trainers.full import load_model, predict

CONFIG = {
    "model": {"block": "wukong", "d_model": 16, "n_tokens": 4, "n_layers": 2, "embed_dim": 8,
              "wukong": {"n_fm": 2, "n_lc": 2, "k": 4, "mlp_hidden": 32}},
    "train": {"lr": 0.003, "batch_size": 128, "epochs": 1.0, "eval_every": 1000},
    "data": {"name": "synthetic", "synthetic": {"n_rows": 3000, "n_cat_fields": 5, "cardinality": 20}},
}


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RECSCALE_CACHE": str(tmp / "cache")}
    return subprocess.run([sys.executable, "-m", "recscale", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp)


def _main(args: list[str], tmp: Path, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """The command in-process (the console script's own ``main``): no interpreter start-up."""
    from recscale.cli import main

    monkeypatch.setenv("RECSCALE_CACHE", str(tmp / "cache"))
    monkeypatch.chdir(tmp)
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_logs_scores_and_saves_a_loadable_model(tmp_path) -> None:
    """The real console entry point, as a person runs it."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _run(["train", str(cfg), "-o", str(tmp_path / "out"), "--tracking-uri", uri,
                 "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_auc" in proc.stdout
    model_dir = tmp_path / "out" / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    model = load_model(model_dir)
    ds = load_dataset(DataConfig(**CONFIG["data"]), cache_dir=tmp_path / "cache")
    p = predict(model, ds.test.cat, ds.test.num)
    assert p.shape == (len(ds.test),) and ((p > 0) & (p < 1)).all()
    ll = torch.nn.functional.binary_cross_entropy(p, ds.test.label).item()
    assert ll == pytest.approx(metrics["test_logloss"], rel=1e-4)  # the saved model is the scored one
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("recscale-train")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["model.block"] == "wukong"
    assert run.data.metrics["test_auc"] == pytest.approx(metrics["test_auc"])
    assert len(client.get_metric_history(run.info.run_id, "val_logloss")) >= 2
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {
        "model/weights.pt", "model/config.yaml", "model/spec.json"}
    assert load_experiment(model_dir / "config.yaml") == ExperimentConfig(**CONFIG)


@pytest.mark.parametrize(("text", "needle"), [
    ("model: {block: wukong\n", "malformed YAML"),
    ("model: {block: perceiver}\n", "unknown block family 'perceiver'"),
    ("model: {block: wukong, d_modle: 3}\n", "d_modle"),
    ("model: {block: tokenmixer, d_model: 30, n_tokens: 4}\ndata: {name: synthetic, synthetic: {n_rows: 500}}\n",
     "d_model=30 must be divisible"),
    ("model: {block: wukong}\ntrain: {lr: -1}\n", "train.lr"),
])
def test_bad_configs_are_one_line(tmp_path, capsys, monkeypatch, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, out, err = _main(["train", str(cfg), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                            "--no-progress"], tmp_path, capsys, monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("recscale: error:") and needle in lines[0], lines
    assert not (tmp_path / "m.db").exists(), "nothing may be logged for a config that is refused"


def test_bad_data_file_is_one_line_naming_the_column(tmp_path, capsys, monkeypatch) -> None:
    data = tmp_path / "clicks.csv"
    data.write_text("user,item,clicked\n1,2,0\n3,4,2\n5,6,1\n")
    schema = tmp_path / "schema.yaml"
    schema.write_text("label: clicked\ncategorical: [user, item]\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"block": "wukong"},
                                   "data": {"name": "file", "path": str(data), "schema_path": str(schema)}}))
    code, _, err = _main(["train", str(cfg), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                          "--no-progress"], tmp_path, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "clicks.csv" in lines[0] and "clicked" in lines[0]


def test_load_experiment_errors_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_experiment(tmp_path / "absent.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_experiment(f)


def test_train_keeps_the_best_checkpoint_and_says_where_it_stopped(
        tmp_path, capsys, monkeypatch) -> None:
    """Early stopping: the saved and tested model is the best evaluation's; the output,
    metrics.json and the MLflow run say where training stopped and where the best was."""
    from trainers.contracts import (
        BEST_PREFIX,
        OBJECTIVE,
        STOPPED_PREFIX,
        TAG_BEST_AT,
        TAG_STOPPED_AT,
    )
    from trainers.loop import evaluate

    cfg = {**CONFIG, "train": {"lr": 0.05, "batch_size": 128, "epochs": 30.0, "eval_every": 500,
                               "early_stopping_patience": 2}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, out, err = _main(["train", str(path), "-o", str(tmp_path / "out"), "--tracking-uri", uri,
                            "--no-progress"], tmp_path, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    metrics = json.loads((tmp_path / "out" / "model" / "metrics.json").read_text())
    assert metrics["status"] == "stopped" and metrics["early_stopped"] is True
    best, stopped = metrics["best_at"], metrics["stopped_at"]
    assert best["examples_seen"] < stopped["examples_seen"] < 30 * 2400
    assert stopped["epoch"] == pytest.approx(stopped["examples_seen"] / 2400)
    assert best[OBJECTIVE] <= stopped[OBJECTIVE] and metrics[OBJECTIVE] == best[OBJECTIVE]
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"stopped at {stopped['examples_seen']:.0f} examples")
    assert "early stopping" in line and f"best (saved, tested) at {best['examples_seen']:.0f}" in line
    # the saved weights are the best evaluation's
    ds = load_dataset(DataConfig(**CONFIG["data"]), cache_dir=tmp_path / "cache")
    model = load_model(tmp_path / "out" / "model")
    assert evaluate(model, ds.val, 0.5)[OBJECTIVE] == pytest.approx(best[OBJECTIVE], rel=1e-5)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("recscale-train").experiment_id])
    assert run.data.tags["trial_status"] == "STOPPED"
    assert run.data.metrics[f"{BEST_PREFIX}examples_seen"] == best["examples_seen"]
    assert run.data.metrics[f"{STOPPED_PREFIX}examples_seen"] == stopped["examples_seen"]
    assert run.data.metrics[f"{BEST_PREFIX}{OBJECTIVE}"] == pytest.approx(best[OBJECTIVE])
    assert run.data.tags[TAG_BEST_AT].startswith(f"{best['examples_seen']:.0f} examples")
    assert "early stopping" in run.data.tags[TAG_STOPPED_AT]


def test_resumed_train_keeps_the_best_weights(tmp_path, monkeypatch) -> None:
    """An interrupted ``recscale train --resume`` continues from its checkpoint, which
    carries the best weights so far: the result equals an uninterrupted run's."""
    from trainers.full import CHECKPOINT, train_full

    exp = ExperimentConfig(**{**CONFIG, "train": {"lr": 0.05, "batch_size": 128, "epochs": 12.0,
                                                   "eval_every": 1200}})
    ds = load_dataset(exp.data, cache_dir=tmp_path / "cache")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole = train_full(exp, tmp_path / "whole", tracking_uri=uri, progress=False, dataset=ds)
    # interrupted after the best evaluation, so the resumed run must carry its weights
    cut = whole.best_at["examples_seen"] + 1
    assert cut < whole.stopped_at["examples_seen"], whole.best_at

    class Stop(Exception):
        pass

    import trainers.full as full

    real = full.train

    def interrupted(*args, **kwargs):
        report = kwargs["report"]

        def stop_late(metrics, state):
            report(metrics, state)
            if metrics["examples_seen"] >= cut:
                raise Stop
            return False

        return real(*args, **{**kwargs, "report": stop_late})

    monkeypatch.setattr(full, "train", interrupted)
    with pytest.raises(Stop):
        train_full(exp, tmp_path / "cut", tracking_uri=uri, progress=False, dataset=ds)
    monkeypatch.setattr(full, "train", real)
    assert (tmp_path / "cut" / CHECKPOINT).exists()
    resumed = train_full(exp, tmp_path / "cut", tracking_uri=uri, progress=False, dataset=ds,
                         resume=True)
    assert resumed.best_at == whole.best_at and resumed.stopped_at == whole.stopped_at
    assert resumed.test == whole.test
