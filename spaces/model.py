"""The model frame: embeddings -> tokenizer -> L blocks of one family -> head -> logit.

Only the block slot changes between families (the DLRM ``inter_arch`` pattern). With
``seq_len = K > 0`` the frame also reads each example's behaviour history (BLOCKS.md
section 6) and puts ``T_h`` history tokens before the ``T`` field tokens::

    h_k   = E_item[item_k] + E_action[action_k] (+ E_gap[gap_k])     (B, K, e); E_item is
            the item field's own embedding rows, so history and target share one table
    pool  = chunked mean over K / T_h consecutive steps                (B, T_h, e)
    tok_h = pool W_h + b_h + P                                        (B, T_h, D)
    blocks see [tok_h (oldest .. newest) ‖ field tokens]              (B, T_h + T, D)

``T_h = K`` (no pooling) for the attention family unless ``seq_tokens`` is set: softmax
and HSTU attend over every step with the target's field tokens in view, and ASTRO's
``partitions`` cut the ``K + T`` tokens into contiguous groups, so the last group holds
the most recent history with the field tokens **(choice)**. TokenMixer, UniMixing(-Lite)
and Wukong have per-token weights (and TokenMixer needs ``H = T``), so they get the
history compressed by chunked mean pooling into ``T_h = seq_tokens`` tokens (default
:data:`DEFAULT_SEQ_TOKENS`, capped at ``K``; it must divide ``K``). Padding steps of a
short history (all ids 0) are embedded like any step (action 0 is the padding action):
the token count, hence the cost, is exactly ``K`` whatever the history's true length.
Cost: ``2·T_h·e·D`` FLOPs for ``W_h`` (pooling and sums are element-wise: 0), and the
blocks and head at ``T_h + T`` tokens.

HSTU over a history also gets the paper's relative time bias (``spaces.blocks.attention``):
each token has a time, a history token its step's event time (a pooled token: its chunk's
newest step) and a field token the target's, and every HSTU layer adds a learned scalar
per log bucket of ``|t_i − t_j|`` to its attention scores (0 for pairs with a padding
token). The frame computes the buckets once per forward from the steps' gaps in seconds
(``seq[..., 3]``) and counts each layer's ``1 + N_GAP_BUCKETS`` scalars as dense
parameters; the look-ups are element-wise (0 FLOPs).

The
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
from typing import Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import nn

import spaces.blocks  # noqa: F401  (registers every family)
from spaces.blocks.attention import TIME_BIAS_ROWS, Attention, pair_time_buckets
from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError, ConditionalKnobs
from spaces.blocks.registry import block_names, get_block
from spaces.features import FeatureSpec

__all__ = ["DEFAULT_SEQ_TOKENS", "SEQ_COLUMNS", "ModelConfig", "ModelCost", "RecModel", "build_model",
           "model_cost"]

#: History tokens of families with per-token weights when ``seq_tokens`` is unset.
DEFAULT_SEQ_TOKENS = 4
#: Families that read one token per history step unless ``seq_tokens`` says otherwise.
_FULL_HISTORY_FAMILIES = ("attention",)
#: Columns of a history step: item id, action, gap bucket, gap in seconds.
SEQ_COLUMNS = 4


class ModelConfig(ConditionalKnobs):
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
        seq_len: ``K``, the behaviour-history steps each example reads (0 = none: the
            model is exactly the history-free one). Needs a dataset with sequences.
        seq_tokens: ``T_h``, history tokens after chunked mean pooling (must divide
            ``K``); unset = ``K`` for attention, ``min(K, 4)`` for the other families.
        seq_gap: add a learned embedding of each step's time-gap bucket.
        seq_time_bias: HSTU over a history adds its relative time bias (a learned scalar
            per log-gap bucket of every token pair); ``False`` leaves it out (a model
            trained before the bias existed loads with it off).
        mixer: the validated family config (filled from the family's section).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    # the field tokenizer makes one token per field: a search leaves n_tokens unset then
    conditions: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {
        "n_tokens": ("tokenizer", ("grouped",))}

    block: str
    n_layers: int = Field(2, ge=0, le=64)
    d_model: int = Field(64, ge=1, le=8192)
    n_tokens: int | None = Field(8, ge=1, le=1024)
    embed_dim: int = Field(16, ge=1, le=1024)
    tokenizer: Literal["grouped", "field"] = "grouped"
    pooling: Literal["mean", "flatten"] = "mean"
    head_hidden: tuple[int, ...] = (64,)
    seq_len: int = Field(0, ge=0, le=4096)
    seq_tokens: int | None = Field(None, ge=1, le=4096)
    seq_gap: bool = True
    seq_time_bias: bool = True
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
        """The field-token count ``T`` of this dataset (history tokens not included)."""
        if self.tokenizer == "field":
            return spec.n_fields
        assert self.n_tokens is not None
        return self.n_tokens

    def history_tokens(self) -> int:
        """``T_h``: tokens the history becomes (0 without one; see the module docstring)."""
        if self.seq_len == 0:
            return 0
        if self.seq_tokens is not None:
            return self.seq_tokens
        if self.block in _FULL_HISTORY_FAMILIES:
            return self.seq_len
        return min(self.seq_len, DEFAULT_SEQ_TOKENS)

    def time_bias(self) -> bool:
        """Whether the blocks add HSTU's relative time bias (HSTU over a history)."""
        return (self.seq_time_bias and self.history_tokens() > 0 and self.block == "attention"
                and getattr(self.mixer, "kind", None) == "hstu")

    def check(self, spec: FeatureSpec) -> None:
        """Raise ``BlockDimensionError`` if this config cannot be built for ``spec``."""
        if self.tokenizer == "field" and self.n_tokens not in (None, spec.n_fields):
            raise BlockDimensionError(
                f"tokenizer 'field' makes one token per field ({spec.n_fields}); "
                f"n_tokens={self.n_tokens} contradicts it (leave it unset)"
            )
        if self.seq_len:
            if spec.sequence is None:
                raise BlockDimensionError(
                    f"seq_len={self.seq_len} reads behaviour histories, but the dataset has "
                    "none: load it with sequences=True (data needs user, item and time "
                    "columns), or set seq_len=0")
            if self.seq_len % self.history_tokens():
                raise BlockDimensionError(
                    f"seq_tokens={self.history_tokens()} does not divide seq_len="
                    f"{self.seq_len} (the history is pooled in equal chunks)")
        elif self.seq_tokens is not None:
            raise BlockDimensionError("seq_tokens is set but seq_len is 0 (no history)")
        block_cls = get_block(self.block)
        t = self.tokens_for(spec) + self.history_tokens()
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
        if self.seq_len:  # only with a history, so a history-free config reads as before
            out.update(seq_len=self.seq_len, seq_tokens=self.seq_tokens, seq_gap=self.seq_gap,
                       seq_time_bias=self.seq_time_bias)
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
    embeddings are element-wise (``x_f · w_f + b_f``) and cost 0, like look-ups. With a
    history: ``2·T_h·e·D`` for its projection, and the blocks and head at ``T + T_h``
    tokens; its action and gap tables count as embedding parameters, ``W_h``, ``b_h``
    and the position table ``P`` (``T_h × D``) as dense ones, and so do HSTU's time-bias
    tables (``1 + N_GAP_BUCKETS`` per layer).
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
    th = cfg.history_tokens()
    if th:
        assert spec.sequence is not None  # cfg.check
        params_embedding += e * (spec.sequence.action_rows
                                 + (spec.sequence.gap_rows if cfg.seq_gap else 0))
        flops += 2 * th * e * d
        dense += e * d + d + th * d
        t += th
        if cfg.time_bias():
            dense += cfg.n_layers * TIME_BIAS_ROWS
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
        seq: ``(B, K, 4)`` int64 history steps (item id, action, gap bucket, gap in
            seconds; all 0 = padding), oldest first, when ``cfg.seq_len = K > 0``; else
            omitted (``trainers.sequences.Histories.gather``).
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
        self.seq_len = cfg.seq_len
        self.history_tokens = th = cfg.history_tokens()
        if th:  # created after every history-free weight: K = 0 draws the same init
            assert spec.sequence is not None  # cfg.check
            self.seq_action = nn.Embedding(spec.sequence.action_rows, e)
            nn.init.normal_(self.seq_action.weight, std=0.05)
            if cfg.seq_gap:
                self.seq_gap = nn.Embedding(spec.sequence.gap_rows, e)
                nn.init.normal_(self.seq_gap.weight, std=0.05)
            self.seq_proj = nn.Linear(e, d)  # W_h, b_h
            self.seq_pos = nn.Parameter(torch.zeros(th, d))  # P
            t += th
        block_cls = get_block(cfg.block)
        blocks: list[Block] = []
        for _ in range(cfg.n_layers):
            blocks.append(block_cls(cfg.mixer, t, d))
            if cfg.time_bias():
                assert isinstance(blocks[-1], Attention)
                blocks[-1].use_time_bias()
            t = blocks[-1].out_tokens
        self.time_bias = cfg.time_bias()
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

    def history(self, seq: torch.Tensor) -> torch.Tensor:
        """History tokens ``(B, T_h, D)`` of ``seq`` ``(B, K, 4)`` (module docstring)."""
        assert self.spec.sequence is not None
        b, k, c = seq.shape
        if k != self.seq_len:
            raise ValueError(f"the model reads {self.seq_len} history steps, got {k}")
        if c != SEQ_COLUMNS:
            raise ValueError(f"a history step has {SEQ_COLUMNS} columns (item, action, gap "
                             f"bucket, gap seconds), got {c}")
        offsets: torch.Tensor = self.offsets  # type: ignore[assignment]
        item_offset = offsets[self.spec.sequence.item_field]
        h = self.embedding(seq[..., 0] + item_offset) + self.seq_action(seq[..., 1])  # (B, K, e)
        if self.cfg.seq_gap:
            h = h + self.seq_gap(seq[..., 2])
        th = self.history_tokens
        if th != k:  # chunked mean pooling: K / T_h consecutive steps per token
            h = h.view(b, th, k // th, h.shape[-1]).mean(dim=2)  # (B, T_h, e)
        out: torch.Tensor = self.seq_proj(h) + self.seq_pos  # (B, T_h, D)
        return out

    def time_buckets(self, seq: torch.Tensor) -> torch.Tensor:
        """HSTU's time-bias buckets ``(B, N_b, T_g, T_g)`` over ``[history ‖ fields]``.

        A token's time is minus its gap to the target (``seq[..., 3]``; a pooled token
        takes its chunk's newest step, a field token 0); a history token is padding when
        that step is (action 0).
        """
        b, k, _ = seq.shape
        th = self.history_tokens
        newest = seq[:, k // th - 1::k // th]  # (B, T_h, 4): each chunk's newest step
        time = torch.cat([-newest[..., 3], seq.new_zeros(b, self.n_tokens)], dim=1)  # (B, T)
        pad = torch.cat([newest[..., 1] == 0,
                         torch.zeros(b, self.n_tokens, dtype=torch.bool, device=seq.device)],
                        dim=1)  # (B, T)
        partitions = getattr(self.cfg.mixer, "partitions", 1)
        return pair_time_buckets(time, pad, partitions)

    def forward(self, cat: torch.Tensor, num: torch.Tensor,
                seq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tokens(cat, num)  # (B, T, D)
        buckets = None
        if self.seq_len:
            if seq is None:
                raise ValueError(f"the model reads histories (seq_len={self.seq_len}): pass seq")
            x = torch.cat([self.history(seq), x], dim=1)  # (B, T_h + T, D)
            if self.time_bias:
                buckets = self.time_buckets(seq)  # (B, N_b, T_g, T_g), once for every layer
        for block in self.blocks:
            x = block(x) if buckets is None else block(x, buckets)  # (B, T_i, D)
        pooled = x.mean(dim=1) if self.cfg.pooling == "mean" else x.flatten(1)
        logits: torch.Tensor = self.head(pooled).squeeze(-1)  # (B,)
        return logits


def build_model(cfg: ModelConfig, spec: FeatureSpec) -> RecModel:
    """Build the model ``cfg`` describes for a dataset laid out as ``spec``."""
    return RecModel(cfg, spec)
