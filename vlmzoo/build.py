"""Model assembly from a run config's ``model`` section.

* :func:`build_model_and_processor`: pretrained tower + LLM (+ text encoder) by name or path, a
  fresh strategy, and the matching :class:`~vlmzoo.processing.VLMProcessor`.
* :func:`build_on_meta`: the same architecture on the meta device from explicit configs (no
  weights, no hub), for parameter counts and shape checks at the reference scale.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AddedToken, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .config import ModelSection, RunConfig
from .configuration import VLMConfig
from .modeling import VLMForConditionalGeneration
from .processing import VLMProcessor
from .registry import available_strategies
from .towers.text import load_pretrained_text_encoder, text_encoder_spec_from_pretrained, text_tokenizer_for
from .towers.vision import HFVisionTower, load_pretrained_vision_tower

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"Unknown model.dtype {name!r}; choose one of {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def prepare_tokenizer(tokenizer: Any, image_token: str) -> int:
    """Make sure ``image_token`` is one special token and a pad token exists; -> image token id.

    The pad token defaults to the unk token (LLaVA's choice for Vicuna), else to EOS.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token)


def vlm_config_for(m: ModelSection, vision_spec: dict, text_config: Any, text_encoder_spec: dict | None, image_token_id: int) -> VLMConfig:
    return VLMConfig(
        vision_config=vision_spec,
        text_config=text_config,
        text_encoder_config=text_encoder_spec,
        strategy=m.strategy,
        strategy_config=dict(m.strategy_config),
        image_token_id=image_token_id,
        image_token=m.image_token,
        freeze_vision_tower=m.freeze_vision_tower,
        llm_attn_implementation=m.llm_attn_implementation,
    )


def build_model_and_processor(cfg: RunConfig, template: str = "vicuna_v1"):
    """Pretrained components -> ``(VLMForConditionalGeneration, VLMProcessor)``.

    The tokenizer gains the image token if it lacks one (the LLM's embeddings grow to match).
    """
    m = cfg.model
    _require_strategy(m)
    missing = [k for k in ("vision_tower", "llm") if not getattr(m, k)]
    if missing:
        raise ValueError(
            f"model.{missing[0]} is not set: building from pretrained components needs model.vision_tower and "
            "model.llm (names or paths). Explicit vision_config/text_config only build on the meta device."
        )
    dtype = torch_dtype(m.dtype)
    tower = load_pretrained_vision_tower(m.vision_tower, backend=m.vision_backend).to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or m.llm)
    image_token_id = prepare_tokenizer(tokenizer, m.image_token)
    llm = AutoModelForCausalLM.from_pretrained(m.llm, dtype=dtype, attn_implementation=m.llm_attn_implementation)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    text_encoder = text_tokenizer = None
    if m.text_encoder:
        text_encoder = load_pretrained_text_encoder(m.text_encoder, backend=m.text_encoder_backend).to(dtype)
        text_tokenizer = text_tokenizer_for(text_encoder.spec, m.text_encoder)
    config = vlm_config_for(m, tower.spec, llm.config, None if text_encoder is None else text_encoder.spec, image_token_id)
    model = VLMForConditionalGeneration.from_components(config, tower, llm, text_encoder)
    model.strategy.to(dtype)
    processor = VLMProcessor.for_model(model, tokenizer, text_tokenizer=text_tokenizer, template=template)
    return model, processor


def build_on_meta(cfg: RunConfig) -> VLMForConditionalGeneration:
    """The run's architecture on the meta device (no weights).

    Uses ``model.vision_config`` / ``text_config`` / ``text_encoder_config`` when given, else the
    configs stored with the pretrained paths (local folders or a hub cache). The image token id is
    ``model.image_token_id`` if set, else a new token appended to the LLM vocabulary, as
    :func:`build_model_and_processor` adds one to a tokenizer without it.
    """
    m = cfg.model
    _require_strategy(m)
    vision_spec = dict(m.vision_config) if m.vision_config else _vision_spec_from_pretrained(m)
    text_config = dict(m.text_config) if m.text_config else _require(m, "llm", AutoConfig.from_pretrained).to_dict()
    image_token_id = m.image_token_id
    if image_token_id is None:
        image_token_id = text_config["vocab_size"]
        text_config["vocab_size"] += 1
    text_encoder_spec = dict(m.text_encoder_config) if m.text_encoder_config else None
    if text_encoder_spec is None and m.text_encoder:
        text_encoder_spec = text_encoder_spec_from_pretrained(m.text_encoder, m.text_encoder_backend)
    config = vlm_config_for(m, vision_spec, text_config, text_encoder_spec, image_token_id)
    with torch.device("meta"):
        return VLMForConditionalGeneration(config)


def _require_strategy(m: ModelSection) -> None:
    if m.strategy is None:
        raise ValueError(
            "model.strategy is not set (give --arch NAME or model.strategy=NAME). "
            f"Registered strategies: {', '.join(available_strategies())}."
        )


def _require(m: ModelSection, key: str, loader):
    value = getattr(m, key)
    if not value:
        raise ValueError(f"build_on_meta needs model.{key} or an explicit config for it.")
    return loader(value)


def _vision_spec_from_pretrained(m: ModelSection) -> dict:
    if m.vision_backend != "hf":
        raise ValueError("build_on_meta needs model.vision_config for non-hf vision backends.")
    config = _require(m, "vision_tower", AutoConfig.from_pretrained)
    return HFVisionTower.spec_from_config(getattr(config, "vision_config", None) or config)

