"""The one contract every feature-mixing block family follows.

A block maps feature tokens ``(B, T_in, D) -> (B, T_out, D)``. Its cost and size are
known *before* it is built, from its config and dimensions alone, through three
classmethods; the searcher uses them to reject configs over the serving cap without
allocating anything, and the contract test checks them against the built module.

FLOPs convention (ARCHITECTURE.md): a multiply-add is 2 FLOPs and only matrix products
(linear layers, einsum contractions, batched matmuls, attention products) are counted —
the same set ``torch.utils.flop_counter.FlopCounterMode`` counts. Element-wise work
(activations, norms, softmax, Sinkhorn iterations, residual adds) is not counted.
Input-independent work (e.g. building a mixing matrix from shared bases) runs once per
forward pass whatever the batch size, so it is reported separately as ``per_batch``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from spaces.errors import UserError


class ConditionalKnobs(BaseModel):
    """A config some of whose knobs only matter for some values of another of its knobs.

    ``conditions`` names them: ``{"ffn_mult": ("kind", ("softmax",))}`` means ``ffn_mult``
    is read only when ``kind`` is ``softmax``. A search samples such a knob only when it
    is active, so no trial is spent on a value the model ignores.
    """

    conditions: ClassVar[dict[str, tuple[str, tuple[Any, ...]]]] = {}

    @classmethod
    def is_active(cls, knob: str, values: dict[str, Any]) -> bool:
        """Whether ``knob`` is read, given the other knob ``values`` (a parent knob that
        is absent counts as its default)."""
        if knob not in cls.conditions:
            return True
        parent, allowed = cls.conditions[knob]
        value = values.get(parent, cls.model_fields[parent].default)
        return value in allowed


class BlockConfig(ConditionalKnobs):
    """Base of every family's frozen, typed config: unknown keys are errors; a knob
    read only for some values of another is named in ``conditions``
    (:class:`ConditionalKnobs`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BlockDimensionError(UserError):
    """A block config that cannot be built at the given (tokens, width)."""


@dataclass(frozen=True)
class BlockCost:
    """Analytic forward cost of one block.

    Attributes:
        per_example: matmul FLOPs for one example (multiply-add = 2).
        per_batch: input-independent matmul FLOPs spent once per forward pass.
    """

    per_example: int
    per_batch: int = 0

    def __add__(self, other: BlockCost) -> BlockCost:
        return BlockCost(self.per_example + other.per_example, self.per_batch + other.per_batch)


class Block(nn.Module, ABC):
    """A feature-mixing block: ``(B, T_in, D) -> (B, T_out, D)``.

    Subclasses set ``Config`` (their ``BlockConfig`` subclass) and implement the
    classmethods below from formulas, never by inspecting a built module.
    """

    Config: ClassVar[type[BlockConfig]]

    def __init__(self, cfg: Any, n_tokens: int, d_model: int) -> None:
        super().__init__()
        type(self).check(cfg, n_tokens, d_model)
        self.cfg = cfg
        self.n_tokens = n_tokens
        self.d_model = d_model
        self.out_tokens = type(self).output_tokens(cfg, n_tokens, d_model)

    @classmethod
    def check(cls, cfg: Any, n_tokens: int, d_model: int) -> None:
        """Raise ``BlockDimensionError`` with a clear message if the dims do not fit."""

    @classmethod
    def output_tokens(cls, cfg: Any, n_tokens: int, d_model: int) -> int:
        """Number of tokens the block emits (most families keep ``n_tokens``)."""
        return n_tokens

    @classmethod
    @abstractmethod
    def count_flops(cls, cfg: Any, n_tokens: int, d_model: int) -> BlockCost:
        """Analytic matmul FLOPs of one forward pass (see the module docstring)."""

    @classmethod
    @abstractmethod
    def count_params(cls, cfg: Any, n_tokens: int, d_model: int) -> int:
        """Exact number of trainable parameters, from the formula."""

    @classmethod
    @abstractmethod
    def variants(cls) -> dict[str, tuple[BlockConfig, int, int]]:
        """Small named examples ``name -> (config, n_tokens, d_model)`` covering every
        variant of the family; the contract test runs over all of them."""

    def set_progress(self, fraction: float) -> None:  # noqa: B027 - optional hook
        """Training progress in ``[0, 1]``, for schedules such as temperature annealing."""
