"""Block families of the unified model space. Importing this registers all of them."""

import importlib

from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import UnknownBlockError, block_names, get_block, register_block

for _family in ("attention", "reference", "tokenmixer", "unimixing", "wukong"):
    importlib.import_module(f"spaces.blocks.{_family}")

__all__ = [
    "Block",
    "BlockConfig",
    "BlockCost",
    "BlockDimensionError",
    "UnknownBlockError",
    "block_names",
    "get_block",
    "register_block",
]
