"""The two reference families every search trains first: logistic regression and a
factorization machine (Rendle, ICDM 2010), written from their formulas.

They are not searched (no bundled space lists them); they are the yardsticks a searched
model must beat. Both blocks have no parameters of their own: the frame around them
(embedding -> field tokenizer -> block -> linear head) holds the weights, and
:func:`reference_configs` gives the frame settings that make the whole model the textbook
model.

**Logistic regression** (``logreg``): the block sums the field tokens::

    y = Σ_t x_t                                     (B, T, D) -> (B, 1, D)

With ``embed_dim = d_model = 1``, ``tokenizer="field"``, ``pooling="flatten"`` and
``head_hidden=()`` the model is ``logit = c + h·Σ_f (a_f·e_f(x_f) + b_f)``: one weight per
categorical value (the 1-wide embedding row ``e_f``), one per numeric field (its scale),
and a bias. The frame's per-field scales ``a_f``, ``h`` and shifts ``b_f`` multiply or add
to those weights and change nothing the model can express: it is linear in the one-hot
and numeric inputs, i.e. a logistic regression.

**Factorization machine** (``fm``): channel 0 of each token is the first-order weight
``w_t``, channels ``1..D-1`` its factor vector ``v_t`` (rank ``k = D - 1``). The block
computes, in ``O(T·D)`` with the identity ``Σ_{i<j} <v_i, v_j> =
0.5·Σ_k ((Σ_i v_ik)² - Σ_i v_ik²)``::

    s  = Σ_t x_t,   q = Σ_t v_t ⊙ v_t
    y0 = s_0 + 0.5·Σ_k (s_k² - q_k)                 the FM logit (without its bias)
    y  = [y0, s_1, ..., s_{D-1}]                    (B, T, D) -> (B, 1, D)

Channels ``1..`` carry ``Σ_t v_t`` on, so a stacked second block (one token, no pairs)
passes its input through unchanged; under a linear head they add ``<u, Σ_t v_t>``, a
first-order term, so the model stays an FM. With ``tokenizer="field"`` and ``embed_dim =
d_model`` the per-field projection maps each value's embedding row one-to-one onto its
``(w, v)``.

Cost (the module's convention: multiply-add = 2, matrix products only): both sums over
tokens run as one product with a ones vector, so they are counted; the ``O(D)``
combination after them is element-wise::

    logreg   FLOPs per example = 2·T·D             params = 0
    fm       FLOPs per example = 2·T·(2·D - 1)     params = 0
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import register_block

if TYPE_CHECKING:
    from spaces.features import FeatureSpec
    from spaces.model import ModelConfig

__all__ = ["FM_RANK", "REFERENCE_FAMILIES", "FactorizationMachine", "FMConfig", "LogReg",
           "LogRegConfig", "reference_configs"]

#: The reference families, in the order a search trains them.
REFERENCE_FAMILIES: tuple[str, ...] = ("logreg", "fm")
#: The factor rank ``k`` of the reference factorization machine (``d_model = k + 1``).
FM_RANK = 8


class LogRegConfig(BlockConfig):
    """Logistic regression has no knobs: the frame settings make it one."""


class FMConfig(BlockConfig):
    """The factorization machine has no knobs: its rank is ``d_model - 1``."""


def _token_sum(x: torch.Tensor) -> torch.Tensor:
    """``Σ_t x[:, t, :]`` as ``(B, C)``, computed as a product with a ones vector."""
    ones = torch.ones(x.shape[1], 1, dtype=x.dtype, device=x.device)
    return torch.matmul(x.transpose(1, 2), ones).squeeze(-1)  # (B, C, T) @ (T, 1)


@register_block("logreg")
class LogReg(Block):
    """The sum of the field tokens (see the module docstring).

    Forward: ``x (B, T, D) -> (B, 1, D)``.
    """

    Config = LogRegConfig

    @classmethod
    def output_tokens(cls, cfg: LogRegConfig, n_tokens: int, d_model: int) -> int:
        return 1

    @classmethod
    def count_flops(cls, cfg: LogRegConfig, n_tokens: int, d_model: int) -> BlockCost:
        return BlockCost(2 * n_tokens * d_model)

    @classmethod
    def count_params(cls, cfg: LogRegConfig, n_tokens: int, d_model: int) -> int:
        return 0

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {"wide": (LogRegConfig(), 4, 8), "scalar": (LogRegConfig(), 6, 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _token_sum(x).unsqueeze(1)  # (B, 1, D)


@register_block("fm")
class FactorizationMachine(Block):
    """First-order term plus pairwise ``<v_i, v_j>`` interactions of the field tokens, in
    ``O(T·D)`` (see the module docstring).

    Constructor args:
        cfg: ``FMConfig``.
        n_tokens: ``T``, the fields (one token per field in the reference config).
        d_model: ``D >= 2``: channel 0 is the first-order weight, ``1..D-1`` the factors.

    Forward: ``x (B, T, D) -> (B, 1, D)``.
    """

    Config = FMConfig

    @classmethod
    def check(cls, cfg: FMConfig, n_tokens: int, d_model: int) -> None:
        if d_model < 2:
            raise BlockDimensionError(
                f"fm needs d_model >= 2 (channel 0 is the first-order weight, the rest the "
                f"factors), got d_model={d_model}")

    @classmethod
    def output_tokens(cls, cfg: FMConfig, n_tokens: int, d_model: int) -> int:
        return 1

    @classmethod
    def count_flops(cls, cfg: FMConfig, n_tokens: int, d_model: int) -> BlockCost:
        return BlockCost(2 * n_tokens * (2 * d_model - 1))

    @classmethod
    def count_params(cls, cfg: FMConfig, n_tokens: int, d_model: int) -> int:
        return 0

    @classmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        return {"rank8": (FMConfig(), 5, 9), "rank1": (FMConfig(), 3, 2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        v = x[..., 1:]  # (B, T, k) factors
        sums = _token_sum(torch.cat([x, v * v], dim=-1))  # (B, D + k)
        s, q = sums[:, :d], sums[:, d:]  # Σ_t x_t (B, D), Σ_t v_t² (B, k)
        pairs = 0.5 * (s[:, 1:] * s[:, 1:] - q).sum(-1, keepdim=True)  # (B, 1)
        return torch.cat([s[:, :1] + pairs, s[:, 1:]], dim=-1).unsqueeze(1)  # (B, 1, D)


def reference_configs(spec: FeatureSpec) -> dict[str, ModelConfig]:
    """The canonical reference models for a dataset laid out as ``spec``: family name ->
    config (``logreg``: a logistic regression; ``fm``: a factorization machine of rank
    :data:`FM_RANK`), in :data:`REFERENCE_FAMILIES` order.

    Example:
        >>> from spaces import FeatureSpec
        >>> cfgs = reference_configs(FeatureSpec(cardinalities=(10, 3), n_numeric=1))
        >>> [c.block for c in cfgs.values()], cfgs["fm"].d_model
        (['logreg', 'fm'], 9)
    """
    from spaces.model import ModelConfig

    frame = {"n_layers": 1, "n_tokens": None, "tokenizer": "field", "pooling": "flatten",
             "head_hidden": ()}
    widths = {"logreg": 1, "fm": FM_RANK + 1}
    out = {name: ModelConfig(block=name, d_model=widths[name], embed_dim=widths[name], **frame)
           for name in REFERENCE_FAMILIES}
    for cfg in out.values():
        cfg.check(spec)
    return out
