"""Prefill FLOPs of a model built on the meta device, by top-level module.

:func:`prefill_flops` runs one prefill forward (images + text tokens, no cache, logits for every
position) under :class:`torch.utils.flop_counter.FlopCounterMode` on a model from
:func:`vlmzoo.build.build_on_meta`: no weights, no memory, seconds even at 7B. The counter uses
the LLM-Viewer rule (2 x MACs of every matmul, linear, convolution and attention product, the
causal attention counted in full, softmax / norms / activations not counted).

Each FLOP is attributed to the innermost top-level module running it: ``vision_tower``,
``text_encoder``, ``strategy``, ``language_model``. In-LLM adapters run inside the LLM's decoder
layers but belong to the strategy, so they are counted under ``strategy``, not ``language_model``.

Inputs: one row ``[image placeholders x num_visual_tokens per image] + [num_text tokens]``, all text
tokens marked as instruction (an upper bound for instruction-reading strategies).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

TOTAL = "total"


class _SpanAccounting:
    """Exclusive FLOPs per owner: a span's FLOPs minus those of spans opened inside it."""

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter
        self.stack: list[list[Any]] = []  # [owner, flops at entry, flops of inner spans]
        self.flops: dict[str, int] = defaultdict(int)

    def enter(self, owner: str) -> None:
        self.stack.append([owner, self.counter.get_total_flops(), 0])

    def exit(self) -> None:
        owner, start, inner = self.stack.pop()
        span = self.counter.get_total_flops() - start
        self.flops[owner] += span - inner
        if self.stack:
            self.stack[-1][2] += span


def _owned_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(owner, module) pairs to time: the top-level parts, and every strategy submodule (adapters
    are called from inside the LLM, not through the strategy's own ``forward``)."""
    pairs = [(name, getattr(model, name, None)) for name in ("vision_tower", "text_encoder", "language_model")]
    pairs = [(n, m) for n, m in pairs if m is not None]
    return pairs + [("strategy", m) for m in model.strategy.modules()]


def prefill_inputs(model: nn.Module, num_text_tokens: int, num_images: int = 1) -> dict[str, torch.Tensor]:
    """Inputs of a prefill pass on a meta-device model.

    Token-valued tensors (``input_ids``, ``instruction_mask``, ...) stay real CPU tensors: the core
    reads their values (placeholder counts), which meta tensors do not have; the LLM embedding
    and index ops accept them. Images and the 4-D causal mask ``(1, 1, T, T)`` are meta tensors (a
    4-D mask is used as given by transformers, which skips its value-dependent mask checks).
    """
    device = next(model.parameters()).device
    cfg = model.config
    per_image = model.strategy.num_visual_tokens
    text_id = 1 if cfg.image_token_id != 1 else 2
    ids = [cfg.image_token_id] * (per_image * num_images) + [text_id] * num_text_tokens
    input_ids = torch.tensor([ids])
    seq = input_ids.shape[1]
    tower = model.vision_tower
    inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "pixel_values": torch.empty(num_images, 3, tower.image_size, tower.image_size, device=device),
        "attention_mask": torch.zeros(1, 1, seq, seq, device=device, dtype=next(model.language_model.parameters()).dtype),
        "instruction_mask": input_ids != cfg.image_token_id,
    }
    if model.strategy.needs.instruction_text:
        length = max(1, min(num_text_tokens, model.text_encoder.max_length))
        # No instruction_attention_mask: every token is real, and a 2-D mask would make the text
        # model check its values (as the LLM would; see above).
        inputs["instruction_input_ids"] = torch.ones(num_images, length, dtype=torch.long)
    if model.strategy.needs.query_regions:
        inputs["region_mask"] = torch.empty(num_images, tower.num_patches, device=device)
    return inputs


def prefill_flops(model: nn.Module, num_text_tokens: int, num_images: int = 1) -> dict[str, int]:
    """FLOPs of one prefill forward of ``model`` (built on the meta device) by top-level module.

    Returns ``{"vision_tower": ..., ["text_encoder": ...,] "strategy": ..., "language_model": ...,
    "total": ...}`` (language_model includes the LM head over every position; ``other`` appears if
    some FLOPs ran outside all of them).
    """
    if not all(p.is_meta for p in model.parameters()):
        raise ValueError("prefill_flops needs a model on the meta device (vlmzoo.build.build_on_meta).")
    inputs = prefill_inputs(model, num_text_tokens, num_images)
    counter = FlopCounterMode(display=False)
    spans = _SpanAccounting(counter)
    handles = []
    for owner, module in _owned_modules(model):
        handles.append(module.register_forward_pre_hook(lambda *_, o=owner: spans.enter(o)))
        handles.append(module.register_forward_hook(lambda *_: spans.exit()))
    # No autograd: views of parameters (e.g. broadcast learned tokens) would still require grad
    # under no_grad, and the counter's module tracker cannot hook a tensor without a grad_fn.
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        with torch.no_grad(), counter:
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    total = counter.get_total_flops()
    order = [n for n in ("vision_tower", "text_encoder", "strategy", "language_model") if n in spans.flops]
    out = {name: int(spans.flops[name]) for name in order}
    other = total - sum(out.values())
    if other:
        out["other"] = int(other)
    out[TOTAL] = int(total)
    return out
