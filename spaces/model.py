"""The model frame: embeddings -> tokenizer -> L blocks of one family -> head -> logit.

Only the block slot changes between families (the DLRM ``inter_arch`` pattern). The
frame's own cost is counted here with the same convention as the blocks (matmul FLOPs,
multiply-add = 2; embedding look-ups and element-wise work cost 0), so
``model_cost(cfg, spec)`` gives the whole model's FLOPs and parameters from the config
alone, before anything is allocated.

Example:
    >>> from spaces import FeatureSpec, ModelConfig, build_model
    >>> spec = FeatureSpec(cardinalities=(100, 20, 7), n_numeric=2)
    >>> cfg = ModelConfig(block="tokenmixer", d_model=32, n_tokens=4, n_layers=2)
    >>> model = build_model(cfg, spec)
    >>> model(torch.zeros(8, 3, dtype=torch.long), torch.zeros(8, 2)).shape
    torch.Size([8])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

import spaces.blocks  # noqa: F401  (registers every family)
from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import block_names, get_block
from spaces.features import FeatureSpec

__all__ = ["ModelConfig", "ModelCost", "RecModel", "build_model", "model_cost"]


class ModelConfig(BaseModel):
    """Typed, validated config of one model.

    The chosen family's knobs live in a section named after it, e.g.
    ``{"block": "wukong", "wukong": {"n_fm": 8, ...}}``; a missing section means the
    family's defaults, and a section for another family is an error.

    Attributes:
        block: the block family (see ``spaces.block_names()``).
        n_layers: number of stacked blocks ``L``; 0 leaves tokens unmixed (with
            ``embed_dim=1``, ``tokenizer="field"``, ``d_model=1``, ``pooling="flatten"`` and
            ``head_hidden=()`` the model is a logistic regression: the baseline).
        d_model: token width ``D``.
        n_tokens: token count ``T`` for the ``grouped`` tokenizer; ignored (must be left
            unset or equal the field count) for ``field``, where ``T`` = number of fields.
        embed_dim: per-field embedding width ``e``.
        tokenizer: ``grouped`` (RankMixer: concat, cut into T slices, project each) or
            ``field`` (one token per field).
        pooling: ``mean`` over tokens or ``flatten`` them before the head MLP.
        head_hidden: widths of the head MLP's hidden layers (ReLU); then one logit.
        mixer: the validated family config (filled from the family's section).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    block: str
    n_layers: int = Field(2, ge=0, le=64)
    d_model: int = Field(64, ge=1, le=8192)
    n_tokens: int | None = Field(8, ge=1, le=1024)
    embed_dim: int = Field(16, ge=1, le=1024)
    tokenizer: Literal["grouped", "field"] = "grouped"
    pooling: Literal["mean", "flatten"] = "mean"
    head_hidden: tuple[int, ...] = (64,)
    mixer: BlockConfig

    @model_validator(mode="before")
    @classmethod
    def _family_section(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "mixer" in data:
            return data
        data = dict(data)
        name = data.get("block")
        if not isinstance(name, str):
            raise ValueError("model.block is required (a block family name)")
        block_cls = get_block(name)  # unknown name -> lists the valid ones
        others = [k for k in block_names() if k != name and k in data]
        if others:
            raise ValueError(f"section {others[0]!r} given but model.block is {name!r}")
        section = data.pop(name, None) or {}
        if isinstance(section, BlockConfig):
            section = section.model_dump()
        data["mixer"] = block_cls.Config(**section)
        return data

    @model_validator(mode="after")
    def _check_types(self) -> ModelConfig:
        expected = get_block(self.block).Config
        if type(self.mixer) is not expected:
            raise ValueError(f"mixer config is {type(self.mixer).__name__}, expected {expected.__name__}")
        if any(h < 1 for h in self.head_hidden):
            raise ValueError(f"head_hidden widths must be >= 1, got {self.head_hidden}")
        if self.tokenizer == "grouped" and self.n_tokens is None:
            raise ValueError("the grouped tokenizer needs n_tokens")
        return self

    def tokens_for(self, spec: FeatureSpec) -> int:
        """The token count ``T`` the blocks see for this dataset."""
        if self.tokenizer == "field":
            return spec.n_fields
        assert self.n_tokens is not None
        return self.n_tokens

    def check(self, spec: FeatureSpec) -> None:
        """Raise ``BlockDimensionError`` if this config cannot be built for ``spec``."""
        if self.tokenizer == "field" and self.n_tokens not in (None, spec.n_fields):
            raise BlockDimensionError(
                f"tokenizer 'field' makes one token per field ({spec.n_fields}); "
                f"n_tokens={self.n_tokens} contradicts it (leave it unset)"
            )
        block_cls = get_block(self.block)
        t = self.tokens_for(spec)
        for _ in range(self.n_layers):
            block_cls.check(self.mixer, t, self.d_model)
            t = block_cls.output_tokens(self.mixer, t, self.d_model)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (the YAML form); loads back with ``ModelConfig(**d)``."""
        out: dict[str, Any] = {
            "block": self.block,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_tokens": self.n_tokens,
            "embed_dim": self.embed_dim,
            "tokenizer": self.tokenizer,
            "pooling": self.pooling,
            "head_hidden": list(self.head_hidden),
            self.block: self.mixer.model_dump(),
        }
        return out


@dataclass(frozen=True)
class ModelCost:
    """Analytic cost and size of a whole model.

    Attributes:
        flops_per_example: forward matmul FLOPs of one example (multiply-add = 2).
        flops_per_batch: input-independent forward FLOPs spent once per forward pass.
        params_dense: every trainable parameter except the embedding tables.
        params_embedding: embedding-table parameters.
    """

    flops_per_example: int
    flops_per_batch: int
    params_dense: int
    params_embedding: int

    def train_flops(self, examples: int) -> int:
        """Training FLOPs for ``examples`` examples: 3 x forward (ARCHITECTURE.md)."""
        return 3 * self.flops_per_example * examples


def _grouped_slice(spec: FeatureSpec, cfg: ModelConfig) -> int:
    t = cfg.tokens_for(spec)
    return math.ceil(spec.n_fields * cfg.embed_dim / t)


def _mlp_dims(d_in: int, hidden: tuple[int, ...]) -> list[tuple[int, int]]:
    dims = [d_in, *hidden, 1]
    return list(zip(dims[:-1], dims[1:]))


def model_cost(cfg: ModelConfig, spec: FeatureSpec) -> ModelCost:
    """FLOPs and parameters of ``build_model(cfg, spec)`` from formulas alone.

    Frame terms (per example): tokenizer ``2·T·s·D`` (grouped, slice width
    ``s = ceil(F·e/T)``) or ``2·F·e·D`` (field); head MLP ``2·Σ d_in·d_out``; numeric
    embeddings are element-wise (``x_f · w_f + b_f``) and cost 0, like look-ups.
    """
    cfg.check(spec)
    block_cls = get_block(cfg.block)
    e, d = cfg.embed_dim, cfg.d_model
    t = cfg.tokens_for(spec)
    params_embedding = spec.total_vocab * e
    dense = 2 * spec.n_numeric * e  # per-field numeric scale and shift
    if cfg.tokenizer == "grouped":
        s = _grouped_slice(spec, cfg)
        flops = 2 * t * s * d
        dense += t * s * d + t * d
    else:
        flops = 2 * spec.n_fields * e * d
        dense += spec.n_fields * (e * d + d)
    cost = BlockCost(flops)
    for _ in range(cfg.n_layers):
        cost = cost + block_cls.count_flops(cfg.mixer, t, d)
        dense += block_cls.count_params(cfg.mixer, t, d)
        t = block_cls.output_tokens(cfg.mixer, t, d)
    head_in = d if cfg.pooling == "mean" else t * d
    for a, b in _mlp_dims(head_in, cfg.head_hidden):
        cost = cost + BlockCost(2 * a * b)
        dense += a * b + b
    return ModelCost(cost.per_example, cost.per_batch, dense, params_embedding)


class RecModel(nn.Module):
    """Embeddings -> tokenizer -> ``L`` blocks -> head; returns one logit per example.

    Args:
        cfg: the model config.
        spec: the dataset's feature layout.

    Forward:
        cat: ``(B, F_cat)`` int64 ids, field ``f`` in ``[0, spec.cardinalities[f])``.
        num: ``(B, F_num)`` float32 normalised numeric fields.
        returns ``(B,)`` logits.
    """

    def __init__(self, cfg: ModelConfig, spec: FeatureSpec) -> None:
        super().__init__()
        cfg.check(spec)
        self.cfg, self.spec = cfg, spec
        e, d = cfg.embed_dim, cfg.d_model
        self.n_tokens = t = cfg.tokens_for(spec)
        offsets = torch.tensor([0, *spec.cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets[: spec.n_categorical], persistent=False)
        self.embedding = nn.Embedding(max(spec.total_vocab, 1), e)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.num_scale = nn.Parameter(torch.randn(spec.n_numeric, e) * 0.05)
        self.num_shift = nn.Parameter(torch.zeros(spec.n_numeric, e))
        if cfg.tokenizer == "grouped":
            self.slice = s = _grouped_slice(spec, cfg)
            self.pad = t * s - spec.n_fields * e
            w = torch.empty(t, s, d)
        else:
            self.slice, self.pad = e, 0
            w = torch.empty(spec.n_fields, e, d)
        nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[1]))
        self.tok_weight = nn.Parameter(w)  # (T, s, D): one projection per token
        self.tok_bias = nn.Parameter(torch.zeros(w.shape[0], d))
        block_cls = get_block(cfg.block)
        blocks: list[Block] = []
        for _ in range(cfg.n_layers):
            blocks.append(block_cls(cfg.mixer, t, d))
            t = blocks[-1].out_tokens
        self.blocks = nn.ModuleList(blocks)
        head_in = d if cfg.pooling == "mean" else t * d
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(_mlp_dims(head_in, cfg.head_hidden)):
            layers.append(nn.Linear(a, b))
            if i < len(cfg.head_hidden):
                layers.append(nn.ReLU())
        self.head = nn.Sequential(*layers)

    def cost(self) -> ModelCost:
        return model_cost(self.cfg, self.spec)

    def set_progress(self, fraction: float) -> None:
        """Forward training progress to blocks with schedules (e.g. UniMixing's τ)."""
        for block in self.blocks:
            assert isinstance(block, Block)
            block.set_progress(fraction)

    def tokens(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        """Feature tokens ``(B, T, D)`` before the blocks."""
        fields = []
        if self.spec.n_categorical:
            offsets: torch.Tensor = self.offsets  # type: ignore[assignment]
            fields.append(self.embedding(cat + offsets))  # (B, F_cat, e)
        if self.spec.n_numeric:
            fields.append(num.unsqueeze(-1) * self.num_scale + self.num_shift)  # (B, F_num, e)
        x = torch.cat(fields, dim=1)  # (B, F, e)
        if self.cfg.tokenizer == "grouped":
            flat = x.flatten(1)  # (B, F·e)
            if self.pad:
                flat = nn.functional.pad(flat, (0, self.pad))
            x = flat.view(flat.shape[0], self.n_tokens, self.slice)  # (B, T, s)
        return torch.einsum("bts,tsd->btd", x, self.tok_weight) + self.tok_bias  # (B, T, D)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        x = self.tokens(cat, num)  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # (B, T_i, D)
        pooled = x.mean(dim=1) if self.cfg.pooling == "mean" else x.flatten(1)
        logits: torch.Tensor = self.head(pooled).squeeze(-1)  # (B,)
        return logits


def build_model(cfg: ModelConfig, spec: FeatureSpec) -> RecModel:
    """Build the model ``cfg`` describes for a dataset laid out as ``spec``."""
    return RecModel(cfg, spec)
