"""Reference scale (CLIP-L/336 + Vicuna-7B) builds on the meta device, for counting without weights.
Every shipped reference config builds on meta: test_conformance.py; configs/llava/reference.yaml's
counts: test_benchmark.py."""

from __future__ import annotations

import torch

from vlmzoo import VLMConfig, VLMForConditionalGeneration

VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                 rms_norm_eps=1e-5)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_reference_llava_on_meta():
    config = VLMConfig(text_config=VICUNA_7B, strategy="llava")  # the default tower is CLIP-L/336
    with torch.device("meta"):
        model = VLMForConditionalGeneration(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.strategy.num_visual_tokens == 576
    connector = _count(model.strategy)
    assert connector == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    llm, tower = _count(model.language_model), _count(model.vision_tower)
    assert llm == 6_738_415_616  # Llama-2-7B / Vicuna-7B
    assert 303_000_000 < tower < 304_500_000  # CLIP ViT-L/14-336 vision tower
    assert _count(model) == llm + tower + connector
