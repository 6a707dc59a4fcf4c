"""Name -> block class registry. Fails loudly and lists the valid names."""

from __future__ import annotations

from collections.abc import Callable

from spaces.blocks.base import Block
from spaces.errors import UserError

_REGISTRY: dict[str, type[Block]] = {}


class UnknownBlockError(UserError):
    """An unknown block family name."""


def register_block(name: str) -> Callable[[type[Block]], type[Block]]:
    """Class decorator: make a block family available under ``name``."""

    def deco(cls: type[Block]) -> type[Block]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"block family {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    return deco


def get_block(name: str) -> type[Block]:
    """The block class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY))
        raise UnknownBlockError(f"unknown block family {name!r}; valid families: {valid}") from None


def block_names() -> tuple[str, ...]:
    """Every registered family name, sorted."""
    return tuple(sorted(_REGISTRY))
