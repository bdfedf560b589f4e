"""``llava`` against transformers' ``LlavaForConditionalGeneration``: same config, same weights.

The reference model is built at the tiny world's sizes, saved, converted with
:mod:`converters.llava_hf` (the path a llava-hf checkpoint takes) and loaded as a vlmzoo
``llava`` model; the two are checked to give the same logits, then timed in turn on the same inputs
by :func:`vlmzoo_lab.benchmark.time_models` (``scripts/benchmark.py --parts transformers``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from converters.llava_hf import convert_llava_hf
from vlmzoo import VLMForConditionalGeneration
from vlmzoo_lab.benchmark import BATCH, synthetic_batch, time_models, tiny_world_config


def llava_vs_transformers(repeats: int = 5, batch: int = BATCH) -> dict[str, Any]:
    """Timings of both models and the ratios ``transformers / ours`` (> 1: ours is faster) for the
    training step (tower frozen in both), prefill and decode per token."""
    ours_config = tiny_world_config("llava")
    vision = {k: v for k, v in ours_config.vision_config.items() if k != "backend"}
    hf_config = LlavaConfig(
        vision_config=vision, text_config=ours_config.text_config.to_dict(), image_token_index=ours_config.image_token_id,
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    theirs = LlavaForConditionalGeneration(hf_config)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(Path(tmp) / "hf")
        convert_llava_hf(Path(tmp) / "hf", Path(tmp) / "ours", save_processor=False)
        ours = VLMForConditionalGeneration.from_pretrained(Path(tmp) / "ours")
    theirs.model.vision_tower.requires_grad_(False)

    prompt = {k: v for k, v in synthetic_batch(ours, 1, seed=1).items() if not k.startswith("instruction")}
    with torch.no_grad():
        ours.eval(), theirs.eval()
        diff = (ours(**prompt).logits - theirs(**prompt).logits).abs().max().item()
    timings = time_models({"ours": ours, "transformers": theirs}, like=ours, batch=batch, repeats=repeats,
                          core_inputs_only=True)
    ratios = {key: timings["transformers"][key] / timings["ours"][key] for key in ("train_step", "prefill", "decode_token")}
    return {"max_abs_logit_difference": diff, "timings": timings, "ratio_transformers_over_ours": ratios}
