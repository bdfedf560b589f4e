"""The shared core with the `llava` strategy: shapes, training signal, generation across LLM families,
errors. What every strategy must satisfy (save/load, cached generation, gradient reach): test_conformance.py."""

from __future__ import annotations

import pytest
import torch

from tiny import IMAGE_TOKEN_ID, NUM_PATCHES, TINY_LLMS, VOCAB, left_pad, prompt_ids, tiny_config, tiny_model
from vlmzoo import VLMForConditionalGeneration
from vlmzoo.utils import ConfigKeyError


def _batch(model, pixels, rows=((1, 5, 6), (1, 7, 8, 9, 10))):
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, list(r[:2]), list(r[2:])) for r in rows])
    return ids, mask, pixels[: len(rows)]


def test_forward_shapes_and_visual_tokens(pixels):
    model = tiny_model()
    assert model.strategy.num_visual_tokens == NUM_PATCHES
    ids, mask, pv = _batch(model, pixels)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    assert out.logits.shape == (2, ids.shape[1], VOCAB)
    assert out.image_hidden_states.shape == (2, NUM_PATCHES, TINY_LLMS["llama"]["hidden_size"])


def test_visual_tokens_land_at_placeholders(pixels):
    """The LLM sees the connector's output exactly at the image-token positions."""
    model = tiny_model()
    ids, mask, pv = _batch(model, pixels)
    seen = {}
    hook = model.language_model.model.layers[0].register_forward_pre_hook(
        lambda mod, args: seen.setdefault("h", args[0].detach())
    )
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    hook.remove()
    image_pos = ids == IMAGE_TOKEN_ID
    torch.testing.assert_close(seen["h"][image_pos], out.image_hidden_states.reshape(-1, out.image_hidden_states.shape[-1]))
    text_embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(seen["h"][~image_pos], text_embeds[~image_pos])


def test_loss_finite_and_decreases(pixels):
    model = tiny_model().train()
    ids, mask, pv = _batch(model, pixels)
    labels = ids.masked_fill((ids == IMAGE_TOKEN_ID) | (mask == 0), -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_text_only_batch_gives_the_strategy_exact_zero_gradients():
    model = tiny_model("llava", seed=3).train()
    ids = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 11, 12, 2]])
    out = model(input_ids=ids, labels=ids)
    plain = model.language_model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(out.loss, plain)
    out.loss.backward()
    grads = [p.grad for p in model.strategy.parameters()]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert any(torch.count_nonzero(p.grad) for p in model.language_model.parameters())


@pytest.mark.parametrize("llm", sorted(set(TINY_LLMS) - {"llama"}))  # llama: test_conformance.py
def test_generate_cache_equals_no_cache(llm, pixels):
    model = tiny_model(llm=llm)
    ids, mask, pv = _batch(model, pixels)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**kw, use_cache=True)
    without = model.generate(**kw, use_cache=False)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (2, ids.shape[1] + 6)


@pytest.mark.parametrize("llm", sorted(TINY_LLMS))
def test_left_padded_batch_equals_single(llm, pixels):
    model = tiny_model(llm=llm)
    ids, mask, pv = _batch(model, pixels)
    batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
    for i in range(2):
        keep = mask[i].bool()
        single = model.generate(input_ids=ids[i : i + 1, keep], attention_mask=mask[i : i + 1, keep],
                                pixel_values=pv[i : i + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, -5:], single[0, -5:])


def test_first_generated_logits_equal_full_forward(pixels):
    model = tiny_model()
    ids, mask, pv = _batch(model, pixels)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=1, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=position_ids).logits[:, -1]
    torch.testing.assert_close(out.logits[0], full, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_varies(pixels):
    model = tiny_model()
    ids, mask, pv = _batch(model, pixels)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=8, do_sample=True,
              temperature=2.0, pad_token_id=0)
    torch.manual_seed(0)
    a = model.generate(**kw)
    torch.manual_seed(0)
    b = model.generate(**kw)
    torch.manual_seed(1)
    c = model.generate(**kw)
    greedy = model.generate(**{**kw, "do_sample": False, "temperature": None})
    assert torch.equal(a, b)
    assert not (torch.equal(a, c) and torch.equal(a, greedy))


def test_wrong_number_of_image_tokens_raises(pixels):
    model = tiny_model()
    ids = torch.tensor([prompt_ids(NUM_PATCHES - 1, [1], [5])])
    with pytest.raises(ValueError, match=r"image tokens do not match.*15 image tokens.*1 image\(s\) x 16"):
        model(input_ids=ids, pixel_values=pixels[:1])


def test_image_count_mismatch_raises(pixels):
    model = tiny_model()
    ids = torch.tensor([prompt_ids(NUM_PATCHES, [1], [5])])
    with pytest.raises(ValueError, match=r"16 image tokens, but 2 image\(s\)"):
        model(input_ids=ids, pixel_values=pixels[:2])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=ids)


def test_unknown_strategy_and_config_key_raise():
    with pytest.raises(KeyError, match=r"Unknown strategy 'lava'.*Registered strategies: .*llava"):
        tiny_config(strategy="lava")
    with pytest.raises(ConfigKeyError, match=r"Unknown key 'vision_layers'.*Did you mean 'vision_layer'"):
        tiny_config(strategy_config={"vision_layers": -2})


def test_vision_layer_out_of_range_raises():
    with pytest.raises(ValueError, match="asks for vision layer -9"):
        tiny_model(strategy_config={"vision_layer": -9})


def test_flash_attention_without_package_raises():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn installed: the missing-package error cannot be shown here")
    with pytest.raises(ImportError, match="flash-attn package, which is not installed"):
        tiny_model(llm_attn_implementation="flash_attention_2")


def test_from_components_keeps_pretrained_parts(tmp_path, pixels):
    """Assembling from separately loaded parts keeps their weights bit for bit."""
    from transformers import AutoModelForCausalLM

    from vlmzoo.towers.vision import load_pretrained_vision_tower

    donor = tiny_model(seed=3)
    donor.vision_tower.model.save_pretrained(tmp_path / "tower")
    donor.language_model.save_pretrained(tmp_path / "llm")
    tower = load_pretrained_vision_tower(str(tmp_path / "tower"))
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    model = VLMForConditionalGeneration.from_components(donor.config, vision_tower=tower, language_model=llm).eval()
    for name, tensor in donor.state_dict().items():
        if not name.startswith("strategy."):
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert all(not p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    ids, mask, pv = _batch(model, pixels)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits).all()


def test_high_res_crops_cut_a_given_image_or_the_upsampled_one():
    from vlmzoo.modeling import high_res_crops

    small = torch.randn(2, 3, 4, 4)
    big = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    crops = high_res_crops(small, 2, big)  # (2 * 4, 3, 4, 4): TL, TR, BL, BR of each image
    assert crops.shape == (8, 3, 4, 4)
    torch.testing.assert_close(crops[1], big[0, :, :4, 4:])  # image 0, top right
    torch.testing.assert_close(crops[6], big[1, :, 4:, :4])  # image 1, bottom left
    up = torch.nn.functional.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(high_res_crops(small, 2)[3], up[0, :, 4:, 4:])
    with pytest.raises(ValueError, match=r"pixel_values_hr has shape \(2, 3, 6, 6\); expected \(2, 3, 8, 8\)"):
        high_res_crops(small, 2, torch.zeros(2, 3, 6, 6))
