"""``scripts/train.py``: train every stage of a run config, evaluate, print the result table."""

from __future__ import annotations

import argparse
import sys

from ..config import add_config_arguments, config_from_args
from ..evaluation import format_table
from ..utils import setup_logging
from .runner import is_main_process, run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a vlmzoo model through every stage of a run config, then evaluate it.",
        epilog="Example: scripts/train.py --arch llava   |   scripts/train.py --config configs/llava/tiny.yaml "
        "training.stages.1.max_steps=100",
    )
    add_config_arguments(parser)
    parser.add_argument("--output-dir", help="run folder (default: outputs/<name>-<config hash>)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a config or data error (by default: one line naming the key, file or record)")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow the flags
    if args.config is None and args.arch is None:
        parser.error("give --arch NAME or --config FILE")
    setup_logging()

    cfg = config_from_args(args, [f"output.dir={args.output_dir}"] if args.output_dir else [])
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if is_main_process():
        print(f"Run folder: {cfg.output.dir}", flush=True)
    result = run_training(cfg, evaluate=not args.no_eval)
    if not is_main_process():
        return 0
    for stage in result.stages:
        state = "skipped (already complete)" if stage.skipped else f"{stage.metrics.get('runtime_s')} s in this run"
        print(f"stage {stage.name}: {stage.metrics.get('global_step')} steps, final loss "
              f"{stage.metrics.get('last_logged_loss')}, {state}")
    if result.eval_metrics is not None:
        print()
        print(format_table(result.eval_metrics))
        print(f"\nEval metrics: {result.output_dir / 'eval' / 'eval_metrics.json'}")
    print(f"Model: {result.final_model_dir}")
    print(f"Resolved config: {result.output_dir / 'resolved_config.yaml'}")
    print(f"Run folder: {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
