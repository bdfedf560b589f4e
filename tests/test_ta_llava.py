"""TA-LLaVA (architectures/ta_llava.py): prefix + in-LLM adapters, KV-cache safety, masks, counts,
and each point where the defaults follow the authors' code (docs/ta_llava.md, "Faithfulness").

Tiny models have 6 LLM layers and period 2 unless a test says otherwise, so both adapters run
more than once: text pooling after layers 0, 2, 4 and vision pooling after layers 1, 3.
Save/load, cached generation on Llama and gradient reach per module group are checked for every
strategy by test_conformance.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, TINY_LLMS, left_pad, tiny_clip_vision_spec
from vlmzoo import VLMConfig, VLMForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
PREFIX = 4


def ta_config(llm: str = "llama", layers: int = 6, image_token_id: int = IMAGE_TOKEN_ID, **strategy) -> VLMConfig:
    strategy = {"num_prefix_tokens": PREFIX, "period": 2, **strategy}
    return VLMConfig(
        text_config={**TINY_LLMS[llm], "num_hidden_layers": layers}, vision_config=tiny_clip_vision_spec(),
        image_token_id=image_token_id, strategy="ta_llava", strategy_config=strategy,
    )


def ta_model(llm: str = "llama", seed: int = 0, layers: int = 6, **strategy) -> VLMForConditionalGeneration:
    torch.manual_seed(seed)
    return VLMForConditionalGeneration(ta_config(llm, layers, **strategy)).eval()


def sample(instruction: list[int], response: list[int] = ()) -> tuple[list[int], list[bool]]:
    """Prefix placeholders, BOS, user marker, instruction, assistant marker, response -> ids, instruction flags."""
    ids = [IMAGE_TOKEN_ID] * PREFIX + [1, 4] + instruction + [3] + list(response)
    flags = [False] * (PREFIX + 2) + [True] * len(instruction) + [False] * (1 + len(response))
    return ids, flags


def batch(samples: list[tuple[list[int], list[bool]]], pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Left-padded batch, one image per sample."""
    ids, mask = left_pad([s[0] for s in samples])
    width = ids.shape[1]
    flags = torch.tensor([[False] * (width - len(f)) + f for _, f in samples])
    return dict(input_ids=ids, attention_mask=mask, instruction_mask=flags, pixel_values=pixels[: len(samples)])


PROMPTS = [sample([5, 6, 7, 8, 9]), sample([10, 11]), sample([12, 13, 14])]


def greedy(model, inputs, n: int = 6, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)


# ---- KV-cache safety ------------------------------------------------------------------------------
@pytest.mark.parametrize("llm", ["llama", "qwen2"])  # gemma2: the processor test below
def test_cached_generation_equals_uncached_single_and_left_padded_batch(llm, pixels):
    model = ta_model(llm, seed=12)
    full = batch(PROMPTS, pixels)
    cached = greedy(model, full)
    assert torch.equal(cached, greedy(model, full, use_cache=False))
    for i, prompt in enumerate(PROMPTS):  # each sample alone: no padding, same tokens
        single = batch([prompt], pixels[i : i + 1])
        alone = greedy(model, single)
        assert torch.equal(alone, greedy(model, single, use_cache=False))
        assert torch.equal(alone[0, -6:], cached[i, -6:]), f"sample {i} differs alone vs in the padded batch"


def test_adapters_run_once_on_prefill_only(pixels):
    model = ta_model()
    calls: list[int] = []
    adapt = model.strategy.adapt
    model.strategy.adapt = lambda layer, h, ctx: calls.append(h.shape[1]) or adapt(layer, h, ctx)
    inputs = batch(PROMPTS, pixels)
    greedy(model, inputs, n=4)
    assert calls == [inputs["input_ids"].shape[1]] * len(model.strategy.adapter_layers)


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_first_generated_token_logits_equal_full_forward(llm, pixels):
    model = ta_model(llm, seed=4)
    inputs = batch(PROMPTS, pixels)
    out = greedy(model, inputs, n=1, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
    torch.testing.assert_close(out.logits[0], full, atol=1e-5, rtol=1e-5)


# ---- what the prefix reads -----------------------------------------------------------------------
def _prefix_states(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
    prefix = inputs["input_ids"] == IMAGE_TOKEN_ID
    return [h[prefix] for h in states]


def test_response_and_padding_never_reach_the_prefix(pixels):
    model = ta_model(seed=5)
    base = batch([sample([5, 6, 7], [20, 21, 22]), sample([8, 9], [23, 24])], pixels)
    cut = base["input_ids"].shape[1] - 2  # a response token of both samples
    changed = dict(base, input_ids=base["input_ids"].clone())
    changed["input_ids"][:, cut] = 30
    padded = dict(base, input_ids=base["input_ids"].masked_fill(base["attention_mask"] == 0, 17))
    with torch.no_grad():
        a = model(**base, output_hidden_states=True).hidden_states
        b = model(**changed, output_hidden_states=True).hidden_states
    for ha, hb in zip(a, b):  # every position before the changed token, prefix included
        torch.testing.assert_close(ha[:, :cut], hb[:, :cut], atol=0, rtol=0)
    for pa, pb in zip(_prefix_states(model, base), _prefix_states(model, padded)):
        torch.testing.assert_close(pa, pb)
    # ... while an instruction token does reach it (the text adapter reads the span).
    instr = dict(base, input_ids=base["input_ids"].clone())
    instr["input_ids"][base["instruction_mask"]] = 40
    assert not torch.allclose(_prefix_states(model, base)[-1], _prefix_states(model, instr)[-1])


def test_adapt_updates_only_prefix_positions(pixels):
    model = ta_model(seed=6)
    inputs = batch(PROMPTS, pixels)
    with torch.no_grad():
        out = model.strategy(_guidance_inputs(model, inputs))
        h = torch.randn(*inputs["input_ids"].shape, model.config.text_config.hidden_size)
        for layer in model.strategy.adapter_layers:
            new = model.strategy.adapt(layer, h, out.llm_context)
            prefix = inputs["input_ids"] == IMAGE_TOKEN_ID
            assert torch.equal(new[~prefix], h[~prefix])
            assert not torch.allclose(new[prefix], h[prefix])


def _guidance_inputs(model, inputs):
    from vlmzoo.strategy import GuidanceInputs

    image_mask = inputs["input_ids"] == IMAGE_TOKEN_ID
    return GuidanceInputs(
        vision=model.encode_images(inputs["pixel_values"]),
        image_batch_index=torch.arange(inputs["pixel_values"].shape[0]),
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], image_token_mask=image_mask,
        instruction_mask=inputs["instruction_mask"], llm_embed_tokens=model.get_input_embeddings(),
    )


def test_samples_without_instruction_skip_text_pooling(pixels):
    """A sample without instruction tokens (e.g. `plain` captions under ``first_user_text``): no NaN,
    and the text adapter leaves Y alone."""
    model = ta_model(seed=7).train()
    inputs = batch([sample([], [20, 21]), sample([5, 6], [22])], pixels)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = [p.grad for p in model.strategy.parameters() if p.grad is not None]
    assert out.loss.isfinite() and all(g.isfinite().all() for g in grads)
    model.eval()
    with torch.no_grad():
        ctx = model.strategy(_guidance_inputs(model, inputs)).llm_context
        h = torch.randn(*inputs["input_ids"].shape, model.config.text_config.hidden_size)
        new = model.strategy.adapt(0, h, ctx)  # layer 0: text pooling
        assert torch.equal(new[0], h[0]) and not torch.equal(new[1], h[1])
        nobody = dict(inputs, instruction_mask=torch.zeros_like(inputs["instruction_mask"]))
        ctx = model.strategy(_guidance_inputs(model, nobody)).llm_context
        assert torch.equal(model.strategy.adapt(0, h, ctx), h)


# ---- faithfulness: each point where the defaults compute what the authors' code computes ----------
def _word_tokenizer():
    from test_templates import build_word_tokenizer

    return build_word_tokenizer()


def _gemma_processor(model, tok):
    from vlmzoo.processing import VLMProcessor, make_image_processor

    return VLMProcessor.for_model(model, tok, image_processor=make_image_processor(IMAGE_SIZE), template="gemma2")


def _layer0_input(model, inputs) -> torch.Tensor:
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = model.language_model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["h"]


def test_prefix_enters_layer_0_at_the_embedding_scale(pixels):
    """Reference: the prefix is an nn.Embedding (N(0, 1)) and the whole embedded sequence is
    multiplied by sqrt(d) (Gemma), so the prefix reaches layer 0 with RMS ~ sqrt(d) x 1, as the
    token embeddings are scaled."""
    d = TINY_LLMS["gemma2"]["hidden_size"]
    model = ta_model("gemma2", seed=20)
    inputs = batch(PROMPTS, pixels)
    h0 = _layer0_input(model, inputs)
    prefix = inputs["input_ids"] == IMAGE_TOKEN_ID
    weight = model.strategy.prefix.weight
    torch.testing.assert_close(h0[prefix].view(3, PREFIX, d), (weight * d**0.5).expand(3, -1, -1))
    assert 0.8 < (h0[prefix].pow(2).mean().sqrt() / d**0.5).item() < 1.25  # N(0, 1) rows, times sqrt(d)
    torch.testing.assert_close(h0[~prefix], model.get_input_embeddings()(inputs["input_ids"])[~prefix])  # tokens: x sqrt(d) too
    # Switches: no scale -> the rows as initialised; the older N(0, 0.02) init -> RMS ~ 0.02.
    plain = ta_model("gemma2", seed=20, prefix_embed_scale=False, prefix_init_std=0.02)
    rms = _layer0_input(plain, inputs)[prefix].pow(2).mean().sqrt().item()
    assert 0.015 < rms < 0.025
    # A host without a scaled embedding (Llama) multiplies by 1.
    llama = ta_model("llama", seed=20)
    torch.testing.assert_close(_layer0_input(llama, inputs)[prefix].view(3, PREFIX, -1),
                               llama.strategy.prefix.weight.expand(3, -1, -1))


def test_prefix_opens_the_sequence_before_bos_and_sees_only_itself(pixels):
    """Reference: the 32 prefix tokens come first, before BOS, so each attends only to earlier
    prefix tokens. The processor puts them there (after left padding) because the strategy
    declares it; with prefix_first=False they stand at the <image> placeholder."""
    tok = _word_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    convs = [[{"role": "user", "content": "<image>\nWhat is in the picture?"}], [{"role": "user", "content": "<image>\nHello"}]]
    model = ta_model("gemma2", seed=21, image_token_id=image_id)
    assert model.strategy.needs.visual_tokens_first
    processor = _gemma_processor(model, tok)
    enc = processor.encode(convs[0], add_generation_prompt=True)
    assert enc.input_ids[:PREFIX] == [image_id] * PREFIX
    assert tok.convert_ids_to_tokens(enc.input_ids[PREFIX : PREFIX + 4]) == ["<bos>", "<start_of_turn>", "user", "\n"]
    batch_ = processor(convs, images=[[_image()], [_image()]], add_generation_prompt=True)  # left padded
    for row in range(2):
        first = int(batch_["attention_mask"][row].argmax())
        assert (batch_["input_ids"][row, first : first + PREFIX] == image_id).all()
        assert batch_["input_ids"][row, first + PREFIX] == tok.convert_tokens_to_ids("<bos>")

    def prefix_attention(m, ids):  # layer 0's self-attention output at the prefix rows (before any adapter)
        seen = {}
        handle = m.language_model.model.layers[0].self_attn.register_forward_hook(lambda mod, a, out: seen.setdefault("o", out[0]))
        with torch.no_grad():
            m(**dict(batch_, input_ids=ids))
        handle.remove()
        return seen["o"][ids == image_id]

    changed = batch_["input_ids"].masked_fill(batch_["input_ids"] == tok.convert_tokens_to_ids("<bos>"), tok.convert_tokens_to_ids("user"))
    torch.testing.assert_close(prefix_attention(model, batch_["input_ids"]), prefix_attention(model, changed), atol=0, rtol=0)
    # The switch: the prefix at the placeholder, after "<bos><start_of_turn>user\n", which it then reads.
    at_image = ta_model("gemma2", seed=21, image_token_id=image_id, prefix_first=False)
    processor = _gemma_processor(at_image, tok)
    enc = processor.encode(convs[0], add_generation_prompt=True)
    assert enc.input_ids.index(image_id) == 4 and tok.convert_ids_to_tokens(enc.input_ids[:1]) == ["<bos>"]
    batch_ = processor(convs, images=[[_image()], [_image()]], add_generation_prompt=True)
    changed = batch_["input_ids"].masked_fill(batch_["input_ids"] == tok.convert_tokens_to_ids("<bos>"), tok.convert_tokens_to_ids("user"))
    assert not torch.allclose(prefix_attention(at_image, batch_["input_ids"]), prefix_attention(at_image, changed))


def test_placeholders_not_first_are_an_error(pixels):
    model = ta_model()
    ids = torch.tensor([[1, 4] + [IMAGE_TOKEN_ID] * PREFIX + [5, 3]])
    with pytest.raises(ValueError, match="sample 0's image tokens are not its first tokens"):
        model(input_ids=ids, pixel_values=pixels[:1], instruction_mask=torch.zeros_like(ids, dtype=torch.bool))


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


@pytest.mark.parametrize("llm", ["gemma2", "llama"])
def test_adapter_attention_is_rotary(llm):
    """Reference: the adapters' attention (a Gemma-2 attention) rotates queries (positions 0..Y-1)
    and keys (0..L-1 / 0..S-1), so reordering the keys or the queries changes the output. Without
    RoPE (adapter_rope=False) attention is blind to order: permuted keys give the same output and
    permuted queries the permuted output."""
    from architectures.ta_llava import HostCrossAttentionLayer

    config = ta_config(llm).text_config
    torch.manual_seed(22)
    with_rope = HostCrossAttentionLayer(config, rope=True)
    without = HostCrossAttentionLayer(config, rope=False)
    without.load_state_dict(with_rope.state_dict())
    with torch.no_grad():
        for norm in (with_rope.attn_norm, with_rope.mlp_norm, without.attn_norm, without.mlp_norm):
            norm.weight.fill_(0.5 if llm == "gemma2" else 1.5)  # Gemma-2's zero-init norms hide nothing
    assert with_rope.rope and not without.rope
    d = config.hidden_size
    y, context = torch.randn(2, 5, d) * 3, torch.randn(2, 9, d) * 3
    keys, queries = torch.randperm(9), torch.tensor([4, 3, 2, 1, 0])
    with torch.no_grad():
        out = with_rope(y, context)
        assert not torch.allclose(with_rope(y, context[:, keys]), out, atol=1e-4)
        assert not torch.allclose(with_rope(y[:, queries], context), out[:, queries], atol=1e-4)
        plain = without(y, context)
        torch.testing.assert_close(without(y, context[:, keys]), plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(without(y[:, queries], context), plain[:, queries], atol=1e-5, rtol=1e-5)
    model = ta_model(llm)
    assert model.strategy.text_adapter.rope and model.strategy.vision_adapter.rope
    assert not ta_model(llm, adapter_rope=False).strategy.text_adapter.rope


GEMMA_CONV = [
    {"role": "user", "content": "<image>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A cat on a mat."},
    {"role": "user", "content": "What colour is it?"},
    {"role": "assistant", "content": "It is black."},
]


def test_instruction_span_rule_on_the_gemma_template():
    """Reference: the instruction is every token before the first "model" token -- BOS, the
    template's markers and the first user turn, through the assistant header's <start_of_turn> --
    never the prefix. The switch first_user_text marks only the first user message's text."""
    from vlmzoo.data import TemplateEncoder

    tok = _word_tokenizer()
    image_id, model_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("model")
    reference = TemplateEncoder(tok, "gemma2", num_visual_tokens=PREFIX, instruction_rule="before_reply_role",
                                visual_tokens_first=True)
    for messages, generate in ((GEMMA_CONV, False), (GEMMA_CONV[:1], True)):
        enc = reference.encode(messages, add_generation_prompt=generate)
        text = enc.input_ids[PREFIX:]
        cut = text.index(model_id)  # the reference's rule, applied to the token stream
        assert enc.instruction_mask == [False] * PREFIX + [i < cut for i in range(len(text))]
        assert tok.decode(text[:cut]) == "<bos><start_of_turn>user\n\nWhat is in the picture?<end_of_turn>\n<start_of_turn>"
    ours = TemplateEncoder(tok, "gemma2", num_visual_tokens=PREFIX, instruction_rule="first_user_text", visual_tokens_first=True)
    enc = ours.encode(GEMMA_CONV)
    assert tok.decode([t for t, m in zip(enc.input_ids, enc.instruction_mask) if m]) == "\nWhat is in the picture?"
    # A question holding the role word: the reference's token search would end the span at it;
    # both rules here keep the whole first user turn (docs/ta_llava.md: a reference bug, not copied).
    question = [{"role": "user", "content": "<image>\nmodel one two"}]
    enc = reference.encode(question, add_generation_prompt=True)
    assert tok.decode([t for t, m in zip(enc.input_ids, enc.instruction_mask) if m]).endswith("model one two<end_of_turn>\n<start_of_turn>")
    # The strategy declares its rule; the processor follows it.
    assert ta_model().strategy.needs.instruction_span_rule == "before_reply_role"
    switched = ta_model(image_token_id=image_id, instruction_span="first_user_text")
    assert _gemma_processor(switched, tok).instruction_rule == "first_user_text"
    with pytest.raises(ValueError, match="instruction_span"):
        ta_model(instruction_span="first_turn")


def test_processor_batches_generate_the_same_with_and_without_cache(pixels):
    """The shipped layout end to end: gemma2 template through VLMProcessor.for_model (prefix first,
    the reference's instruction span), a left-padded batch of prompts of different lengths:
    cached == uncached, and each sample alone == in the batch."""
    tok = _word_tokenizer()
    model = ta_model("gemma2", seed=23, image_token_id=tok.convert_tokens_to_ids("<image>"))
    processor = _gemma_processor(model, tok)
    convs = [[{"role": "user", "content": "<image>\nWhat is in the picture? Describe the image."}],
             [{"role": "user", "content": "<image>\nHello"}], [{"role": "user", "content": "<image>\nWhat colour is it?"}]]
    images = [[_image()] for _ in convs]
    inputs = processor(convs, images=images, add_generation_prompt=True)
    # <bos> <start_of_turn> user \n \n QUESTION <end_of_turn> \n <start_of_turn>: the question's tokens + 8
    questions = [c[0]["content"].removeprefix("<image>\n") for c in convs]
    assert inputs["instruction_mask"].sum(1).tolist() == [len(tok(q)["input_ids"]) + 8 for q in questions]
    cached = greedy(model, inputs)
    assert torch.equal(cached, greedy(model, inputs, use_cache=False))
    for i, conv in enumerate(convs):
        alone = greedy(model, processor([conv], images=[images[i]], add_generation_prompt=True))
        assert torch.equal(alone[0, -6:], cached[i, -6:]), f"sample {i} differs alone vs in the padded batch"


# ---- where the adapters run ----------------------------------------------------------------------
@pytest.mark.parametrize(("order", "text", "vision"), [("text_first", [0, 4, 8], [1, 5]),
                                                        ("vision_first", [1, 5], [0, 4, 8])])
def test_insertion_layers_follow_i_mod_k(pixels, order, text, vision):
    """10 layers, k = 4: after layers i < 9 with i % 4 == 0 and i % 4 == 1, never after the last."""
    model = ta_model(layers=10, period=4, order=order)
    ran: list[tuple[int, str]] = []
    layer_of_call: list[int] = []
    adapt = model.strategy.adapt
    model.strategy.adapt = lambda layer, h, ctx: layer_of_call.append(layer) or adapt(layer, h, ctx)
    for name in ("text_adapter", "vision_adapter"):
        getattr(model.strategy, name).register_forward_hook(lambda *_, n=name: ran.append((layer_of_call[-1], n)))
    with torch.no_grad():
        model(**batch(PROMPTS, pixels))
    expected = sorted([(i, "text_adapter") for i in text] + [(i, "vision_adapter") for i in vision])
    assert ran == expected
    assert model.strategy.adapter_layers == tuple(sorted(text + vision))


# ---- host-shaped adapters --------------------------------------------------------------------
@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_adapters_are_shaped_like_a_host_decoder_layer(llm):
    model = ta_model(llm)
    host = model.language_model.model.layers[0]
    for adapter in (model.strategy.text_adapter, model.strategy.vision_adapter):
        assert sum(p.numel() for p in adapter.parameters()) == sum(p.numel() for p in host.parameters())
        assert type(adapter.mlp) is type(host.mlp) and type(adapter.attn_norm) is type(host.input_layernorm)
        assert (adapter.post_attn_norm is not None) == (llm == "gemma2")  # Gemma-2's sandwich norms
        assert adapter.attn.scale == host.self_attn.scaling
        assert (adapter.attn.q_proj.bias is not None) == (host.self_attn.q_proj.bias is not None)
        assert (adapter.attn.o_proj.bias is not None) == (host.self_attn.o_proj.bias is not None)
        # Norms start at their class's own init (Gemma-2: zeros, as it computes x * (1 + w)), also
        # after to_empty + reset_parameters, the path from_components takes.
        expected = torch.zeros if llm == "gemma2" else torch.ones
        adapter.mlp_norm.weight.data.fill_(7.0)
        adapter.reset_parameters()
        assert torch.equal(adapter.mlp_norm.weight, expected(adapter.mlp_norm.weight.shape))
    if llm == "gemma2":
        assert model.strategy.text_adapter.attn.softcap == model.config.text_config.attn_logit_softcapping


# ---- training --------------------------------------------------------------------------------------
def _phase(path: str, index: int):
    from vlmzoo.config import load_run_config

    return load_run_config(REPO / "configs" / "ta_llava" / path).training.stages[index]


def test_reference_curriculum_has_three_phases():
    for path in ("reference.yaml", "reference_vicuna.yaml"):
        phases = [_phase(path, i) for i in range(3)]
        assert [p.lr for p in phases] == [1e-3, 5e-5, 2e-5]
        assert [p.train for p in phases] == [["strategy"], ["strategy"], ["strategy", "llm"]]
        assert phases[0].epochs == 2 and all(p.weight_decay == 0 for p in phases)
        # The reference's images: centre-cropped in phases 1-2 (its default aspect ratio), padded in phase 3.
        assert [p.pad_to_square for p in phases] == [False, False, True]


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(pixels, enable):
    inputs = batch([sample([5, 6, 7], [20, 21]), sample([8, 9], [22, 23, 24])], pixels)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    results = []
    for checkpointing in (False, True):
        model = ta_model("gemma2", seed=10).train()
        if checkpointing:
            with pytest.warns(FutureWarning) if enable == "gradient_checkpointing_enable" else _nothing():
                getattr(model, enable)()
            assert model.language_model.model.layers[0].gradient_checkpointing
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("strategy.text_adapter") for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


def test_tiny_config_trains_both_stages_and_evaluates(tmp_path):
    """configs/ta_llava/tiny.yaml on a seconds-scale tiny world (a 2-layer LLM: text pooling after
    layer 0 only): both stages train, the saved model reloads with its prefix, evaluation runs."""
    import json

    from vlmzoo.config import load_run_config
    from vlmzoo_lab.tinyworld import small_test_config
    from vlmzoo.training import run_training

    overrides = [f"tiny_world.cache_dir={tmp_path / 'world'}", f"tiny_world.config={json.dumps(small_test_config().to_dict())}",
                 f"output.dir={tmp_path / 'run'}", "eval.batch_size=16", "training.disable_tqdm=true"]
    for i in (0, 1):
        overrides += [f"training.stages.{i}.max_steps=2", f"training.stages.{i}.batch_size=4",
                      f"training.stages.{i}.save_steps=2"]
    result = run_training(load_run_config(REPO / "configs" / "ta_llava" / "tiny.yaml", overrides))
    model = VLMForConditionalGeneration.from_pretrained(result.final_model_dir)
    assert model.config.strategy == "ta_llava" and model.strategy.num_visual_tokens == 8
    assert model.strategy.adapter_layers == (0,) and result.eval_metrics["n"] > 0


# ---- reference scale on meta: parameters and prefill FLOPs ------------------------------------------
def _meta(arch: str, scale: str, *overrides: str):
    from vlmzoo.build import build_on_meta
    from vlmzoo.config import strategy_run_config_path, load_run_config

    return build_on_meta(load_run_config(strategy_run_config_path(arch, scale), list(overrides)))


@pytest.mark.parametrize(("scale", "spec", "layers"), [
    ("reference", 78e6, (0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24)),  # Gemma-2-2b: 26 layers
    ("reference_vicuna", 202e6, tuple(sorted([*range(0, 31, 4), *range(1, 31, 4)]))),  # Llama-7B: 32
])
def test_reference_adapter_parameter_counts(scale, spec, layers):
    model = _meta("ta_llava", scale)
    for adapter in (model.strategy.text_adapter, model.strategy.vision_adapter):
        assert abs(sum(p.numel() for p in adapter.parameters()) / spec - 1) < 0.03
    assert model.strategy.adapter_layers == layers and model.strategy.num_visual_tokens == 32


def test_reference_prefill_flops():
    """Gemma-2-2b, 32 prefix + 40 text tokens (LLaVA's count and TA-LLaVA's fraction of it: test_benchmark.py)."""
    from vlmzoo.flops import prefill_flops

    gemma = prefill_flops(_meta("ta_llava", "reference"), 40)
    assert 0.25e12 < gemma["language_model"] < 0.4e12  # spec: about 0.3 (+ LM head 0.085)
    assert 0.08e12 < gemma["strategy"] < 0.12e12  # spec: about 0.1 for the adapters
    assert gemma["total"] == gemma["vision_tower"] + gemma["strategy"] + gemma["language_model"]


def test_count_params_prints_flops(capsys):
    from tiny import run_count_params

    params, out = run_count_params(capsys, "--arch", "ta_llava", "--scale", "reference", "--flops", "40")
    assert set(params) >= {"projector", "prefix", "text_adapter", "vision_adapter", "llm", "total"}
    flops = {k: int(v.replace(",", "")) for k, v in re.findall(r"^(\w+) +([\d,]+) +[\d.]+$", out, flags=re.M)}
    assert flops["total"] == flops["vision_tower"] + flops["strategy"] + flops["language_model"]


def test_soft_capped_attention_path_matches_sdpa():
    """vlmzoo.layers.MultiHeadAttention's eager (soft-capped) path equals its SDPA path when the cap
    is far away, with and without a custom scale."""
    from vlmzoo.layers import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, num_kv_heads=2)
    x, context, mask = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.rand(2, 7) > 0.3
    for scale in (None, 0.1):
        attn.scale, attn.softcap = scale, None
        ref = attn(x, context, mask)
        attn.softcap = 1e9
        torch.testing.assert_close(attn(x, context, mask), ref, atol=1e-5, rtol=1e-5)
    attn.softcap = 0.01  # a tight cap flattens the softmax: every key weighs about the same
    mean_v = attn.v_proj(context).mean(1).view(2, 2, 8).repeat_interleave(2, dim=1).reshape(2, 1, 32)  # per head
    uniform = attn.o_proj(mean_v.expand(-1, 5, -1))
    torch.testing.assert_close(attn(x, context), uniform, atol=1e-2, rtol=1e-2)

