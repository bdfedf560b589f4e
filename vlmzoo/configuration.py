"""``VLMConfig``: one Hugging Face config nesting the tower, the LLM and the strategy."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .registry import get_strategy_class
from .strategy import InputSpec, StrategyConfig


class VLMConfig(PreTrainedConfig):
    r"""Configuration of a :class:`~vlmzoo.VLMForConditionalGeneration`.

    Args:
        vision_config: tower spec, ``{"backend": "hf" | "timm" | "open_clip", ...}`` (see
            :mod:`vlmzoo.towers.vision`).
        text_config: the LLM's config (any decoder-only ``AutoModelForCausalLM`` model type).
        text_encoder_config: instruction-text encoder spec (see :mod:`vlmzoo.towers.text`),
            needed only by strategies that ask for instruction text features.
        strategy: registered strategy name (required to build a model; a bare ``VLMConfig()``,
            which transformers makes to diff configs against, has none).
        strategy_config: the strategy's own config fields (validated by its dataclass).
        input_spec: what the model's inputs hold (:class:`~vlmzoo.strategy.InputSpec` as a dict:
            visual tokens per image, image views, instruction text and span). Not an input: the
            model writes its strategy's spec here when it is built, so a saved ``config.json``
            carries it and ``VLMProcessor.from_pretrained`` builds from it.
        image_token_id: id of the image placeholder token in the LLM vocabulary.
        image_token: the placeholder's text form.
        freeze_vision_tower: run the tower under ``no_grad`` with frozen weights.
        llm_attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"``.
    """

    model_type = "vlmzoo"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    vision_config: dict | None = None
    text_config: dict | PreTrainedConfig | None = None
    text_encoder_config: dict | None = None
    strategy: str | None = None
    strategy_config: dict | None = None
    input_spec: dict | None = None
    image_token_id: int = 32000
    image_token: str = "<image>"
    freeze_vision_tower: bool = True
    llm_attn_implementation: str = "sdpa"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.vision_config is None:
            self.vision_config = _default_clip_l336()
        # Validate the strategy name and its config now, not at the first forward.
        if self.strategy is not None:
            self.strategy_config = self.get_strategy_config().to_dict()

    def get_strategy_config(self) -> StrategyConfig:
        return get_strategy_class(self.strategy).build_config(self.strategy_config)

    def get_input_spec(self) -> InputSpec:
        """The stored input spec; an error if no model has written one (a config never built into a model)."""
        if self.input_spec is None:
            raise ValueError("This VLMConfig has no input_spec: it is written when a model is built from the config "
                             "(VLMForConditionalGeneration(config) or from_pretrained).")
        return InputSpec.from_dict(self.input_spec, where="config.input_spec")


def _default_clip_l336() -> dict[str, Any]:
    """CLIP ViT-L/14 at 336 px, the tower of LLaVA-1.5."""
    return {
        "backend": "hf",
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 336,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }
