"""The core's in-LLM hook path, exercised by a toy prefix strategy defined here.

The toy: learnable prefix tokens replace the image placeholders; after decoder layer 0 the
prefix positions receive a projection of the instruction tokens' mean hidden state plus the
pooled image. This is the shape of TA-LLaVA's mechanism, small enough to check by hand. That an
in-LLM strategy leaves the LLM's config unchanged through save/load: test_conformance.py (ta_llava).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tiny import left_pad, prompt_ids, tiny_model
from vlmzoo import GuidanceStrategy, StrategyConfig, StrategyNeeds, StrategyOutput, register_strategy
from vlmzoo.layers import LearnedTokens


@dataclass
class ToyPrefixConfig(StrategyConfig):
    num_tokens: int = 3
    layer: int = 0


@register_strategy("test_toy_prefix")
class ToyPrefix(GuidanceStrategy):
    config_class = ToyPrefixConfig

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.prefix = LearnedTokens(config.num_tokens, dims.llm_hidden_size, std=1.0)
        self.vision = nn.Linear(dims.vision_hidden_size, dims.llm_hidden_size)
        self.text = nn.Linear(dims.llm_hidden_size, dims.llm_hidden_size)
        self.calls: list[int] = []

    @property
    def needs(self):
        return StrategyNeeds(vision_layers=(-2,), instruction_span=True)

    @property
    def num_visual_tokens(self):
        return self.config.num_tokens

    @property
    def adapter_layers(self):
        return (self.config.layer,)

    def forward(self, inputs):
        n, b = inputs.image_batch_index.shape[0], inputs.input_ids.shape[0]
        per_image = self.vision(inputs.vision.layers[-2].mean(1))  # (N, d)
        memory = per_image.new_zeros(b, per_image.shape[1]).index_add(0, inputs.image_batch_index, per_image)  # (B, d)
        context = {"prefix": inputs.image_token_mask, "instruction": inputs.instruction_mask, "memory": memory}
        return StrategyOutput(visual_embeds=self.prefix(n), llm_context=context)

    def adapt(self, layer_idx, hidden_states, context):
        self.calls.append(hidden_states.shape[1])
        ins = context["instruction"].unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
        text = (hidden_states * ins).sum(1) / ins.sum(1).clamp(min=1)  # (B, d)
        update = self.text(text) + context["memory"]  # a sample's images summed; text-only rows: no prefix
        return hidden_states + context["prefix"].unsqueeze(-1) * update.unsqueeze(1)


def _inputs(model, pixels):
    k = model.strategy.num_visual_tokens
    rows = [prompt_ids(k, [1], [5, 6, 7, 3]), prompt_ids(k, [1], [9, 10, 3])]
    ids, mask = left_pad(rows)
    instruction = torch.zeros_like(ids, dtype=torch.bool)
    instruction[0, -4:-1] = True  # tokens 5 6 7
    instruction[1, -3:-1] = True  # tokens 9 10
    return dict(input_ids=ids, attention_mask=mask, instruction_mask=instruction, pixel_values=pixels[:2])


def test_adapter_runs_on_prefill_only_and_cache_is_exact(pixels):
    model = tiny_model("test_toy_prefix", seed=5)
    inputs = _inputs(model, pixels)
    model.strategy.calls.clear()
    cached = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert model.strategy.calls == [inputs["input_ids"].shape[1]]  # once, on the full prompt
    uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_adapter_changes_output_and_gets_gradients(pixels):
    model = tiny_model("test_toy_prefix", seed=5).train()
    inputs = _inputs(model, pixels)
    out = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
    out.loss.backward()
    assert model.strategy.text.weight.grad.abs().sum() > 0
    assert model.strategy.vision.weight.grad.abs().sum() > 0
    # Without the context the hook is a no-op: the plain LLM on the same embeddings differs.
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"]).masked_scatter(
            (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1), out.image_hidden_states
        )
        plain = model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    assert not torch.allclose(plain, out.logits)


def test_response_tokens_do_not_change_prefix_states(pixels):
    """The prefix sits before the text: changing a later (response) token leaves it unchanged."""
    model = tiny_model("test_toy_prefix", seed=5)
    inputs = _inputs(model, pixels)
    a = model(**inputs, output_hidden_states=True).hidden_states
    changed = dict(inputs)
    changed["input_ids"] = inputs["input_ids"].clone()
    changed["input_ids"][:, -1] = 11
    b = model(**changed, output_hidden_states=True).hidden_states
    prefix = inputs["input_ids"] == model.config.image_token_id
    for ha, hb in zip(a, b):
        torch.testing.assert_close(ha[prefix], hb[prefix])


def test_gradient_checkpointing_keeps_adapters(pixels):
    model = tiny_model("test_toy_prefix", seed=5).train()
    inputs = _inputs(model, pixels)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    ref = model(**inputs, labels=labels).loss
    model.activation_checkpointing_enable()
    loss = model(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert model.strategy.text.weight.grad.abs().sum() > 0
