"""``scripts/build_world.py``: build, check or rebuild the tiny world, and ship its pretrained towers."""

from __future__ import annotations

import argparse
import json
import logging

from ..config_tree import apply_override, parse_override
from . import TinyWorldConfig, build_tiny_world, small_test_config
from .files import SHIPPED_DIR, ship


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the tiny world into the cache (or check the cached one). Uses the pretrained towers the "
        "package ships for the default world unless --from-scratch.",
        epilog="Example: scripts/build_world.py --from-scratch --ship   (pretrain here, then ship these towers)",
    )
    parser.add_argument("--cache-dir", help="cache root (default $VLMZOO_CACHE, else ~/.cache/vlmzoo)")
    parser.add_argument("--from-scratch", action="store_true", help="pretrain the tiny CLIP and Llama here")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached world is complete")
    parser.add_argument("--small", action="store_true", help="the seconds-scale test world (small_test_config)")
    parser.add_argument("--ship", action="store_true",
                        help=f"copy the built towers into the package's shipped folder ({SHIPPED_DIR}), replacing the "
                        "world shipped there; needs --from-scratch")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="TinyWorldConfig overrides, dotted (e.g. llm.continue_steps=0 n_train_images=4000)")
    args = parser.parse_intermixed_args(argv)
    if args.ship and not args.from_scratch:
        parser.error("--ship needs --from-scratch (ship towers pretrained by this code)")
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    tree = small_test_config().to_dict() if args.small else {}
    for text in args.overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value)
    config = TinyWorldConfig.from_dict(tree)
    paths = build_tiny_world(args.cache_dir, config, force=args.force, from_scratch=args.from_scratch)
    record = paths.manifest()
    print(json.dumps({"root": str(paths.root), "config_hash": record["config_hash"],
                      "weights_from": record.get("weights_from"), "seconds": record["seconds"]}, indent=2))
    if args.ship:
        print(f"shipped: {ship(paths.root)}")
    return 0
