"""isoFLOP scaling studies on Ray Tune and MLflow (SCALING.md, Chinchilla approach 2).

A study is a ladder of training budgets ``C_1 < … < C_k``; at each budget and for each
family, a spread of model sizes ``N`` (forward FLOPs per example, from the family's
width ``d_model`` and depth ``n_layers`` knobs) each trained for ``D = C / (3·N)``
examples with a warmup-stable-decay schedule that ends at ``D`` (``trainers.loop``,
``schedule="wsd"``): every point is a run *trained for* its budget, not a cut one.

Sizes: at budget ``C`` the spread is centred on ``N_c = sqrt(C / (3·ρ))`` (``ρ =
center_ratio``, the examples-per-FLOP ratio ``D/N`` guessed at the optimum; the centre
grows as ``C^0.5``) and spans ``span``× from smallest to largest, ``sizes`` points
geometric in ``N``; each target takes the nearest unused (width, depth) config of the
family. The fit then tells whether the minimum was inside the spread.

History length: with ``seq_lens`` (e.g. ``(0, 16, 64)``, data loaded with behaviour
histories) every family is studied at every ``K`` as its own *series* ``family@K=k``
(:func:`series_name`): its own sizes (``N`` counts the history's FLOPs), isoFLOP profiles
and laws, so the analysis reads loss against ``K`` at equal training FLOPs: at each budget
the series' fitted minima ``L*(C)`` (and the winning series) compare the history lengths
at the same compute, and ``N*(C)`` says how the optimal size moves with ``K``.

Learning rate: one ``train.lr`` for every size, or a grid (``lrs``): every point is
trained at each rate and the analysis keeps the best per size (a per-size grid search;
the simplest tuning that cannot favour one size).

Execution: one Ray Tune trial per point (``tune.grid_search`` over point keys, FIFO: every
point must finish), the dataset shared through the object store, each point logging its
own MLflow child run (``trainers.tracking.TrialTracker``) under the study's parent run
(tag ``recscale.kind=study``). A study interrupted and started again with the same
settings resumes (Tune restores, finished points are not retrained). The trainer is
pluggable (:data:`PointTrainer`): the planted-truth test trains nothing and reports a
known ``L(N, D)``.

Example::

    cfg = StudyConfig(name="tm", budgets=ladder(1e10, 4, 4.0), families=("tokenmixer",))
    outcome = run_study(cfg)
    record = load_study("tm")
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spaces import FeatureSpec, ModelConfig, model_cost
from spaces.blocks import BlockDimensionError, UnknownBlockError
from spaces.blocks.registry import block_names
from trainers.contracts import (
    KIND_STUDY,
    KIND_TRIAL,
    KIND_VERIFY,
    OBJECTIVE,
    STEP_AXIS,
    TAG_BLOCK,
    TAG_CONFIG,
    TAG_DATA_FINGERPRINT,
    TAG_KIND,
    TAG_PARENT,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_STORAGE,
    TAG_TRIAL_ID,
    TIME_ATTR,
    UserError,
    default_tracking_uri,
    missing_store,
)
from trainers.data import DataConfig
from trainers.experiment import ExperimentConfig
from trainers.loop import TrainConfig
from trainers.tracking import create_run, end_run, experiment_id, finish_run

__all__ = [
    "PointTrainer",
    "StudyConfig",
    "StudyError",
    "StudyOutcome",
    "StudyPoint",
    "StudyRecord",
    "ladder",
    "load_study",
    "plan_study",
    "run_points",
    "run_study",
    "series_name",
    "size_candidates",
    "split_series",
    "train_point",
]

log = logging.getLogger(__name__)

SETTINGS_FILE = "recscale_study.json"
# params every point logs besides its flattened config (read back by load_study)
_P = "study."
_POINT_PARAMS = ("family", "budget", "N", "D", "lr", "key", "role", "epochs")


class StudyError(UserError):
    """A study or verification that cannot run as asked; the message is one line."""


_K_SEP = "@K="


def series_name(family: str, seq_len: int | None) -> str:
    """The series a study fits: the family, or ``family@K=k`` in a history-length sweep.

    Example:
        >>> series_name("attention", 16), series_name("wukong", None)
        ('attention@K=16', 'wukong')
    """
    return family if seq_len is None else f"{family}{_K_SEP}{seq_len}"


def split_series(name: str) -> tuple[str, int | None]:
    """``series_name``'s inverse: ``(family, K)``, ``K`` ``None`` outside a sweep.

    Example:
        >>> split_series("attention@K=16"), split_series("wukong")
        (('attention', 16), ('wukong', None))
    """
    family, sep, k = name.partition(_K_SEP)
    if not sep:
        return name, None
    try:
        return family, int(k)
    except ValueError:
        raise StudyError(f"bad series name {name!r} (want family{_K_SEP}<int>)") from None


def ladder(c_min: float, n: int, ratio: float = 4.0) -> tuple[float, ...]:
    """``n`` budgets from ``c_min``, ``ratio`` apart: ``(c_min, c_min·r, …)``."""
    if not (c_min > 0 and n >= 1 and ratio > 1):
        raise StudyError(f"a budget ladder needs c_min > 0, n >= 1, ratio > 1 "
                         f"(got {c_min:.3g}, {n}, {ratio:g})")
    return tuple(float(c_min * ratio**k) for k in range(n))


class StudyConfig(BaseModel):
    """One isoFLOP study (module docstring).

    Attributes:
        name: the study (MLflow experiment and Ray Tune experiment name).
        data: the dataset.
        families: block families studied.
        seq_lens: behaviour-history lengths ``K`` to sweep (each family at each ``K`` is
            one series, module docstring); empty: no sweep (``model.seq_len`` of the
            frame, if any, for every point). ``K > 0`` needs ``data.sequences``.
        budgets: training FLOPs per point, the ladder (ascending, at least 2).
        sizes: model sizes per budget and family.
        span: largest / smallest ``N`` targeted at each budget.
        center_ratio: ``D/N`` at the centre of each spread (``N_c = sqrt(C/3ρ)``).
        model: frame knobs shared by every size (``n_tokens``, ``embed_dim``,
            ``head_hidden``, …); each family's own section may be given under its name
            (a study of several families gives each point its own family's only).
        widths, depths: the ``d_model`` and ``n_layers`` values sizes are drawn from.
        train: ``TrainConfig`` fields for every point (batch size, optimiser, …);
            ``max_examples``, ``schedule`` and ``eval_every`` are set per point.
        lrs: a learning-rate grid per size (empty: ``train.lr`` only).
        warmup_frac, decay_frac, decay_shape: the WSD schedule of every point.
        min_steps: a point needs ``D >= min_steps · batch_size`` examples.
        max_epochs: refuse points that need more passes over the training split.
        eval_max_examples: validation examples each point is scored on.
        max_concurrent, cpus_per_point: Ray slots.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = Field(default_factory=DataConfig)
    families: tuple[str, ...] = ("tokenmixer",)
    seq_lens: tuple[int, ...] = ()
    budgets: tuple[float, ...]
    sizes: int = Field(5, ge=3, le=15)
    span: float = Field(16.0, gt=1.5, le=1e4)
    center_ratio: float = Field(10.0, gt=0)
    model: dict[str, Any] = Field(default_factory=lambda: {
        "n_tokens": 4, "embed_dim": 8, "head_hidden": [32], "tokenizer": "grouped",
        "pooling": "mean"})
    widths: tuple[int, ...] = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    depths: tuple[int, ...] = (1, 2, 3, 4)
    train: dict[str, Any] = Field(default_factory=lambda: {
        "batch_size": 256, "lr": 3e-3, "optimizer": "adamw_split", "embedding_lr": 1e-2})
    lrs: tuple[float, ...] = ()
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    decay_frac: float = Field(0.2, gt=0, le=1)
    decay_shape: Literal["linear", "sqrt"] = "linear"
    min_steps: int = Field(20, ge=1)
    max_epochs: float | None = Field(None, gt=0)
    eval_max_examples: int | None = Field(50_000, ge=1)
    max_concurrent: int = Field(2, ge=1)
    cpus_per_point: float = Field(1.0, gt=0)
    seed: int = 0

    @field_validator("budgets")
    @classmethod
    def _ladder(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) < 2:
            raise ValueError(f"a study needs at least 2 budgets (3+ to check the law), got {len(v)}")
        if any(not (c > 0 and math.isfinite(c)) for c in v):
            raise ValueError("budgets must be positive and finite")
        if any(b <= a * 1.01 for a, b in zip(v, v[1:])):
            raise ValueError("budgets must be strictly ascending (at least 1% apart)")
        return tuple(float(c) for c in v)

    @field_validator("families")
    @classmethod
    def _families(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        valid = block_names()
        for f in v:
            if f not in valid:
                raise ValueError(f"unknown block family {f!r}; valid families: {', '.join(valid)}")
        if not v or len(set(v)) != len(v):
            raise ValueError("families must be a non-empty list without repeats")
        return v

    @field_validator("seq_lens")
    @classmethod
    def _seq_lens(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 0 for k in v) or len(set(v)) != len(v):
            raise ValueError(f"seq_lens must be distinct history lengths >= 0, got {list(v)}")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _histories_loaded(self) -> StudyConfig:
        if any(self.seq_lens) and not self.data.sequences:
            raise ValueError(f"seq_lens {list(self.seq_lens)} read behaviour histories: load "
                             "the data with sequences (data.sequences: true, which `recscale "
                             "scale --seq-lens` sets; split user_temporal is the protocol)")
        return self

    def series(self) -> tuple[str, ...]:
        """The series fitted: every family, at every ``K`` of ``seq_lens`` if any."""
        if not self.seq_lens:
            return self.families
        return tuple(series_name(f, k) for f in self.families for k in self.seq_lens)

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < x <= 1 for x in v):
            raise ValueError("learning rates must be in (0, 1]")
        return v

    def point_train(self) -> TrainConfig:
        """The shared training config (validated; per-point fields filled later)."""
        return TrainConfig(**{**self.train, "schedule": "wsd", "warmup_frac": self.warmup_frac,
                              "decay_frac": self.decay_frac, "decay_shape": self.decay_shape,
                              "eval_max_examples": self.eval_max_examples})


def study_config(**kwargs: Any) -> StudyConfig:
    """A :class:`StudyConfig`, with any validation problem as one :class:`StudyError` line."""
    try:
        return StudyConfig(**kwargs)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "study"
        raise StudyError(f"study: {loc}: {first['msg'].removeprefix('Value error, ')}") from None


@dataclass(frozen=True)
class StudyPoint:
    """One run of a study: a family at a size, trained for ``D`` examples (budget ``C``).

    ``family`` is the series (:func:`series_name`: ``attention@K=16`` in a sweep of the
    history length); the block itself is ``flat["model.block"]``.

    ``flat`` holds the dotted ``model.*``/``train.*``/``data.*`` config the run trains;
    ``role`` is empty for study points and ``N*``, ``N*/2`` or ``2N*`` for verification.
    """

    key: str
    family: str
    budget: float
    N: int
    D: int
    lr: float
    flat: dict[str, Any]
    epochs: float | None = None
    role: str = ""

    def params(self) -> dict[str, Any]:
        return {f"{_P}{k}": getattr(self, k) for k in _POINT_PARAMS}


def size_candidates(cfg: StudyConfig, family: str,
                    spec: FeatureSpec) -> list[tuple[int, ModelConfig]]:
    """Every buildable ``(N, ModelConfig)`` of ``family`` (a family or a series
    ``family@K=k``, which fixes ``seq_len = k``) over the width × depth grid, sorted by
    ``N`` (one config per distinct ``N``: the shallower one)."""
    block, k = split_series(family)
    history = {} if k is None else {"seq_len": k}
    # a study of several families may give each its own section; this family's only
    frame = {key: v for key, v in cfg.model.items() if key == block or key not in block_names()}
    out: dict[int, ModelConfig] = {}
    for depth in sorted(cfg.depths):
        for width in sorted(cfg.widths):
            try:
                m = ModelConfig(**{**frame, **history, "block": block, "d_model": width,
                                   "n_layers": depth})
                n = int(model_cost(m, spec).flops_per_example)
            except (ValidationError, BlockDimensionError, UnknownBlockError, ValueError):
                continue
            out.setdefault(n, m)
    return sorted(out.items())


def pick_sizes(candidates: Sequence[tuple[int, ModelConfig]], targets: Sequence[float]
               ) -> list[tuple[int, ModelConfig]]:
    """For each target ``N`` (in order), the candidate nearest in ``ln N`` not yet taken."""
    free = list(candidates)
    chosen: list[tuple[int, ModelConfig]] = []
    for t in targets:
        if not free:
            break
        i = min(range(len(free)), key=lambda j: abs(math.log(free[j][0] / t)))
        chosen.append(free.pop(i))
    return sorted(chosen, key=lambda c: c[0])


def make_point(cfg: StudyConfig, family: str, budget: float, n: int, model: ModelConfig,
               lr: float, n_train: int | None, role: str = "") -> StudyPoint:
    """The point training ``model`` (``N = n``) for ``D = budget / 3N`` examples at ``lr``."""
    d = int(budget // (3 * n))
    base = cfg.point_train()
    train = base.model_copy(update={"lr": lr, "max_examples": max(1, d),
                                    "eval_every": max(1, d), "seed": cfg.seed})
    exp = ExperimentConfig(model=model, train=TrainConfig(**train.model_dump()), data=cfg.data)
    tag = f"{role}/" if role else ""
    key = f"{tag}{family}/C={budget:.4g}/N={n}/lr={lr:.3g}"
    return StudyPoint(key, family, float(budget), int(n), d, float(lr), exp.flat(),
                      d / n_train if n_train else None, role)


def plan_study(cfg: StudyConfig, spec: FeatureSpec, n_train: int | None) -> list[StudyPoint]:
    """Every point of the study (module docstring); raises :class:`StudyError` where a
    budget cannot hold ``sizes`` trainable sizes of a family around its centre."""
    train = cfg.point_train()
    min_d = cfg.min_steps * train.batch_size
    lrs = cfg.lrs or (train.lr,)
    points: list[StudyPoint] = []
    for family in cfg.series():
        cands = size_candidates(cfg, family, spec)
        if len(cands) < cfg.sizes:
            raise StudyError(f"family {family!r} has {len(cands)} buildable sizes over widths "
                             f"{list(cfg.widths)} x depths {list(cfg.depths)}; need {cfg.sizes}")
        for c in cfg.budgets:
            n_c = math.sqrt(c / (3 * cfg.center_ratio))
            # sizes whose D is long enough (and within the passes allowed)
            ok = [(n, m) for n, m in cands if c / (3 * n) >= min_d
                  and (cfg.max_epochs is None or not n_train
                       or c / (3 * n) <= cfg.max_epochs * n_train)]
            targets = [float(t) for t in np.geomspace(n_c / math.sqrt(cfg.span),
                                                      n_c * math.sqrt(cfg.span), cfg.sizes)]
            chosen = pick_sizes(ok, targets)
            if len(chosen) < 3 or not chosen[0][0] <= n_c <= chosen[-1][0]:
                have = f"{ok[0][0]:.3g}..{ok[-1][0]:.3g}" if ok else "none"
                raise StudyError(
                    f"budget {c:.3g} cannot spread {family!r} around N~{n_c:.3g} FLOPs/example: "
                    f"trainable sizes (D >= {min_d} examples"
                    f"{'' if cfg.max_epochs is None else f', <= {cfg.max_epochs:g} epochs'}) "
                    f"are {have}; change the budgets, center_ratio or widths/depths")
            for n, m in chosen:
                for lr in lrs:
                    points.append(make_point(cfg, family, c, n, m, lr, n_train))
    return points


# --- running points on Ray Tune --------------------------------------------------------

SharedData = dict[str, Any]
#: Trains one point and returns its final metrics (at least :data:`OBJECTIVE`); gets
#: the dataset as shared NumPy arrays (``search.trainable.share_dataset``).
PointTrainer = Callable[[StudyPoint, SharedData], dict[str, float]]


def train_point(point: StudyPoint, data: SharedData) -> dict[str, float]:
    """The default trainer: ``trainers.loop.train`` on the point's config."""
    from search.trainable import _view  # zero-copy views of the object-store arrays
    from trainers.experiment import experiment_from_flat
    from trainers.loop import train

    exp = experiment_from_flat(point.flat)
    events = data.get("events")  # the behaviour histories' event table, when loaded
    result = train(exp.model, exp.train, data["spec"], _view(data["train"], events),
                   _view(data["val"], events))
    out = {k: float(v) for k, v in result.metrics.items()}
    if result.status == "diverged":
        out[OBJECTIVE] = float("inf")
    out["diverged"] = float(result.status == "diverged")
    return out


@dataclass(frozen=True)
class PointContext:
    """What every point's trial needs besides its key (pickled per trial)."""

    study: str
    kind: str
    points: dict[str, StudyPoint]
    trainer: PointTrainer
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    threads: int


def _run_point(config: dict[str, Any], ctx: PointContext, data: SharedData) -> None:
    """The Tune function: train one point, log its MLflow child run, report."""
    import torch
    from mlflow.tracking import MlflowClient
    from ray import tune

    from trainers.tracking import TrialTracker

    torch.set_num_threads(ctx.threads)
    point = ctx.points[config["point"]]
    params = {**point.flat, **point.params()}
    block = str(point.flat.get("model.block", split_series(point.family)[0]))
    tracker = TrialTracker(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, point.key,
                           block, params, ctx.study,
                           config=point.flat)
    client = MlflowClient(ctx.tracking_uri)
    client.set_tag(tracker.run_id, TAG_KIND, ctx.kind)
    started = time.perf_counter()
    try:
        metrics = ctx.trainer(point, data)
    except BaseException:
        finish_run(client, tracker.run_id, "ERROR")
        raise
    metrics = {**metrics, "trial_seconds": time.perf_counter() - started}
    # a point's one report sits at the compute it was trained for (step = train_flops)
    tracker.log({TIME_ATTR: 3.0 * point.N * point.D, "examples_seen": float(point.D), **metrics})
    tracker.flush()
    diverged = metrics.get("diverged", 0.0) > 0 or not math.isfinite(metrics[OBJECTIVE])
    finish_run(client, tracker.run_id, "DIVERGED" if diverged else "COMPLETED")
    tune.report({**metrics, "point": point.key, "mlflow_run_id": tracker.run_id})


def _find_parent(client: Any, name: str) -> tuple[str, str] | None:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{TAG_KIND}` = '{KIND_STUDY}'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    return (str(exp.experiment_id), runs[0].info.run_id) if runs else None


def run_points(name: str, points: Sequence[StudyPoint], kind: str, data: SharedData,
               trainer: PointTrainer, tracking_uri: str, experiment_id: str,
               parent_run_id: str, storage: Path, max_concurrent: int = 2,
               cpus_per_point: float = 1.0, verbose: int = 0) -> pd.DataFrame:
    """Run ``points`` as one Ray Tune experiment ``name`` under ``storage`` (resumed if it
    exists), one trial per point; return one row per point with its last result."""
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=verbose > 1,
                 logging_level=logging.WARNING if verbose < 2 else logging.INFO)
    ctx = PointContext(name, kind, {p.key: p for p in points}, trainer, tracking_uri,
                       experiment_id, parent_run_id, max(1, int(cpus_per_point)))
    fn = tune.with_resources(tune.with_parameters(_run_point, ctx=ctx, data=data),
                             {"cpu": cpus_per_point})
    exp_path = storage / name
    if tune.Tuner.can_restore(str(exp_path)):
        tuner = tune.Tuner.restore(str(exp_path), trainable=fn, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            fn, param_space={"point": tune.grid_search([p.key for p in points])},
            tune_config=tune.TuneConfig(scheduler=FIFOScheduler(),  # type: ignore[no-untyped-call]
                                        num_samples=1,
                                        max_concurrent_trials=max_concurrent,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      progress_reporter=None if verbose < 1 else tune.CLIReporter(
                                          parameter_columns=["point"],
                                          metric_columns=[OBJECTIVE, STEP_AXIS],
                                          max_report_frequency=60)))
    results = tuner.fit()
    rows = []
    for i in range(len(results)):
        r = results[i]
        row = {"point": (r.config or {}).get("point"), **(r.metrics or {})}
        row["error"] = str(r.error).splitlines()[-1] if r.error else ""
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class StudyOutcome:
    """A finished study: its points' results and MLflow ids."""

    name: str
    results: pd.DataFrame
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    n_train: int
    wall_seconds: float
    points: list[StudyPoint] = field(default_factory=list)


def _shared(dataset: Any) -> SharedData:
    from search.trainable import share_dataset

    return share_dataset(dataset)


def run_study(cfg: StudyConfig, tracking_uri: str | None = None,
              storage: str | os.PathLike[str] | None = None,
              trainer: PointTrainer | None = None, dataset: Any = None,
              verbose: int = 0) -> StudyOutcome:
    """Run (or resume) the study ``cfg`` on Ray Tune, logging to MLflow.

    Args:
        cfg: the study.
        tracking_uri: MLflow (flag > ``MLFLOW_TRACKING_URI`` > ``./mlflow.db``).
        storage: Ray Tune's state (default ``./recscale_runs``); the study resumes if
            its experiment is there with the same settings.
        trainer: trains one point (default :func:`train_point`).
        dataset: an encoded dataset (default: ``load_dataset(cfg.data)``).
        verbose: 0 silent, 1 progress table, 2 Tune's full output.
    """
    from mlflow.tracking import MlflowClient

    from trainers.data import load_dataset

    storage_path = Path(storage or "recscale_runs").absolute()
    exp_path = storage_path / cfg.name
    settings = exp_path / SETTINGS_FILE
    if settings.exists() and json.loads(settings.read_text()) != json.loads(cfg.model_dump_json()):
        raise StudyError(f"study {cfg.name!r} exists in {storage_path} with other settings; "
                         "resume with the same settings or choose another name")
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    n_train = len(ds.train)
    points = plan_study(cfg, ds.spec, n_train)
    floor = data_floor(ds.meta)
    uri = default_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    found = _find_parent(client, cfg.name)
    if found is None:
        exp_id = experiment_id(client, cfg.name)
        parent = create_run(client, exp_id, f"{cfg.name}-study", {
            TAG_KIND: KIND_STUDY, TAG_SEARCH: cfg.name, TAG_CONFIG: cfg.model_dump_json(),
            TAG_DATA_FINGERPRINT: ds.fingerprint, TAG_STORAGE: str(exp_path)}, {
            "study.n_points": len(points), "study.n_train": n_train,
            "study.budgets": json.dumps(list(cfg.budgets)),
            "study.families": json.dumps(list(cfg.families)),
            **({"study.seq_lens": json.dumps(list(cfg.seq_lens))} if cfg.seq_lens else {}),
            **({FLOOR_PARAM: floor} if floor is not None else {}),
            "data.fingerprint": ds.fingerprint})
    else:
        exp_id, parent = found
        client.update_run(parent, status="RUNNING")
        if floor is not None and FLOOR_PARAM not in client.get_run(parent).data.params:
            client.log_param(parent, FLOOR_PARAM, floor)  # a study begun before it was kept
    exp_path.mkdir(parents=True, exist_ok=True)
    settings.write_text(cfg.model_dump_json(indent=2))
    t0 = time.perf_counter()
    try:
        results = run_points(cfg.name, points, KIND_TRIAL, _shared(ds), trainer or train_point,
                             uri, exp_id, parent, storage_path, cfg.max_concurrent,
                             cfg.cpus_per_point, verbose)
    except BaseException:
        end_run(client, parent, "KILLED")
        raise
    wall = time.perf_counter() - t0
    end_run(client, parent, "FINISHED")
    return StudyOutcome(cfg.name, results, uri, exp_id, parent, str(exp_path), n_train, wall,
                        points)


#: the parent run's param holding the data's own loss floor (:func:`data_floor`)
FLOOR_PARAM = "study.floor_logloss"


def data_floor(meta: dict[str, Any]) -> float | None:
    """The lowest validation log loss any model can expect on this data, where the data
    knows it: a synthetic teacher's own log loss on the validation split (its true
    probabilities: the Bayes loss). ``None`` for real data."""
    value = (meta.get("teacher_logloss") or {}).get("val")
    return float(value) if value is not None and math.isfinite(float(value)) else None


# --- reading a study back ------------------------------------------------------------

@dataclass(frozen=True)
class StudyRecord:
    """A study read back from MLflow: its config, points and verification runs.

    ``points``/``verify`` columns: ``family``, ``budget``, ``N``, ``D``, ``lr``, ``key``,
    ``role``, ``loss`` (= :data:`OBJECTIVE`), ``status``, ``run_id`` and every metric.
    ``floor_loss``: the data's own loss floor where it has one (:func:`data_floor`).
    """

    name: str
    config: StudyConfig
    experiment_id: str
    parent_run_id: str
    n_train: int | None
    points: pd.DataFrame
    verify: pd.DataFrame
    tracking_uri: str
    floor_loss: float | None = None


def _num(text: str) -> Any:
    """An MLflow param back to the number it was logged from (``"None"`` -> None)."""
    if text in ("None", "null", ""):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def load_study(name: str, tracking_uri: str | None = None) -> StudyRecord:
    """The study ``name`` from MLflow; :class:`StudyError` if there is none."""
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tracking_uri)
    if (absent := missing_store(uri)) is not None:
        raise StudyError(f"no MLflow store at {absent} (tracking URI {uri})")
    client = MlflowClient(uri)
    found = _find_parent(client, name)
    if found is None:
        raise StudyError(f"no study {name!r} in {uri} (run `recscale scale --name {name}` first)")
    exp_id, parent = found
    prun = client.get_run(parent)
    cfg = StudyConfig.model_validate_json(prun.data.tags[TAG_CONFIG])
    n_train_text = prun.data.params.get("study.n_train")
    n_train = int(n_train_text) if n_train_text else None
    floor_text = prun.data.params.get(FLOOR_PARAM)
    floor_loss = float(floor_text) if floor_text else None
    rows: dict[str, list[dict[str, Any]]] = {KIND_TRIAL: [], KIND_VERIFY: []}
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent}'",
                                  max_results=1000, page_token=token)
        for run in page:
            kind = run.data.tags.get(TAG_KIND, "")
            if kind not in rows:
                continue
            row: dict[str, Any] = {k: _num(run.data.params.get(f"{_P}{k}", "null"))
                                   for k in _POINT_PARAMS}
            row["key"] = run.data.params.get(f"{_P}key", run.data.tags.get(TAG_TRIAL_ID, ""))
            row["role"] = run.data.params.get(f"{_P}role", "")
            row.update(run.data.metrics)
            row.update({"loss": run.data.metrics.get(OBJECTIVE, float("nan")),
                        "status": run.data.tags.get(TAG_STATUS, ""),
                        "block": run.data.tags.get(TAG_BLOCK, ""), "run_id": run.info.run_id})
            rows[kind].append(row)
        token = page.token
        if not token:
            break
    cols = ["family", "budget", "N", "D", "lr", "key", "role", "loss", "status", "run_id"]

    def frame(r: list[dict[str, Any]]) -> pd.DataFrame:
        df = pd.DataFrame(r, columns=None if r else cols)
        return df.sort_values(["family", "budget", "N"]).reset_index(drop=True) if r else df

    done = [r for r in rows[KIND_TRIAL] if r["status"] in ("COMPLETED", "DIVERGED")]
    return StudyRecord(name, cfg, exp_id, parent, n_train, frame(done),
                       frame([r for r in rows[KIND_VERIFY] if r["status"] == "COMPLETED"]), uri,
                       floor_loss)
