#!/usr/bin/env python
"""Compare strategies: train and evaluate each with the same data, budget and seeds; table, CSV, plots,
and the claims table (claims.csv: each claim of configs/claims.yaml with its controls and verdict).

    python scripts/compare.py --archs llava tg_llava ta_llava igva dense_connector --seeds 3
    python scripts/compare.py --preset claims --seeds 3 --jobs 2      # every claim's method and controls
    python scripts/compare.py --archs llava igva --seed-list 0 1 --out outputs/study training.stages.1.max_steps=500

Re-running the same command reuses finished runs. See ``vlmzoo_lab.study`` for every output and column,
``vlmzoo_lab.study_claims`` and docs/controls.md for claims.csv.
"""

import sys

from vlmzoo_lab.study import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
