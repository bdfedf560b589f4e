"""Per-question-type statistics of a strategy's extra outputs (its declared
:attr:`~vlmzoo.GuidanceStrategy.extra_outputs`, e.g. IGVA's layer weights).

:func:`extras_by_question_type` runs the prefill pass of each evaluation prompt (the prompt the
evaluator generates from) with ``output_strategy_extras=True`` and averages one extra tensor
``(N, K)`` (one row per image) over the images of each question type. ``scripts/strategy_extras.py``
is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from vlmzoo.config import add_config_arguments, config_from_args, prepare_run_files
from vlmzoo.evaluation import (
    EvalRecord,
    _image_first,
    generation_batch,
    load_eval_records,
    load_for_eval,
    model_folder,
    record_images,
)
from vlmzoo.utils import setup_logging


@torch.inference_mode()
def extras_by_question_type(
    model: Any,
    processor: Any,
    records: Sequence[EvalRecord],
    images_dir: str | os.PathLike,
    key: str,
    batch_size: int = 64,
) -> dict[str, dict[str, Any]]:
    """-> ``{question type: {"n": images, "mean": [K floats], "std": [K floats]}}`` plus ``"all"``.

    Records without an image are skipped (the strategy does not run for them).
    """
    model.eval()
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    records = [r for r in records if r.images]
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [record_images(rec, images_dir) for rec in chunk]
        batch = generation_batch(model, processor, [_image_first(r) for r in chunk], images)
        extras = model(**batch, output_strategy_extras=True, logits_to_keep=1).strategy_extras or {}
        if key not in extras:
            raise KeyError(f"Strategy {model.config.strategy!r} returns no extra {key!r}; it returns {sorted(extras)}.")
        values = extras[key].float().cpu()  # (N, K), images in record order
        owners = [rec.question_type for rec in chunk for _ in rec.images]
        for qtype, row in zip(owners, values):
            rows[qtype].append(row)
            rows["all"].append(row)
    out = {}
    for qtype in sorted(rows, key=lambda t: (t == "all", t)):
        stacked = torch.stack(rows[qtype])
        std = stacked.std(dim=0) if len(stacked) > 1 else torch.zeros_like(stacked[0])
        out[qtype] = {"n": len(stacked), "mean": stacked.mean(dim=0).tolist(), "std": std.tolist()}
    return out


def format_extras_table(stats: dict[str, dict[str, Any]], column: str = "w") -> str:
    """A markdown table: one row per question type, one column per entry of the extra."""
    k = len(next(iter(stats.values()))["mean"])
    head = "| question type | n | " + " | ".join(f"{column}{i + 1}" for i in range(k)) + " |"
    rows = [head, "|---|---:|" + "---:|" * k]
    for qtype, s in stats.items():
        name = f"**{qtype}**" if qtype == "all" else qtype
        rows.append(f"| {name} | {s['n']} | " + " | ".join(f"{m:.3f}" for m in s["mean"]) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``scripts/strategy_extras.py``: mean strategy extras per question type of an evaluation set."""
    parser = argparse.ArgumentParser(description="Mean of a strategy's declared extra output (e.g. IGVA's layer weights) "
                                     "per question type.")
    parser.add_argument("--model", required=True, type=model_folder,
                        help="folder of a saved model + processor (e.g. <run>/<stage>/final)")
    parser.add_argument("--data", help="evaluation JSON (default: eval.data of the config)")
    parser.add_argument("--images", help="its image folder (default: eval.images or data.images of the config)")
    parser.add_argument("--key", help="which extra to average (default: the first the strategy declares)")
    parser.add_argument("--max-samples", type=int, help="only the first N records")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", help="write the statistics as JSON here too")
    add_config_arguments(parser, strategy_flag=False)
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow the flags
    setup_logging()
    cfg = config_from_args(args)
    prepare_run_files(cfg)
    data = args.data or cfg.eval.data
    images = args.images or cfg.eval.images or cfg.data.images
    if not data or not images:
        parser.error("give --data and --images, or a --config whose eval section names them")
    model, processor = load_for_eval(args.model)
    declared = {e.key: e for e in model.strategy.extra_outputs}
    key = args.key or next(iter(declared), None)
    if key is None:
        parser.error(f"strategy {model.config.strategy!r} declares no extra outputs; name one with --key")
    records = load_eval_records(data, cfg.eval.question_type_key, args.max_samples)
    stats = extras_by_question_type(model, processor, records, images, key=key, batch_size=args.batch_size)
    print(format_extras_table(stats, declared[key].component if key in declared else "v"))
    if args.output:
        Path(args.output).write_text(json.dumps(stats, indent=2) + "\n")
    return 0
