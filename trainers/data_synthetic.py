"""Synthetic CTR data from a seeded "teacher" with planted high-order interactions.

The teacher gives every categorical value a scalar weight ``w_f[v]`` and an embedding
``e_f[v] ∈ R^dim`` (numeric field ``j`` contributes ``w_j·x_j`` and ``x_j·u_j``). Its
score sums one component per order ``k = 1..order``::

    s_1 = Σ_f w_f[v_f]                                       (first order)
    s_k = Σ_{S ∈ 𝒮_k} Σ_d Π_{f ∈ S} e_f[v_f]_d,  |S| = k     (k-way products, k ≥ 2)
    z   = Σ_k (s_k − μ_k) / (σ_k · √order)                   (every order: equal variance)
    p   = (1 − noise) · σ(scale · z + b) + noise · base_rate
    y   ~ Bernoulli(p)

``𝒮_k`` holds ``n_interactions`` random ``k``-subsets of the fields; ``μ_k, σ_k`` and the
bias ``b`` (which makes the mean of ``p`` equal ``base_rate``) come from a fixed
calibration sample, so the teacher does not depend on ``n_rows``. ``noise = 0`` gives the
sharpest labels the scale allows, ``noise = 1`` labels independent of the features.

Rows are drawn in fixed chunks from generators seeded ``(seed, chunk, stream)``: the same
seed gives the same rows, and a larger ``n_rows`` extends a smaller one (prefix-stable),
which suits data-scaling studies.

Example:
    >>> table = generate_synthetic(SyntheticConfig(n_rows=1000, seed=1))
    >>> table.cat_codes.shape, abs(float(table.label.mean()) - 0.5) < 0.1
    ((1000, 8), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainers.data_sources import RawTable

__all__ = ["SyntheticConfig", "Teacher", "generate_synthetic", "make_teacher"]

_CHUNK = 65_536
_CALIBRATION_ROWS = 16_384
# Generator stream tags: seed sequences are (seed, tag, ...) so streams never overlap.
_TEACHER, _CALIBRATE, _ROWS = 0, 1, 2


class SyntheticConfig(BaseModel):
    """Size and difficulty of the synthetic teacher (see the module docstring for the formula).

    Args:
        n_rows: rows to generate.
        n_cat_fields: categorical fields; each has ``cardinality`` values.
        cardinality: distinct values per categorical field.
        skew: Zipf exponent of value frequencies (``0`` = uniform, ``1`` = long tail).
        n_numeric: standard-normal numeric fields; they enter the teacher too.
        order: highest interaction order planted (``1`` = first-order only).
        n_interactions: planted field subsets per order ``k ≥ 2``.
        dim: teacher embedding width (rank of each planted interaction).
        scale: standard deviation of the teacher logit before noise.
        base_rate: mean positive rate.
        noise: fraction of labels replaced by a coin with bias ``base_rate``, in [0, 1].
        seed: teacher and rows.

    Example:
        >>> SyntheticConfig(n_rows=10_000, order=4).order
        4
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_rows: int = Field(default=100_000, ge=1)
    n_cat_fields: int = Field(default=8, ge=0)
    cardinality: int = Field(default=100, ge=2)
    skew: float = Field(default=1.0, ge=0.0)
    n_numeric: int = Field(default=0, ge=0)
    order: int = Field(default=3, ge=1, le=8)
    n_interactions: int = Field(default=6, ge=1)
    dim: int = Field(default=4, ge=1)
    scale: float = Field(default=3.0, gt=0.0)
    base_rate: float = Field(default=0.5, gt=0.0, lt=1.0)
    noise: float = Field(default=0.1, ge=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        n_fields = self.n_cat_fields + self.n_numeric
        if n_fields < 1:
            raise ValueError("needs at least one field (n_cat_fields + n_numeric >= 1)")
        if self.order > n_fields:
            raise ValueError(f"order {self.order} exceeds the number of fields {n_fields}")
        return self


@dataclass(frozen=True)
class Teacher:
    """The planted ground truth: weights, embeddings, interaction subsets, calibration.

    Fields ``0..C-1`` are categorical, ``C..C+M-1`` numeric. Build with :func:`make_teacher`.
    """

    cfg: SyntheticConfig
    cat_weight: np.ndarray  # (C, card)
    cat_embed: np.ndarray  # (C, card, dim)
    num_weight: np.ndarray  # (M,)
    num_embed: np.ndarray  # (M, dim)
    subsets: tuple[tuple[tuple[int, ...], ...], ...]  # per order k = 2..order
    value_cdf: np.ndarray  # (card,) cumulative value frequencies
    mean: np.ndarray  # (order,) per-order component mean (calibration)
    std: np.ndarray  # (order,) per-order component std (calibration)
    bias: float

    def components(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        """Raw per-order scores ``(N, order)`` for values ``cat (N, C)`` and ``num (N, M)``."""
        cfg = self.cfg
        n = cat.shape[0]
        out = np.zeros((n, cfg.order))
        fields = np.arange(cfg.n_cat_fields)
        out[:, 0] = self.cat_weight[fields, cat].sum(axis=1) + num @ self.num_weight
        if cfg.order > 1:
            emb = np.concatenate(
                [
                    self.cat_embed[fields, cat].transpose(1, 0, 2),  # (C, N, dim)
                    num.T[:, :, None] * self.num_embed[:, None, :],  # (M, N, dim)
                ]
            )
            for k, subsets in enumerate(self.subsets, start=1):
                for subset in subsets:
                    prod = emb[subset[0]].copy()  # (N, dim)
                    for f in subset[1:]:
                        prod *= emb[f]
                    out[:, k] += prod.sum(axis=1)
        return out

    def logit(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        """Noise-free teacher logit ``scale · z + b``, shape ``(N,)``."""
        z = ((self.components(cat, num) - self.mean) / self.std).sum(axis=1)
        out: np.ndarray = self.cfg.scale * z / math.sqrt(self.cfg.order) + self.bias
        return out

    def probability(self, cat: np.ndarray, num: np.ndarray) -> np.ndarray:
        """True ``P(y = 1)`` including label noise, shape ``(N,)``."""
        clean = 1.0 / (1.0 + np.exp(-self.logit(cat, num)))
        out: np.ndarray = (1.0 - self.cfg.noise) * clean + self.cfg.noise * self.cfg.base_rate
        return out


def _draw(
    cfg: SyntheticConfig, cdf: np.ndarray, n: int, key: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of feature values from generators seeded ``(seed, *key, stream)``."""
    cat_rng = np.random.default_rng((cfg.seed, *key, 0))
    num_rng = np.random.default_rng((cfg.seed, *key, 1))
    u = cat_rng.random((n, cfg.n_cat_fields))
    cat = np.minimum(np.searchsorted(cdf, u, side="right"), cfg.cardinality - 1)
    num = num_rng.standard_normal((n, cfg.n_numeric))
    return cat.astype(np.int64), num


def _subsets(
    rng: np.random.Generator, n_fields: int, k: int, n: int
) -> tuple[tuple[int, ...], ...]:
    total = math.comb(n_fields, k)
    if total <= n:
        return tuple(combinations(range(n_fields), k))
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < n:
        chosen.add(tuple(sorted(int(i) for i in rng.choice(n_fields, size=k, replace=False))))
    return tuple(sorted(chosen))


def make_teacher(cfg: SyntheticConfig) -> Teacher:
    """Draw the teacher for ``cfg.seed`` and calibrate it (independent of ``n_rows``).

    Example:
        >>> t = make_teacher(SyntheticConfig(order=2, seed=3))
        >>> len(t.subsets), t.cat_embed.shape
        (1, (8, 100, 4))
    """
    rng = np.random.default_rng((cfg.seed, _TEACHER))
    c, m, card, dim = cfg.n_cat_fields, cfg.n_numeric, cfg.cardinality, cfg.dim
    freq = 1.0 / np.arange(1, card + 1) ** cfg.skew
    cdf = np.cumsum(freq / freq.sum())
    cdf[-1] = 1.0
    cat_weight = rng.standard_normal((c, card))
    cat_embed = rng.standard_normal((c, card, dim))
    num_weight = rng.standard_normal(m)
    num_embed = rng.standard_normal((m, dim))
    subsets = tuple(_subsets(rng, c + m, k, cfg.n_interactions) for k in range(2, cfg.order + 1))
    draft = Teacher(
        cfg,
        cat_weight,
        cat_embed,
        num_weight,
        num_embed,
        subsets,
        cdf,
        mean=np.zeros(cfg.order),
        std=np.ones(cfg.order),
        bias=0.0,
    )
    cat, num = _draw(cfg, cdf, _CALIBRATION_ROWS, (_CALIBRATE,))
    comp = draft.components(cat, num)
    mean, std = comp.mean(axis=0), comp.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    z = cfg.scale * ((comp - mean) / std).sum(axis=1) / math.sqrt(cfg.order)
    lo, hi = -50.0, 50.0  # bisection: mean σ(z + b) = base_rate
    for _ in range(80):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(z + mid)))) < cfg.base_rate:
            lo = mid
        else:
            hi = mid
    return Teacher(
        cfg,
        cat_weight,
        cat_embed,
        num_weight,
        num_embed,
        subsets,
        cdf,
        mean=mean,
        std=std,
        bias=(lo + hi) / 2,
    )


def generate_synthetic(cfg: SyntheticConfig) -> RawTable:
    """``cfg.n_rows`` labelled rows from the seeded teacher, with their true probabilities.

    Categorical fields are ``c0..c{C-1}`` (raw values ``0..cardinality-1``), numeric
    fields ``x0..x{M-1}``; ``prob`` holds the true ``P(y = 1)``; ``time`` is the row
    index (rows are i.i.d., so a temporal split is just the row order).

    Example:
        >>> t = generate_synthetic(SyntheticConfig(n_rows=500, n_numeric=2, seed=7))
        >>> t.num_names, t.prob.shape
        (('x0', 'x1'), (500,))
    """
    teacher = make_teacher(cfg)
    n = cfg.n_rows
    cat = np.empty((n, cfg.n_cat_fields), dtype=np.int64)
    num = np.empty((n, cfg.n_numeric), dtype=np.float64)
    prob = np.empty(n, dtype=np.float64)
    label = np.empty(n, dtype=np.float32)
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        stop = min(start + _CHUNK, n)
        c, x = _draw(cfg, teacher.value_cdf, stop - start, (_ROWS, chunk))
        p = teacher.probability(c, x)
        u = np.random.default_rng((cfg.seed, _ROWS, chunk, 2)).random(stop - start)
        cat[start:stop], num[start:stop], prob[start:stop] = c, x, p
        label[start:stop] = u < p
    return RawTable(
        cat_names=tuple(f"c{i}" for i in range(cfg.n_cat_fields)),
        cat_codes=cat,
        num_names=tuple(f"x{i}" for i in range(cfg.n_numeric)),
        num=num,
        label=label,
        time=np.arange(n, dtype=np.float64),
        source=(
            f"synthetic teacher (seed={cfg.seed}, order={cfg.order}, "
            f"{cfg.n_cat_fields}x{cfg.cardinality} categorical, {cfg.n_numeric} numeric)"
        ),
        label_rule=f"teacher Bernoulli(p), noise={cfg.noise}",
        prob=prob,
        info={"teacher_bias": teacher.bias},
    )
