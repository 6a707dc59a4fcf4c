"""``python -m recscale`` is the ``recscale`` command."""

import sys

from recscale.cli import main

sys.exit(main())
