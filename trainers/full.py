"""Full training of one experiment config: ``recscale train CONFIG.yaml``.

Trains to completion with a progress bar, scores the test split (the only place test
metrics are computed), logs params, metrics and artifacts to MLflow, and saves a model
directory that loads back and predicts:

    model_dir/
      config.yaml     the experiment config (loads with ``load_experiment``)
      spec.json       the feature layout the model was built for
      weights.pt      ``state_dict`` only, loaded with ``torch.load(weights_only=True)``
      metrics.json    final validation and test metrics

No pickled Python objects are written or read, so loading a model directory someone
hands you executes no code from it (MLflow's PyTorch flavour would pickle the module).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from spaces import FeatureSpec, RecModel, build_model, model_cost
from trainers.contracts import (
    KIND_TRAIN,
    OBJECTIVE,
    STEP_AXIS,
    TAG_BLOCK,
    TAG_DATA_FINGERPRINT,
    TAG_KIND,
    TAG_STATUS,
    default_tracking_uri,
)
from trainers.data import EncodedDataset, load_dataset
from trainers.experiment import ExperimentConfig, load_experiment
from trainers.loop import TrainResult, evaluate, predict_logits, train

__all__ = ["FullRunResult", "load_model", "predict", "train_full"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class FullRunResult:
    status: str
    val: dict[str, float]
    test: dict[str, float]
    model_dir: Path
    run_id: str | None
    seconds: float


def save_model(model: RecModel, exp: ExperimentConfig, out: Path, metrics: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    exp.to_yaml(out / "config.yaml")
    (out / "spec.json").write_text(json.dumps(asdict(model.spec)))
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_model(model_dir: str | os.PathLike[str]) -> RecModel:
    """Rebuild a saved model from its directory (safe: no unpickling)."""
    d = Path(model_dir)
    exp = load_experiment(d / "config.yaml")
    raw = json.loads((d / "spec.json").read_text())
    spec = FeatureSpec(tuple(raw["cardinalities"]), raw["n_numeric"], tuple(raw["field_names"]))
    model = build_model(exp.model, spec)
    model.load_state_dict(torch.load(d / "weights.pt", weights_only=True, map_location="cpu"))
    model.eval()
    return model


def predict(model: RecModel, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
    """Click probabilities for encoded examples ``cat (N, F_cat)``, ``num (N, F_num)``."""

    class _Split:
        def __init__(self) -> None:
            self.cat, self.num, self.label = cat, num, torch.zeros(len(cat))

        def __len__(self) -> int:
            return len(self.cat)

    return torch.sigmoid(predict_logits(model, _Split()))


def train_full(
    exp: ExperimentConfig,
    out_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    experiment_name: str = "recscale-train",
    progress: bool = True,
    dataset: EncodedDataset | None = None,
    resume: bool = False,
) -> FullRunResult:
    """Train ``exp`` to completion, score the test split, log to MLflow, save the model."""
    from tqdm import tqdm

    from trainers.tracking import RunWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else load_dataset(exp.data)
    model_cost(exp.model, ds.spec)  # a config that cannot be built fails before any run exists
    total = exp.train.total_examples(len(ds.train))
    state_path = out / CHECKPOINT
    resume_state = torch.load(state_path, weights_only=True) if resume and state_path.exists() else None
    t0 = time.perf_counter()
    block = exp.model.block
    tags = {TAG_KIND: KIND_TRAIN, TAG_BLOCK: block, TAG_DATA_FINGERPRINT: ds.fingerprint}
    tags.update({f"provenance.{k}": str(v)[:5000] for k, v in exp.provenance.items()})
    run = RunWriter(default_tracking_uri(tracking_uri), experiment_name, f"train-{block}",
                    tags, exp.flat())
    bar = tqdm(total=total, unit="ex", unit_scale=True, disable=not progress,
               desc=f"train {block}", dynamic_ncols=True)
    if resume_state is not None:
        bar.update(int(resume_state["examples_seen"]))  # the loop's state key
    last = {"seen": bar.n}

    def on_step(seen: int, loss: float) -> None:
        bar.update(seen - last["seen"])
        last["seen"] = seen

    def report(metrics: dict[str, float], state: Any) -> bool:
        run.log(metrics, step=int(metrics[STEP_AXIS]))
        torch.save(state(), state_path)
        bar.set_postfix(val_auc=f"{metrics['val_auc']:.4f}",
                        val_logloss=f"{metrics[OBJECTIVE]:.4f}",
                        ex_s=f"{metrics['examples_per_s']:.0f}")
        return False

    try:
        result: TrainResult = train(exp.model, exp.train, ds.spec, ds.train, ds.val,
                                    report=report, resume=resume_state, on_step=on_step)
    except BaseException:
        run.end("KILLED")
        raise
    finally:
        bar.close()
    base_rate = float(ds.train.label.float().mean())
    test = evaluate(result.model, ds.test, base_rate, prefix="test")
    run.log(test, step=int(result.metrics.get(STEP_AXIS, 0)))
    run.set_tag(TAG_STATUS, result.status.upper())
    metrics = {**result.metrics, **test, "status": result.status}
    save_model(result.model, exp, out / "model", metrics)
    run.log_artifacts(out / "model", artifact_path="model")
    run.end("FINISHED")
    state_path.unlink(missing_ok=True)
    return FullRunResult(result.status, result.metrics, test, out / "model", run.run_id,
                         time.perf_counter() - t0)


def train_file(path: str | os.PathLike[str], **kwargs: Any) -> FullRunResult:
    """``train_full`` on an experiment YAML (the ``recscale train`` entry point)."""
    return train_full(load_experiment(Path(path)), **kwargs)
