"""Convert a transformers / llava-hf LLaVA-1.5 checkpoint into a vlmzoo ``llava`` checkpoint.

    python scripts/convert_llava_hf.py --src llava-1.5-7b-hf --dst llava-1.5-7b-vlmzoo [--dtype bfloat16]
    python scripts/convert_llava_hf.py --src llava-1.5-7b-hf --dst unused --dry-run   # print the key mapping

``--src`` is a local directory (download it first, e.g. ``hf download llava-hf/llava-1.5-7b-hf
--local-dir llava-1.5-7b-hf``). The logic lives in :mod:`converters.llava_hf`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from converters.llava_hf import DTYPES, ConversionError, convert_llava_hf
from vlmzoo.utils import cli_entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="llava-hf checkpoint directory (config.json + safetensors)")
    parser.add_argument("--dst", required=True, help="output directory for the vlmzoo checkpoint")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES],
        help="dtype of the written weights; 'auto' keeps the source config's dtype (default: auto)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="output shard size limit, e.g. 5GB, 500MB (default: 5GB)")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the key mapping; write nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in --dst")
    parser.add_argument("--no-processor", action="store_true", help="only copy tokenizer files; do not save a VLMProcessor")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert_llava_hf(
            args.src,
            args.dst,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            dry_run=args.dry_run,
            overwrite=args.overwrite,
            save_processor=not args.no_processor,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    plan = result.plan
    if args.dry_run:
        print(plan.describe())
        print(f"dry run: would write {', '.join(plan.shard_names())} to {args.dst}")
        return 0
    print(
        f"wrote {len(plan.kept)} tensors ({plan.dtype}) in {len(result.weight_files)} file(s) to {result.dst}; "
        f"dropped {len(plan.dropped)}; source layout: {', '.join(plan.layouts)}"
    )
    print(f"copied: {', '.join(result.copied_files) or '(no tokenizer files found)'}")
    if result.processor_saved:
        print("saved a VLMProcessor (vicuna_v1 template)")
    elif not args.no_processor:
        print(f"WARNING: no VLMProcessor saved: {result.processor_error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main))
