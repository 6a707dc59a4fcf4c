"""One training loop for any (model config, training config, data tensors).

No Ray and no MLflow in here: the Ray trainable (``search``) and ``recscale train`` both
call :func:`train` with a ``report`` callback. Every ``eval_every`` examples the loop
evaluates on the validation split and calls ``report(metrics, state)``; the callback may
save ``state`` (a plain dict of tensors and numbers, loadable with
``torch.load(weights_only=True)``) and may return ``True`` to stop the run early.

Resume is exact: the epoch permutation comes from a generator seeded with
``(seed, epoch)``, and the state carries model, optimiser, RNG and position (and the best
evaluation so far, its weights and the early-stopping count), so a run resumed from a
state ends with the same weights and metrics as one never interrupted.

The loop tracks the evaluation with the lowest validation log loss (``keep_best`` keeps
its weights, which ``recscale train`` saves and tests) and stops early after
``early_stopping_patience`` evaluations without improvement. ``stop_after_examples`` ends
a run before the length its schedule is planned for, as ASHA ends a trial.

The metrics reported are exactly ``trainers.contracts.METRICS`` (ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from spaces import FeatureSpec, ModelConfig, RecModel, build_model
from trainers.contracts import OBJECTIVE
from trainers.placement import (
    BatchSource,
    PlacementMode,
    choose_placement,
    device_free_bytes,
    split_bytes,
)
from trainers.sequences import eval_batch_size, model_inputs

__all__ = [
    "Metrics",
    "ReportFn",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "evaluate_losses",
    "normalized_entropy",
    "train",
    "trial_train_config",
    "wsd_factor",
]

Metrics = dict[str, float]


class SplitLike(Protocol):
    """What the loop needs of a split: aligned ``cat``, ``num`` and ``label`` tensors."""

    @property
    def cat(self) -> torch.Tensor: ...
    @property
    def num(self) -> torch.Tensor: ...
    @property
    def label(self) -> torch.Tensor: ...
    def __len__(self) -> int: ...


class ReportFn(Protocol):
    def __call__(self, metrics: Metrics, state: Callable[[], dict[str, Any]]) -> bool | None: ...


class TrainConfig(BaseModel):
    """Typed training config (``train.*`` keys in Ray and MLflow).

    Attributes:
        lr: AdamW learning rate of the dense weights.
        optimizer: ``adamw`` (one group; embeddings without weight decay) or
            ``adamw_split`` (embeddings get their own ``embedding_lr``).
        embedding_lr: learning rate of the embedding tables under ``adamw_split``.
        weight_decay: AdamW decoupled weight decay of the dense weights.
        embedding_weight_decay: AdamW decoupled weight decay of the embedding tables
            (their own optimiser group, under either optimizer). Each step multiplies every
            row by ``1 − lr_emb · embedding_weight_decay``, so rows a value rarely
            refreshes (rare users and items) drift towards zero: a regulariser of the
            tables, which otherwise memorise the training split (0: none, the default).
        embedding_l2: an L2 penalty on the embedding rows each training batch looks up,
            added to the step's loss as ``embedding_l2 · Σ ‖row‖² / batch_size`` (a row
            counts once per look-up, so a frequent value is held back in proportion to
            how often it trains, as in matrix-factorisation practice). Element-wise
            work: the FLOPs accounting is unchanged; ``train_loss`` stays the log loss
            alone (0: none, the default).
        batch_size: examples per step.
        epochs: passes over the training split (used when ``max_examples`` is unset).
        max_examples: examples to train on in all; overrides ``epochs``.
        max_epochs: the planned length is at most this many passes over the training
            split, in whole batches (None: no cap). A search plans a trial's length in
            FLOPs (``max_examples``); a cheap model's share of the budget can be dozens
            of passes, which it spends overfitting, with its schedule's decay at the end
            of them. With this cap it is trained for the passes it is given, and leaves
            the rest of its FLOPs to other trials.
        eval_every: examples between evaluations (default: a quarter epoch).
        eval_max_examples: evaluate on at most this many validation examples.
        schedule: ``constant``, ``cosine`` decay of the learning rate to 0, or ``wsd``
            (warmup-stable-decay, see :func:`wsd_factor`): linear warmup over
            ``warmup_frac`` of the steps, constant, then a decay over the last
            ``decay_frac`` of the steps that ends at the run's last step, so the run is
            *trained for* its length rather than cut from a longer one.
        warmup_frac: share of the steps spent warming up (``wsd`` only).
        decay_frac: share of the steps spent decaying (``wsd`` only).
        decay_shape: ``linear`` (to 0) or ``sqrt`` (``1 − sqrt(progress)``) decay.
        grad_clip: max global gradient norm (None: no clipping).
        seed: seeds initialisation, shuffling and dropout.
        stop_after_examples: end the run after this many examples although its length
            (``max_examples`` / ``epochs``, which the learning-rate schedule and the
            blocks' progress are planned for) is longer: what a search trial that ASHA
            stopped early did, so an export reproduces it (None: run the whole length).
        early_stopping_patience: stop after this many evaluations in a row without
            the validation log loss improving on the best so far by more than
            ``min_delta`` (None: never stop early).
        min_delta: the improvement of the validation log loss that counts as one.
        precision: ``fp32`` (default) or ``bf16``: the training step's forward pass runs
            under ``torch.autocast(dtype=bfloat16)`` on the trial's device (matmuls in
            bfloat16, norms, softmax and the loss in float32; weights, gradients and the
            optimiser stay float32, so no loss scaling is needed). Evaluation stays
            float32, so the metrics of two precisions compare.
        placement: where the training split lives while training
            (``trainers.placement``): ``host`` (default: batches copied from ordinary
            host memory each step), ``resident`` (copied to the device once),
            ``pinned`` (page-locked host buffers, asynchronous copies) or ``auto``
            (``resident`` when it fits, else ``pinned``; ``host`` on a CPU). Placement
            changes speed only: the batches, and so the results, are the same.
        resident_max_fraction: ``auto`` keeps the split resident when it takes at most
            this share of the device's free memory at the start of the trial.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(1e-3, gt=0, le=1.0)
    optimizer: Literal["adamw", "adamw_split"] = "adamw"
    embedding_lr: float | None = Field(None, gt=0, le=10.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    embedding_weight_decay: float = Field(0.0, ge=0, le=10.0)
    embedding_l2: float = Field(0.0, ge=0, le=10.0)
    batch_size: int = Field(512, ge=1, le=1 << 20)
    epochs: float = Field(1.0, gt=0, le=1000)
    max_examples: int | None = Field(None, ge=1)
    max_epochs: float | None = Field(None, gt=0, le=1000)
    eval_every: int | None = Field(None, ge=1)
    eval_max_examples: int | None = Field(None, ge=1)
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_frac: float = Field(0.0, ge=0.0, lt=1.0)
    decay_frac: float = Field(0.2, gt=0.0, le=1.0)
    decay_shape: Literal["linear", "sqrt"] = "linear"
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    stop_after_examples: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    placement: PlacementMode = "host"
    resident_max_fraction: float = Field(0.25, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _phases(self) -> TrainConfig:
        if self.warmup_frac + self.decay_frac > 1.0 + 1e-9:
            raise ValueError(f"warmup_frac + decay_frac = {self.warmup_frac + self.decay_frac:.3g} "
                             "exceeds 1")
        return self

    def total_examples(self, n_train: int) -> int:
        """The run's planned length in examples (what the schedule is planned for).

        Example:
            >>> c = TrainConfig(batch_size=100, max_examples=10_000, max_epochs=2.5)
            >>> c.total_examples(1_000), c.total_examples(100_000)
            (2500, 10000)
        """
        total = self.max_examples if self.max_examples is not None else int(self.epochs * n_train)
        if self.max_epochs is not None:
            bs = self.batch_size
            total = min(total, max(bs, int(self.max_epochs * n_train) // bs * bs))
        return total

    def end_examples(self, n_train: int) -> int:
        """Where the run ends: its length, or ``stop_after_examples`` if that is sooner."""
        total = self.total_examples(n_train)
        return total if self.stop_after_examples is None else min(total, self.stop_after_examples)

    def eval_interval(self, n_train: int) -> int:
        return self.eval_every if self.eval_every is not None else max(1, n_train // 4)


@dataclass
class TrainResult:
    """How a run ended: ``completed``, ``stopped`` (by the callback or by early
    stopping, ``early_stopped`` tells which) or ``diverged``.

    ``metrics`` and ``model`` are the last evaluation's and the weights the run ended
    with; ``best`` is the evaluation with the lowest validation log loss and, when
    :func:`train` was asked to ``keep_best``, ``best_state`` its weights (a
    ``state_dict`` on the CPU).
    """

    status: Literal["completed", "stopped", "diverged"]
    metrics: Metrics
    model: RecModel
    history: list[Metrics] = field(default_factory=list)
    message: str = ""
    best: Metrics = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None
    early_stopped: bool = False


def normalized_entropy(logloss: float, base_rate: float) -> float:
    """NE = logloss / H(p), H the binary entropy of the training base rate ``p``."""
    p = min(max(base_rate, 1e-7), 1 - 1e-7)
    return logloss / -(p * math.log(p) + (1 - p) * math.log(1 - p))


@torch.no_grad()
def predict_logits(model: nn.Module, split: SplitLike, batch_size: int = 8192,
                   limit: int | None = None) -> torch.Tensor:
    """Logits (on the CPU) of ``model`` on the first ``limit`` examples of ``split``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(split) if limit is None else min(limit, len(split))
    batch_size = eval_batch_size(model, batch_size)  # smaller for long histories
    out = [model(*model_inputs(model, split, slice(i, min(i + batch_size, n)), device)).cpu()
           for i in range(0, n, batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, split: SplitLike, base_rate: float, prefix: str = "val",
             limit: int | None = None) -> Metrics:
    """``{prefix}_logloss``, ``{prefix}_auc`` and ``{prefix}_ne`` of ``model`` on ``split``."""
    return evaluate_losses(model, split, base_rate, prefix, limit)[0]


def evaluate_losses(model: nn.Module, split: SplitLike, base_rate: float, prefix: str = "val",
                    limit: int | None = None) -> tuple[Metrics, torch.Tensor]:
    """:func:`evaluate`'s metrics and the per-example log losses they average, from one
    pass over the first ``limit`` examples (a search trial logs the losses' standard
    error and, at ASHA's milestones, the losses themselves, without a second pass)."""
    logits = predict_logits(model, split, limit=limit)
    labels = split.label[: len(logits)]
    losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    logloss = float(losses.mean())
    from sklearn.metrics import roc_auc_score  # imported here: the config path stays light

    y = labels.numpy()
    auc = float(roc_auc_score(y, logits.numpy())) if 0 < y.sum() < len(y) else float("nan")
    return {
        f"{prefix}_logloss": logloss,
        f"{prefix}_auc": auc,
        f"{prefix}_ne": normalized_entropy(logloss, base_rate),
    }, losses


def wsd_factor(step: int, steps_total: int, warmup_frac: float, decay_frac: float,
               shape: Literal["linear", "sqrt"] = "linear") -> float:
    """Learning-rate multiplier of warmup-stable-decay at optimiser step ``step`` (0-based).

    With ``S = steps_total``, ``W = round(warmup_frac·S)`` and ``K = max(1,
    round(decay_frac·S))`` (capped so ``W + K <= S``)::

        step < W            (step + 1) / W                     linear warmup
        step < S − K        1                                  stable
        otherwise           1 − p  or  1 − sqrt(p),            p = (step − (S − K) + 1) / K

    so the last step (``p = 1``) runs at 0 and the decay ends exactly at the run's end.

    Example:
        >>> [round(wsd_factor(s, 10, 0.2, 0.4), 2) for s in range(10)]
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    total = max(1, steps_total)
    warm = min(total - 1, int(round(warmup_frac * total)))
    decay = max(1, min(total - warm, int(round(decay_frac * total))))
    if step < warm:
        return (step + 1) / warm
    start = total - decay
    if step < start:
        return 1.0
    p = min(1.0, (step - start + 1) / decay)
    return 1.0 - (math.sqrt(p) if shape == "sqrt" else p)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
               steps_total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_total)
    if cfg.schedule == "wsd":
        warm, decay, shape = cfg.warmup_frac, cfg.decay_frac, cfg.decay_shape
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: wsd_factor(s, steps_total, warm, decay, shape))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _optimizer(model: RecModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    emb = [model.embedding.weight]
    dense = [p for n, p in model.named_parameters() if n != "embedding.weight"]
    emb_lr = cfg.embedding_lr if cfg.optimizer == "adamw_split" and cfg.embedding_lr else cfg.lr
    groups = [
        {"params": dense, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": emb, "lr": emb_lr, "weight_decay": cfg.embedding_weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _autocast(precision: Literal["fp32", "bf16"],
              device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's precision context: nothing for ``fp32`` (today's path, bit for
    bit), ``torch.autocast`` to bfloat16 on ``device``'s type for ``bf16`` (CPU too)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    spec: FeatureSpec,
    train_split: SplitLike,
    val_split: SplitLike,
    report: ReportFn | None = None,
    resume: Mapping[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    eval_at: Sequence[int] = (),
    device: str | torch.device = "cpu",
    keep_best: bool = False,
    on_eval_losses: Callable[[torch.Tensor], None] | None = None,
) -> TrainResult:
    """Train ``model_cfg`` on ``train_split``, evaluating on ``val_split``.

    Args:
        model_cfg, train_cfg: what to train and how.
        spec: the feature layout the splits were encoded with.
        train_split, val_split: tensors ``cat (N, F_cat)``, ``num (N, F_num)``, ``label (N,)``.
        report: called after every evaluation with the metrics and a zero-argument
            function returning the resumable state; returning ``True`` stops the run.
        resume: a state previously handed to ``report``; training continues from it.
        on_step: called after each optimiser step with ``(examples_seen, loss)``.
        eval_at: extra evaluation points in examples (e.g. a scheduler's milestones),
            on top of every ``train_cfg.eval_every`` examples.
        device: where the model trains; batches move there step by step.
        keep_best: keep a copy of the weights of the evaluation with the lowest
            validation log loss (``TrainResult.best_state``; in the resume state too,
            so a resumed run keeps the same best). The loop always tracks the best
            evaluation's metrics and, with ``train_cfg.early_stopping_patience``, stops
            when they have not improved for that many evaluations.
        on_eval_losses: called after each evaluation, before ``report``, with the
            per-example validation log losses it averaged (a CPU tensor; see
            :func:`evaluate_losses`).

    Returns:
        A :class:`TrainResult` with the final metrics and the trained model.
    """
    n_train = len(train_split)
    if n_train == 0:
        raise ValueError("the training split is empty")
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, spec).to(device)
    dev = next(model.parameters()).device
    placement = choose_placement(train_cfg.placement, dev.type, split_bytes(train_split),
                                 device_free_bytes(dev), train_cfg.resident_max_fraction)
    batches = BatchSource(train_split, dev, placement, train_cfg.batch_size)
    cost = model.cost()
    extra_evals = sorted(int(e) for e in eval_at if e > 0)
    opt = _optimizer(model, train_cfg)
    total = train_cfg.total_examples(n_train)
    end = train_cfg.end_examples(n_train)
    interval = train_cfg.eval_interval(n_train)
    base_rate = float(train_split.label.float().mean())
    bs = train_cfg.batch_size
    steps_total = max(1, math.ceil(total / bs))
    sched = _scheduler(opt, train_cfg, steps_total)

    seen, epoch, pos, loss_sum, loss_n, next_eval = 0, 0, 0, 0.0, 0, interval
    elapsed = 0.0
    history: list[Metrics] = []
    best: Metrics = {}
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0  # evaluations in a row without an improvement of more than min_delta
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        seen, epoch, pos = int(resume["examples_seen"]), int(resume["epoch"]), int(resume["pos"])
        loss_sum, loss_n = float(resume["loss_sum"]), int(resume["loss_n"])
        next_eval, elapsed = int(resume["next_eval"]), float(resume["elapsed"])
        history = [dict(h) for h in resume.get("history", [])]
        best, stale = dict(resume.get("best", {})), int(resume.get("stale", 0))
        if keep_best and resume.get("best_model") is not None:
            best_state = dict(resume["best_model"])

    def state() -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
            "examples_seen": seen, "epoch": epoch, "pos": pos,
            "loss_sum": loss_sum, "loss_n": loss_n, "next_eval": next_eval,
            "elapsed": elapsed, "history": [dict(h) for h in history],
            "best": dict(best), "stale": stale, "best_model": best_state,
        }

    def metrics_now() -> Metrics:
        m, losses = evaluate_losses(model, val_split, base_rate,
                                    limit=train_cfg.eval_max_examples)
        if on_eval_losses is not None:
            on_eval_losses(losses)
        m.update({
            "train_loss": loss_sum / max(loss_n, 1),
            "examples_seen": float(seen),
            "train_flops": float(cost.train_flops(seen)),
            "flops_per_example": float(cost.flops_per_example),
            "params_dense": float(cost.params_dense),
            "params_embedding": float(cost.params_embedding),
            "examples_per_s": seen / elapsed if elapsed > 0 else 0.0,
        })
        return m

    # the rows the training forward passes look up (embedding_l2); evaluation's are not kept
    looked_up: list[torch.Tensor] = []
    hook = (model.embedding.register_forward_hook(
        lambda mod, _inp, out: looked_up.append(out) if mod.training else None)
        if train_cfg.embedding_l2 > 0 else None)

    model.train()
    order = _epoch_order(n_train, train_cfg.seed, epoch)
    status: Literal["completed", "stopped", "diverged"] = "completed"
    message, early = "", False
    try:
        while seen < end:
            # every optimiser step takes a whole batch (an epoch's last partial batch is
            # dropped; the last step may pass ``total`` by less than a batch): a step on a
            # sliver of a batch would move the loss between two evaluations. An evaluation
            # runs at the first batch boundary at or after its scheduled point; callers that
            # want it exactly there (the trainable's ASHA milestones) schedule whole batches.
            if n_train - pos < min(bs, n_train):
                epoch, pos = epoch + 1, 0
                order = _epoch_order(n_train, train_cfg.seed, epoch)
            take = min(bs, n_train - pos)
            before = seen
            idx = order[pos : pos + take]
            t0 = time.perf_counter()
            model.set_progress(seen / total)
            inputs, labels = batches.batch(model, idx)
            looked_up.clear()
            with _autocast(train_cfg.precision, dev):
                logits = model(*inputs)
            loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
            if not torch.isfinite(loss):
                status, message = "diverged", f"loss became {float(loss.detach())} after {seen} examples"
                break
            objective = loss
            if looked_up:
                penalty = sum(rows.float().pow(2).sum() for rows in looked_up)
                objective = loss + train_cfg.embedding_l2 * penalty / len(labels)
                looked_up.clear()
            opt.zero_grad(set_to_none=True)
            objective.backward()  # type: ignore[no-untyped-call]
            if train_cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            opt.step()
            sched.step()
            elapsed += time.perf_counter() - t0
            pos += take
            seen += take
            loss_value = float(loss.detach())
            loss_sum, loss_n = loss_sum + loss_value * take, loss_n + take
            if on_step is not None:
                on_step(seen, loss_value)
            if seen >= next_eval or seen >= end or any(before < e <= seen for e in extra_evals):
                m = metrics_now()
                history.append(m)
                loss_sum, loss_n = 0.0, 0
                while next_eval <= seen:
                    next_eval += interval
                if not math.isfinite(m[OBJECTIVE]):
                    status, message = "diverged", f"{OBJECTIVE} is {m[OBJECTIVE]} after {seen} examples"
                    break
                # patience counts evaluations that did not beat the best by min_delta; the
                # best weights are the lowest loss's, however small the improvement
                improved = not best or m[OBJECTIVE] < best[OBJECTIVE] - train_cfg.min_delta
                stale = 0 if improved else stale + 1
                if not best or m[OBJECTIVE] < best[OBJECTIVE]:
                    best = dict(m)
                    if keep_best:
                        best_state = {k: v.detach().to("cpu", copy=True)
                                      for k, v in model.state_dict().items()}
                if report is not None and report(m, state):
                    status = "stopped"
                    break
                patience = train_cfg.early_stopping_patience
                if patience is not None and stale >= patience and seen < end:
                    status, early = "stopped", True
                    message = (f"early stopping: {OBJECTIVE} did not improve on "
                               f"{best[OBJECTIVE]:.6g} (at {int(best['examples_seen'])} examples) "
                               f"by more than {train_cfg.min_delta:g} in {stale} evaluations")
                    break
    finally:  # the model outlives this run (a trial's state, a second train)
        if hook is not None:
            hook.remove()
    final = history[-1] if history else {}
    return TrainResult(status, final, model, history, message, best, best_state, early)


def trial_train_config(train_cfg: TrainConfig, flops_per_example: float, trial_flops: float,
                       report_every_flops: float, eval_max_examples: int | None,
                       patience: int | None = None) -> TrainConfig:
    """The training config a search trial runs (``search.trainable``) and an export that
    reproduces one plans with: every point in whole batches (the loop never steps on
    part of one), the trial's length its FLOPs budget rounded down, its evaluations every
    ``report_every_flops`` rounded to the nearest, on the first ``eval_max_examples``
    validation examples; with ``patience``, it ends after that many evaluations in a row
    without a lower validation loss (``early_stopping_patience``; else the config's own).

    Example:
        >>> c = trial_train_config(TrainConfig(batch_size=100), 10.0, 1e5, 2e4, 500)
        >>> c.max_examples, c.eval_every, c.eval_max_examples, c.early_stopping_patience
        (3300, 700, 500, None)
        >>> trial_train_config(TrainConfig(batch_size=100), 10.0, 1e5, 2e4, 500, 3).early_stopping_patience
        3
    """
    bs = train_cfg.batch_size
    per_batch = 3 * flops_per_example * bs
    update: dict[str, Any] = {
        "max_examples": bs * max(1, int(trial_flops // per_batch)),
        "eval_every": bs * max(1, round(report_every_flops / per_batch)),
        "eval_max_examples": eval_max_examples,
    }
    if patience is not None:  # else the config's own early stopping, if any, stays
        update["early_stopping_patience"] = patience
    return train_cfg.model_copy(update=update)


def param_count(module: nn.Module) -> int:
    """Trainable parameters actually allocated (for checks against the formulas)."""
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads (one Ray trial per CPU slot)."""
    if n is not None and n > 0:
        torch.set_num_threads(int(n))
