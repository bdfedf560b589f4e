#!/usr/bin/env python
"""Merge a run's LoRA adapter into its weights: a plain model folder that loads without peft.

    python scripts/merge_lora.py outputs/llava-tiny_lora-XXXX --output merged/

See ``vlmzoo.merge_lora`` for every option.
"""

import sys

from vlmzoo.merge_lora import main
from vlmzoo.utils import cli_entry

if __name__ == "__main__":
    sys.exit(cli_entry(main))
