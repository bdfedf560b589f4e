#!/usr/bin/env python
"""Answer-to-image attention heat maps of a saved model (or two, side by side).

    python scripts/visualize.py --model outputs/llava-tiny-XXXX/stage2_instruct/final \
        --image photo.png --question "What colour is the square?" --out attention.png
    python scripts/visualize.py --model DIR_A --compare DIR_B --image photo.png --question "..." --out ab.png

See ``vlmzoo_lab.visualize.main`` for every option and docs/visualize.md for what is drawn.
"""

import sys

from vlmzoo_lab.visualize import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
