#!/usr/bin/env python
"""Build a run config's architecture on the meta device (no weights) and print parameter counts.

    python scripts/count_params.py --arch llava --scale reference
    python scripts/count_params.py --config configs/llava/reference.yaml model.strategy_config.connector_depth=1
"""

from __future__ import annotations

import argparse
import sys

from vlmzoo.config import add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.config is None and args.arch is None:
        parser.error("give --arch NAME or --config FILE")
    from vlmzoo.build import build_on_meta
    from vlmzoo.training.groups import group_layout

    model = build_on_meta(config_from_args(args))
    params = dict(model.named_parameters())
    layout = group_layout(model)
    print(f"{'module group':<16} {'parameters':>16}")
    for name, names in layout.groups.items():
        if names:
            print(f"{name:<16} {sum(params[n].numel() for n in names):>16,}")
    print(f"{'total':<16} {sum(p.numel() for p in params.values()):>16,}")
    print(f"visual tokens per image: {model.strategy.num_visual_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
