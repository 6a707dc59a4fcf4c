"""The one base class of every user-facing error (the bottom of the package graph).

``spaces`` is the lowest package, so the base lives here; ``trainers.contracts``
re-exports it for everyone above.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with what the user asked for (a file, a flag, a budget).

    Every package's user-facing error derives from it, so the command line reports any
    of them as one line ``recscale: error: ...`` and exit status 2 without importing the
    package that raised it. The message is one line.
    """
