"""Block families of the unified model space. Importing this registers all of them."""

from spaces.blocks import attention, tokenmixer, unimixing, wukong  # noqa: F401
from spaces.blocks.base import Block, BlockConfig, BlockCost, BlockDimensionError
from spaces.blocks.registry import UnknownBlockError, block_names, get_block, register_block

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
