#!/usr/bin/env python
"""Compare strategies: train and evaluate each with the same data, budget and seeds; table, CSV, plots.

    python scripts/compare.py --archs llava tg_llava ta_llava igva dense_connector --seeds 3
    python scripts/compare.py --archs llava igva --seed-list 0 1 --out outputs/study training.stages.1.max_steps=500

Re-running the same command reuses finished runs. See ``vlmzoo.study`` for every output and column.
"""

import sys

from vlmzoo.study import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
