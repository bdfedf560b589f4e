#!/usr/bin/env python
"""Build a run config's architecture on the meta device (no weights) and print parameter counts.

    python scripts/count_params.py --arch llava --scale reference
    python scripts/count_params.py --config configs/llava/reference.yaml model.strategy_config.connector_depth=1
    python scripts/count_params.py --arch ta_llava --scale reference --flops 40   # + prefill FLOPs, 1 image + 40 text tokens
"""

from __future__ import annotations

import argparse
import sys

from vlmzoo.config import add_config_arguments, config_from_args
from vlmzoo.utils import cli_entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument(
        "--flops", type=int, metavar="N_TEXT", default=None,
        help="also count the FLOPs of one prefill forward (1 image + N_TEXT text tokens), by module",
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow the flags
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
    if args.flops is not None:
        from vlmzoo.flops import prefill_flops

        flops = prefill_flops(model, args.flops)
        print(f"\nprefill FLOPs, 1 image ({model.strategy.num_visual_tokens} visual tokens) + {args.flops} text tokens:")
        print(f"{'module':<16} {'FLOPs':>22} {'TFLOPs':>8}")
        for name, value in flops.items():
            print(f"{name:<16} {value:>22,} {value / 1e12:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main))
