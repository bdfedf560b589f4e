"""Tiny configurations shared by the tests: every test model is built from a config with random init."""

from __future__ import annotations

import torch

VOCAB = 128
IMAGE_TOKEN_ID = 127
IMAGE_SIZE = 32
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16

TINY_LLMS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
    "gemma2": dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=16),
}


# A tiny CLIP text tower for strategies that read instruction text: D_t = 32, vocabulary 100, 16 positions.
TINY_CLIP_TEXT = {"backend": "hf", "model_type": "clip_text_model", "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 16,
                  "bos_token_id": 98, "eos_token_id": 99, "pad_token_id": 0}


def tiny_clip_vision_spec(**overrides) -> dict:
    spec = dict(backend="hf", model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4, patch_size=PATCH, image_size=IMAGE_SIZE)
    spec.update(overrides)
    return spec


def tiny_config(strategy: str = "llava", llm: str = "llama", llm_layers: int | None = None, **kwargs):
    """A tiny VLMConfig: tiny CLIP tower (3 layers unless ``vision_config`` says otherwise), tiny ``llm``
    (2 layers, or ``llm_layers``); ``kwargs`` go to VLMConfig (e.g. ``strategy_config``)."""
    from vlmzoo import VLMConfig

    kwargs.setdefault("vision_config", tiny_clip_vision_spec())
    text_config = dict(TINY_LLMS[llm])
    if llm_layers is not None:
        text_config["num_hidden_layers"] = llm_layers
    return VLMConfig(text_config=text_config, image_token_id=IMAGE_TOKEN_ID, strategy=strategy, **kwargs)


def tiny_model(strategy: str = "llava", llm: str = "llama", seed: int = 0, **kwargs):
    from vlmzoo import VLMForConditionalGeneration

    torch.manual_seed(seed)
    return VLMForConditionalGeneration(tiny_config(strategy, llm, **kwargs)).eval()


def prompt_ids(num_visual_tokens: int, prefix: list[int], suffix: list[int]) -> list[int]:
    """A prompt with one image placeholder run between two text spans."""
    return prefix + [IMAGE_TOKEN_ID] * num_visual_tokens + suffix


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> input_ids, attention_mask ``(B, T_max)`` with left padding."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def run_count_params(capsys, *argv: str) -> tuple[dict[str, int], str]:
    """Run ``scripts/count_params.py`` with ``argv`` -> ({row name: parameter count}, printed text)."""
    import importlib.util
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "count_params.py"
    spec = importlib.util.spec_from_file_location("count_params", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(argv)) == 0
    out = capsys.readouterr().out
    return {k: int(v.replace(",", "")) for k, v in re.findall(r"^(\w+) +([\d,]+)$", out, flags=re.M)}, out
