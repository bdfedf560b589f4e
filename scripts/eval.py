#!/usr/bin/env python
"""Evaluate a saved model: greedy answers, accuracy per question type, POPE stats, blind control.

    python scripts/eval.py --model outputs/llava-tiny-XXXX/stage2_instruct/final --data eval.json --images images/
    python scripts/eval.py --model DIR --config configs/llava/tiny.yaml eval.batch_size=32

See ``vlmzoo.evaluation.main`` for every option.
"""

import sys

from vlmzoo.evaluation import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
