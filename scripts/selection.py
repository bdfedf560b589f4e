#!/usr/bin/env python
"""Accuracy of tiny-world runs on single-object questions by the number of objects in the image,
against the random-object reference (the property read right, the object picked at random).

    python scripts/selection.py outputs/study/llava-s0 outputs/study/crop_tokens-s0

See ``vlmzoo_lab.tinyworld.selection`` for what the reference means.
"""

import sys

from vlmzoo.utils import cli_entry
from vlmzoo_lab.tinyworld.selection import main

if __name__ == "__main__":
    sys.exit(cli_entry(main))
