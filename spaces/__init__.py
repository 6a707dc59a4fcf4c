"""recscale's model space: block families, the model frame, cost accounting, search spaces."""

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
