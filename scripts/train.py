#!/usr/bin/env python
"""Train every stage of a run config, evaluate, print accuracy per question type next to a blind control.

    python scripts/train.py --arch llava                      # configs/llava/tiny.yaml (builds the tiny world)
    python scripts/train.py --config configs/llava/tiny.yaml training.stages.1.max_steps=500
    torchrun --nproc_per_node 8 scripts/train.py --arch llava --scale reference

See ``vlmzoo.training.cli`` for every option.
"""

import sys

from vlmzoo.training.cli import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
