"""recscale's model space: block families, the model frame, cost accounting.

The names below load on first use (PEP 562), so ``spaces.errors`` (the base of every
user-facing error) can be imported without torch: the command line stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spaces.blocks import (
        Block,
        BlockConfig,
        BlockCost,
        BlockDimensionError,
        UnknownBlockError,
        block_names,
        get_block,
    )
    from spaces.features import FeatureSpec
    from spaces.model import ModelConfig, ModelCost, RecModel, build_model, model_cost

_WHERE = {
    **dict.fromkeys(("Block", "BlockConfig", "BlockCost", "BlockDimensionError",
                     "UnknownBlockError", "block_names", "get_block"), "spaces.blocks"),
    "FeatureSpec": "spaces.features",
    **dict.fromkeys(("ModelConfig", "ModelCost", "RecModel", "build_model", "model_cost"),
                    "spaces.model"),
}

__all__ = [
    "Block",
    "BlockConfig",
    "BlockCost",
    "BlockDimensionError",
    "FeatureSpec",
    "ModelConfig",
    "ModelCost",
    "RecModel",
    "UnknownBlockError",
    "block_names",
    "build_model",
    "get_block",
    "model_cost",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spaces' has no attribute {name!r}")
