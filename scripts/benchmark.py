#!/usr/bin/env python
"""Cost benchmark of every strategy: reference scale on the meta device, tiny scale on this CPU,
``llava`` against transformers' Llava at an identical config, and (``--parts training``) the
default run's training throughput against transformers' Llava + ``Trainer``. Writes JSON + Markdown.

    python scripts/benchmark.py                          # every part but training, outputs/benchmark/
    python scripts/benchmark.py --parts reference        # FLOPs and parameters only (seconds)
    python scripts/benchmark.py --archs llava tg_llava --repeats 3
    python scripts/benchmark.py --parts training         # the default run's training samples/s vs transformers

See docs/performance.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import logging
import time
from pathlib import Path
from typing import Any

import torch

from vlmzoo import available_strategies
from vlmzoo.utils import cli_entry
from vlmzoo_lab import benchmark as bench
from vlmzoo_lab.llava_throughput import DEFAULT_CONFIG, training_table, training_throughput
from vlmzoo_lab.llava_vs_transformers import llava_vs_transformers

PARTS = ("reference", "tiny", "transformers", "training")  # "training" (minutes, needs the tiny world) only when named


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def reference_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """Parameters and prefill TFLOPs per reference config; each total also as a fraction of the
    baseline strategy's on the same LLM."""
    base_total = {r["llm"]: r["prefill_flops"]["total"] for r in rows if r["config"] == f"{baseline}/reference.yaml"}
    out = [
        f"Prefill: 1 image + {rows[0]['n_text']} text tokens. Parameters in millions, FLOPs in TFLOPs.",
        "",
        f"| config | LLM | visual tokens | tower | strategy | LLM | total params | tower | text enc. | strategy | LLM (+head) | total TFLOPs | vs {baseline} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, f = r["parameters"], r["prefill_flops"]
        strategy_params = p["total"] - p.get("vision_tower", 0) - p.get("text_encoder", 0) - p.get("llm", 0)
        ref = base_total.get(r["llm"])
        versus = "-" if ref is None else f"{f['total'] / ref:.2f}x"
        out.append(
            f"| `{r['config']}` | {r['llm']} | {r['visual_tokens']} | {p.get('vision_tower', 0) / 1e6:.1f} | "
            f"{strategy_params / 1e6:.1f} | {p.get('llm', 0) / 1e6:.1f} | {p['total'] / 1e6:.1f} | "
            f"{f.get('vision_tower', 0) / 1e12:.3f} | {f.get('text_encoder', 0) / 1e12:.3f} | {f.get('strategy', 0) / 1e12:.3f} | "
            f"{f.get('language_model', 0) / 1e12:.3f} | **{f['total'] / 1e12:.3f}** | "
            f"{versus} |"
        )
    return "\n".join(out)


def tiny_table(info: dict[str, dict[str, Any]], batch: int, baseline: str) -> str:
    base = info.get(baseline)
    out = [
        f"Tiny-world sizes, random init. Training step: batch {batch} x ({bench.N_TEXT} text + visual tokens). "
        f"Generation: {bench.NEW_TOKENS} new tokens (greedy) for 1 prompt (latency) and for {batch} prompts "
        "(throughput, as the evaluator decodes), with and without the KV cache. Times in ms, medians.",
        "",
        f"| strategy | visual tokens | params | train step | x {baseline} | prefill | decode / token | "
        "generate 1 (cache / none) | cache speed-up, 1 | tokens/s, batch | cache speed-up, batch | peak train memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in info.items():
        ratio = "-" if base is None else f"{r['train_step'] / base['train_step']:.2f}"
        out.append(
            f"| `{name}` | {r['visual_tokens']} | {r['parameters']:,} | {_ms(r['train_step'])} | {ratio} | "
            f"{_ms(r['prefill'])} | {_ms(r['decode_token'])} | {_ms(r['generate'])} / {_ms(r['generate_no_cache'])} | "
            f"{r['cache_speedup']:.1f}x | {r['batch_tokens_per_s']:.0f} | {r['cache_speedup_batch']:.1f}x | "
            f"{r['peak_memory_mib']:.0f} |"
        )
    return "\n".join(out)


def transformers_table(result: dict[str, Any]) -> str:
    ours, theirs = result["timings"]["ours"], result["timings"]["transformers"]
    ratio = result["ratio_transformers_over_ours"]
    out = [
        f"Same config and weights (max |logit difference| {result['max_abs_logit_difference']:.2e}). "
        "Ratio = transformers / ours: above 1, ours is faster.",
        "",
        "| measure (ms, median) | vlmzoo `llava` | transformers `LlavaForConditionalGeneration` | ratio |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("train_step", "training step"), ("prefill", "prefill"), ("decode_token", "decode, per token")):
        out.append(f"| {label} | {_ms(ours[key])} | {_ms(theirs[key])} | {ratio[key]:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cost benchmark of every strategy (see docs/performance.md).")
    parser.add_argument("--archs", nargs="+", default=None, help="strategies (default: every registered one)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS[:3]))
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median)")
    parser.add_argument("--batch", type=int, default=bench.BATCH, help="training-step batch size at tiny scale")
    parser.add_argument("--out", default="outputs/benchmark", help="folder for benchmark.json and benchmark.md")
    parser.add_argument("--baseline", default="llava", help="strategy the others are compared with (default: llava)")
    parser.add_argument("--training-config", default=None, help="training part: a llava run config (default: configs/llava/tiny.yaml)")
    parser.add_argument("--training-overrides", nargs="+", default=[], metavar="KEY=VALUE", help="training part: config overrides")
    parser.add_argument("--training-steps", type=int, default=150, help="training part: timed steps per side (default: 150)")
    parser.add_argument("--training-warmup", type=int, default=10, help="training part: untimed steps per side and round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    known = available_strategies()
    unknown = [a for a in args.archs or [] if a not in known]
    if unknown:
        parser.error(f"--archs {' '.join(unknown)}: not a registered strategy; available: {', '.join(known)}")
    archs = args.archs or known
    if args.baseline in archs:
        archs = [args.baseline] + [a for a in archs if a != args.baseline]

    result: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": args.repeats}
    sections: list[str] = ["# vlmzoo benchmark", ""]
    start = time.perf_counter()
    if "reference" in args.parts:
        for arch in archs:
            if not bench.reference_config_files([arch]):
                print(f"reference scale: skipping {arch} (it ships no reference*.yaml)")
        rows = [bench.reference_costs(f) for f in bench.reference_config_files(archs)]
        result["reference"] = rows
        sections += ["## Reference scale (meta device)", "", reference_table(rows, args.baseline) if rows else "(none)", ""]
    if "tiny" in args.parts:
        result["tiny"] = bench.tiny_costs(archs, repeats=args.repeats, batch=args.batch)
        sections += ["## Tiny scale (this CPU)", "", tiny_table(result["tiny"], args.batch, args.baseline), ""]
    if "transformers" in args.parts:
        result["transformers"] = llava_vs_transformers(repeats=args.repeats, batch=args.batch)
        sections += ["## `llava` vs transformers' Llava (tiny scale, same run)", "", transformers_table(result["transformers"]), ""]
    if "training" in args.parts:
        result["training"] = training_throughput(args.training_config or DEFAULT_CONFIG, args.training_overrides,
                                                 steps=args.training_steps, warmup=args.training_warmup)
        sections += ["## Training throughput: the default run vs transformers' Llava + Trainer", "",
                     training_table(result["training"]), ""]
    result["seconds"] = time.perf_counter() - start
    sections.append(f"({torch.get_num_threads()} threads, {args.repeats} repetitions, {result['seconds']:.0f} s.)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    markdown = "\n".join(sections) + "\n"
    (out / "benchmark.md").write_text(markdown)
    print(markdown)
    print(f"Written: {out / 'benchmark.json'}, {out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_entry(main))
