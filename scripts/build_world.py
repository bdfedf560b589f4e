#!/usr/bin/env python
"""Build (or check) the tiny world; rebuild it from scratch; ship its pretrained towers.

    python scripts/build_world.py                          # the default world: data + shipped towers (~1 min)
    python scripts/build_world.py --from-scratch --force   # pretrain the towers here too (~45 min on 2 cores)
    python scripts/build_world.py --from-scratch --ship    # ... and make them the towers the package ships
    python scripts/build_world.py --small                  # the test world (seconds)

See ``vlmzoo.tinyworld.cli`` and docs/tiny_world.md.
"""

import sys

from vlmzoo.tinyworld.cli import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
