"""`ray stop` for one node of the `ray up` test, which runs on this very machine.

The test's ssh node puts a `ray` shim on the node's PATH and in ~/venv/bin: `ray stop`
lands here and stops the Ray processes (Ray's own list, as `ray stop` does) that carry
this node's marker, instead of every Ray process on the machine. Anything else goes to
the real `ray`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.cluster.procs import MARK, is_ray_process, kill, marked  # noqa: E402


def main() -> int:
    mark = os.environ.get(MARK)
    if not mark:
        print("ray_stop_node: no node marker in the environment; stopping nothing", file=sys.stderr)
        return 1
    victims = [p for p in marked(mark) if is_ray_process(p)]
    left = kill(victims, grace=5.0 if "--force" not in sys.argv else 0.0)
    print(f"Stopped {len(victims) - len(left)} Ray processes of node {mark}.")
    with open(os.path.join(os.environ["HOME"], "ray_stop.log"), "a") as f:
        f.write(f"{' '.join(sys.argv[1:])}: {len(victims)} found, {len(left)} left\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
