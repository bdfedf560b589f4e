#!/usr/bin/env python
"""Mean IGVA layer weights (or another strategy extra) per question type of an evaluation set.

    python scripts/layer_weights.py --model outputs/igva-tiny-XXXX/stage2_instruct/final --config configs/igva/tiny.yaml
    python scripts/layer_weights.py --model DIR --data eval.json --images images/ --output weights.json

See ``vlmzoo.analysis.main`` for every option.
"""

import sys

from vlmzoo.analysis import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
