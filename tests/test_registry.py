"""A strategy defined here, outside vlmzoo/, registers, builds and runs; the registry is strict."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import vlmzoo
from tiny import IMAGE_TOKEN_ID, left_pad, prompt_ids, tiny_model
from vlmzoo import (
    DuplicateStrategyError,
    GuidanceInputs,
    GuidanceStrategy,
    StrategyConfig,
    StrategyNeeds,
    StrategyOutput,
    UnknownStrategyError,
    VLMForConditionalGeneration,
    register_strategy,
)
from vlmzoo.registry import STRATEGIES, StrategyRegistry


@dataclass
class MeanPoolConfig(StrategyConfig):
    num_tokens: int = 4
    vision_layer: int = -1


@register_strategy("test_mean_pool")
class MeanPoolStrategy(GuidanceStrategy):
    """Average-pools the patch tokens into ``num_tokens`` groups, then one linear projection."""

    config_class = MeanPoolConfig

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.proj = nn.Linear(dims.vision_hidden_size, dims.llm_hidden_size)

    @property
    def needs(self):
        return StrategyNeeds(vision_layers=(self.config.vision_layer,))

    @property
    def num_visual_tokens(self):
        return self.config.num_tokens

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        x = inputs.vision.layers[self.config.vision_layer]  # (N, P, D)
        n, p, d = x.shape
        pooled = x.reshape(n, self.config.num_tokens, p // self.config.num_tokens, d).mean(2)
        return StrategyOutput(visual_embeds=self.proj(pooled))


def test_user_strategy_builds_and_runs(pixels, tmp_path):
    assert "test_mean_pool" in vlmzoo.available_strategies()
    model = tiny_model("test_mean_pool", strategy_config={"num_tokens": 2})
    assert model.strategy.num_visual_tokens == 2
    ids, mask = left_pad([prompt_ids(2, [1], [5, 6]), prompt_ids(2, [1, 4], [7])])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:2])
    assert out.logits.shape[:2] == ids.shape
    # Reference computation of the strategy's tokens, by hand.
    with torch.no_grad():
        states = model.vision_tower(pixels[:2])[-1][:, 1:]
        expected = model.strategy.proj(states.reshape(2, 2, -1, states.shape[-1]).mean(2))
    torch.testing.assert_close(out.image_hidden_states, expected)
    model.save_pretrained(tmp_path)
    again = VLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.strategy.config.num_tokens == 2
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask, pixel_values=pixels[:2]).logits, out.logits)


def test_builtin_llava_is_found_through_entry_point():
    import importlib.metadata as md

    declared = {ep.name: ep.value for ep in md.entry_points(group="vlmzoo.strategies")}
    assert declared.get("llava") == "architectures.llava"  # declared like any third-party plug-in
    assert STRATEGIES.get("llava").__module__ == "architectures.llava"


def test_duplicate_name_raises_and_lists_names():
    with pytest.raises(DuplicateStrategyError, match=r"'llava' is already registered .*Registered: .*llava"):

        @register_strategy("llava")
        class Impostor(GuidanceStrategy):
            pass


def test_unknown_name_raises_and_lists_names():
    with pytest.raises(UnknownStrategyError, match=r"Unknown strategy 'nope'\. Registered strategies: .*llava.*test_mean_pool"):
        vlmzoo.get_strategy_class("nope")


def test_the_core_has_no_default_strategy():
    from vlmzoo import VLMConfig

    bare = VLMConfig()  # transformers builds one to diff configs against (its LLM default is 7B: never built)
    assert bare.strategy is None and bare.strategy_config is None
    with pytest.raises(UnknownStrategyError, match=r"No strategy given\. Registered strategies: .*llava"):
        VLMForConditionalGeneration(bare)


def test_register_requires_strategy_subclass():
    with pytest.raises(TypeError, match="must decorate a GuidanceStrategy subclass"):
        register_strategy("not_a_strategy")(object)


def test_third_party_entry_point(monkeypatch):
    """A package exposing a bare class through the entry-point group is registered under its name."""
    import importlib.metadata as md

    class Plugin(MeanPoolStrategy):
        pass

    ep = md.EntryPoint(name="plugin_pool", value="fake_pkg:Plugin", group="vlmzoo.strategies")
    monkeypatch.setattr(md.EntryPoint, "load", lambda self: Plugin if self.name == "plugin_pool" else None)
    monkeypatch.setattr(md, "entry_points", lambda group: [ep])
    registry = StrategyRegistry()
    assert registry.get("plugin_pool") is Plugin
    assert registry.names() == ["plugin_pool"]


def test_global_registry_has_no_strategy_from_core():
    """The core itself registers nothing: every name comes from outside vlmzoo/."""
    for name in STRATEGIES.names():
        assert not STRATEGIES.get(name).__module__.startswith("vlmzoo")


def test_strategy_with_wrong_output_shape_is_caught(pixels):
    @register_strategy("test_bad_shape")
    class BadShape(MeanPoolStrategy):
        def forward(self, inputs):
            out = super().forward(inputs)
            return StrategyOutput(visual_embeds=out.visual_embeds[:, :1])

    try:
        model = tiny_model("test_bad_shape", strategy_config={"num_tokens": 2})
        ids = torch.tensor([prompt_ids(2, [1], [5])])
        with pytest.raises(RuntimeError, match=r"returned visual_embeds of shape \(1, 1, 32\), expected \(1, 2, 32\)"):
            model(input_ids=ids, pixel_values=pixels[:1])
    finally:
        STRATEGIES.unregister("test_bad_shape")
    assert IMAGE_TOKEN_ID not in (0, 1)
