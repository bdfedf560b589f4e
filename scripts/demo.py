#!/usr/bin/env python
"""Web demo: several saved models answer the same image and question side by side (Gradio, on 127.0.0.1).

    python scripts/demo.py --models outputs/llava-tiny-*/stage2_instruct/final
    python scripts/demo.py --models outputs/study/runs/llava-s0/stage2_instruct/final \
        outputs/study/runs/igva-s0/stage2_instruct/final --port 7860

See ``vlmzoo_lab.demo_app`` for every option and ``vlmzoo_lab.demo`` for what each column shows.
"""

import sys

from vlmzoo_lab.demo_app import main

if __name__ == "__main__":
    sys.exit(main())
