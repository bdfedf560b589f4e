#!/usr/bin/env python
"""Cost benchmark of every strategy: reference scale on the meta device, tiny scale on this CPU,
and ``llava`` against transformers' Llava at an identical config. Writes JSON + Markdown.

    python scripts/benchmark.py                          # everything, outputs/benchmark/
    python scripts/benchmark.py --parts reference        # FLOPs and parameters only (seconds)
    python scripts/benchmark.py --archs llava tg_llava --repeats 3

See docs/performance.md for what the numbers mean.
"""

from __future__ import annotations

import sys

from vlmzoo.benchmark_report import main

if __name__ == "__main__":
    sys.exit(main())
