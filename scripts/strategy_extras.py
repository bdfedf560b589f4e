#!/usr/bin/env python
"""Mean of a strategy's declared extra output (e.g. IGVA's layer weights) per question type of an evaluation set.

    python scripts/strategy_extras.py --model outputs/igva-tiny-XXXX/stage2_instruct/final --config configs/igva/tiny.yaml
    python scripts/strategy_extras.py --model DIR --data eval.json --images images/ --key layer_weights --output weights.json

See ``vlmzoo_lab.analysis.main`` for every option.
"""

import sys

from vlmzoo_lab.analysis import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
