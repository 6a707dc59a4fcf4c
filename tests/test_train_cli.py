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
