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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spaces import FeatureSpec, RecModel, build_model, model_cost
from trainers.contracts import (
    BEST_PREFIX,
    KIND_TRAIN,
    OBJECTIVE,
    STEP_AXIS,
    STOPPED_PREFIX,
    TAG_BEST_AT,
    TAG_BLOCK,
    TAG_DATA_FINGERPRINT,
    TAG_KIND,
    TAG_STATUS,
    TAG_STOPPED_AT,
    default_tracking_uri,
)
from trainers.data import EncodedDataset, load_dataset
from trainers.experiment import ExperimentConfig, load_experiment
from trainers.loop import TrainResult, evaluate, predict_logits, train
from trainers.sequences import Histories

__all__ = ["FullRunResult", "describe_where", "load_model", "predict", "train_full"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class FullRunResult:
    """What ``recscale train`` did.

    ``val``: the validation metrics of the saved model (the best evaluation's);
    ``test``: its test metrics; ``best_at`` / ``stopped_at``: where the best evaluation
    was and where training stopped, each as ``examples_seen``, ``epoch`` (passes over the
    training split) and ``val_logloss``; ``last``: the last evaluation's metrics.
    """

    status: str
    val: dict[str, float]
    test: dict[str, float]
    model_dir: Path
    run_id: str | None
    seconds: float
    best_at: dict[str, float] = field(default_factory=dict)
    stopped_at: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    message: str = ""


def _where(metrics: dict[str, float], n_train: int) -> dict[str, float]:
    """``examples_seen``, ``epoch`` and ``val_logloss`` of one evaluation."""
    seen = float(metrics.get("examples_seen", 0.0))
    return {"examples_seen": seen, "epoch": seen / max(n_train, 1),
            OBJECTIVE: float(metrics.get(OBJECTIVE, float("nan")))}


def describe_where(where: dict[str, float]) -> str:
    """``"12800 examples (epoch 1.60), val_logloss 0.5123"``."""
    return (f"{where['examples_seen']:.0f} examples (epoch {where['epoch']:.2f}), "
            f"{OBJECTIVE} {where[OBJECTIVE]:.4f}")


def save_model(model: RecModel, exp: ExperimentConfig, out: Path, metrics: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    exp.to_yaml(out / "config.yaml")
    (out / "spec.json").write_text(json.dumps(model.spec.to_dict()))
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_model(model_dir: str | os.PathLike[str]) -> RecModel:
    """Rebuild a saved model from its directory (safe: no unpickling)."""
    d = Path(model_dir)
    exp = load_experiment(d / "config.yaml")
    raw = json.loads((d / "spec.json").read_text())
    spec = FeatureSpec.from_dict(raw)
    model = build_model(exp.model, spec)
    model.load_state_dict(torch.load(d / "weights.pt", weights_only=True, map_location="cpu"))
    model.eval()
    return model


def predict(model: RecModel, cat: torch.Tensor, num: torch.Tensor,
            history: Histories | None = None) -> torch.Tensor:
    """Click probabilities for encoded examples ``cat (N, F_cat)``, ``num (N, F_num)``.

    A model that reads behaviour histories (``seq_len > 0``) also needs the examples'
    ``history`` (offsets into an event table, e.g. ``dataset.test.history`` of a
    dataset loaded with ``sequences=True``); a history-free model ignores it.

    Raises:
        ValueError: the model reads histories and none were given, or their count is
            not the examples'.
    """
    if history is not None and len(history) != len(cat):
        raise ValueError(f"{len(cat)} examples but histories for {len(history)}")

    class _Split:
        def __init__(self) -> None:
            self.cat, self.num, self.label = cat, num, torch.zeros(len(cat))
            self.history = history

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
    """Train ``exp``, keep the weights of its best evaluation (lowest validation log
    loss), score them on the test split, log to MLflow, save them.

    Training ends at the config's length, at ``train.stop_after_examples``, or earlier by
    early stopping (``train.early_stopping_patience``). The saved and tested model is
    the best evaluation's, which may be earlier than where training stopped: the result,
    ``metrics.json`` (``best_at``, ``stopped_at``), the MLflow run (metrics
    ``best.*`` and ``stopped.*``, tags ``recscale.best_at`` / ``recscale.stopped_at``)
    and the command's output say both. With ``resume``, an interrupted run continues from
    its last evaluation's state (the best weights so far included).
    """
    from tqdm import tqdm

    from trainers.tracking import RunWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else load_dataset(exp.data)
    model_cost(exp.model, ds.spec)  # a config that cannot be built fails before any run exists
    total = exp.train.total_examples(len(ds.train))
    state_path = out / CHECKPOINT
    # the device a search trial trains on (search.trainable), so a trial's record reproduces
    device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
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
                                    report=report, resume=resume_state, on_step=on_step,
                                    device=device, keep_best=True)
    except BaseException:
        run.end("KILLED")
        raise
    finally:
        bar.close()
    model = result.model
    if result.best_state is not None:  # the saved and tested model: the best evaluation's
        model.load_state_dict(result.best_state)
    val = result.best or result.metrics
    n_train = len(ds.train)
    best_at, stopped_at = _where(val, n_train), _where(result.metrics, n_train)
    base_rate = float(ds.train.label.float().mean())
    test = evaluate(model, ds.test, base_rate, prefix="test")
    step = int(result.metrics.get(STEP_AXIS, 0))
    run.log(test, step=step)
    run.log({**{f"{BEST_PREFIX}{k}": v for k, v in {**val, **best_at}.items()},
             **{f"{STOPPED_PREFIX}{k}": v for k, v in stopped_at.items()}}, step=step)
    run.set_tag(TAG_STATUS, result.status.upper())
    run.set_tag(TAG_BEST_AT, describe_where(best_at))
    run.set_tag(TAG_STOPPED_AT, describe_where(stopped_at)
                + (f"; {result.message}" if result.message else ""))
    metrics = {**val, **test, "status": result.status, "best_at": best_at,
               "stopped_at": stopped_at, "early_stopped": result.early_stopped,
               "message": result.message}
    save_model(model, exp, out / "model", metrics)
    run.log_artifacts(out / "model", artifact_path="model")
    run.end("FINISHED")
    state_path.unlink(missing_ok=True)
    return FullRunResult(result.status, val, test, out / "model", run.run_id,
                         time.perf_counter() - t0, best_at, stopped_at, result.metrics,
                         result.message)


def train_file(path: str | os.PathLike[str], **kwargs: Any) -> FullRunResult:
    """``train_full`` on an experiment YAML (the ``recscale train`` entry point)."""
    return train_full(load_experiment(Path(path)), **kwargs)
