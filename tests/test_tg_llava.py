"""The `tg_llava` strategy (TG-FOM + TG-DP) on tiny configs, and its reference-scale size on meta.
Save/load, cached generation, gradient reach and "with TG-DP off a fresh model is llava" (its declared
zero_init_equivalences) are checked for every strategy by test_conformance.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from tiny import IMAGE_TOKEN_ID, NUM_PATCHES, TINY_LLMS, left_pad, prompt_ids, tiny_model
from tiny import TINY_CLIP_TEXT as CLIP_TEXT
from vlmzoo import StrategyNeeds, VLMForConditionalGeneration

LATENTS = 4
TINY_TG = dict(fom_heads=4, fom_ffn_size=64, dp_num_latents=LATENTS, dp_heads=4, dp_kv_heads=2, dp_head_dim=8,
               dp_ffn_size=64)
D_LLM = TINY_LLMS["llama"]["hidden_size"]


def tg_model(seed: int = 0, **strategy_config):
    return tiny_model("tg_llava", seed=seed, text_encoder_config=dict(CLIP_TEXT),
                      strategy_config={**TINY_TG, **strategy_config})


def _batch(model, pixels):
    """Two left-padded prompts, one image each, and each image's instruction (right-padded CLIP ids)."""
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, [1, 5], [6]), prompt_ids(n, [1, 7], [8, 9, 10])])
    text_ids = torch.tensor([[98, 5, 7, 9, 99, 0], [98, 5, 99, 0, 0, 0]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels[:2],
                instruction_input_ids=text_ids, instruction_attention_mask=(text_ids != 0).long())


def _perturb_zero_init(model, seed: int = 5):
    """Give the zero-initialised FOM head non-zero weights, so the FOM branch changes the output."""
    g = torch.Generator().manual_seed(seed)
    head = model.strategy.fom.mask_head
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.5)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.5)


def _forward(model, batch):
    with torch.no_grad():
        return model(**batch)


def test_fresh_tg_llava_base_tokens_equal_llava_with_dp(pixels):
    """With DP on, the first P visual tokens are still llava's; the DP tokens follow them."""
    llava = tiny_model("llava", seed=0)
    tg = tg_model(seed=1)
    tg.load_state_dict(llava.state_dict(), strict=False)
    batch = _batch(tg, pixels)
    base = _batch(llava, pixels)
    a = _forward(llava, {k: base[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    b = _forward(tg, batch)
    torch.testing.assert_close(b.image_hidden_states[:, :NUM_PATCHES], a.image_hidden_states, rtol=0, atol=0)
    assert b.image_hidden_states.shape == (2, NUM_PATCHES + LATENTS, D_LLM)


@pytest.mark.parametrize(("use_fom", "use_dp", "latents"),
                         [(f, d, k) for f, d in itertools.product([True, False], repeat=2) for k in (2, 4)])
def test_token_count_and_needs_for_every_switch(pixels, use_fom, use_dp, latents):
    model = tg_model(use_fom=use_fom, use_dp=use_dp, dp_num_latents=latents)
    expected = NUM_PATCHES + (latents if use_dp else 0)
    assert model.strategy.num_visual_tokens == expected
    needs = model.strategy.needs
    assert needs.vision_layers == (-2,) and needs.high_res_factor == (2 if use_dp else 1)
    assert set(needs.instruction_text) == ({"pooled"} if use_fom else set()) | ({"tokens"} if use_dp else set())
    assert set(model.strategy.module_groups()) == {"connector"} | ({"fom"} if use_fom else set()) | (
        {"dp"} if use_dp else set())
    out = _forward(model, _batch(model, pixels))
    assert out.image_hidden_states.shape == (2, expected, D_LLM)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("mask_padding", [False, True])
def test_dp_reads_the_instruction_and_its_padding_only_if_switched(pixels, mask_padding):
    """DP tokens depend on the instruction tokens. By default the padding is masked, so more padding
    changes nothing; with ``dp_mask_text_padding`` off (the reference's batched training) the
    latents also attend to the padding positions, so more padding changes them."""
    model = tg_model(use_fom=False, dp_mask_text_padding=mask_padding)
    batch = _batch(model, pixels)
    ref = _forward(model, batch).image_hidden_states
    padded = dict(batch, instruction_input_ids=torch.cat([batch["instruction_input_ids"], torch.zeros(2, 3, dtype=torch.long)], 1),
                  instruction_attention_mask=torch.cat([batch["instruction_attention_mask"], torch.zeros(2, 3, dtype=torch.long)], 1))
    more_padding = _forward(model, padded).image_hidden_states
    torch.testing.assert_close(more_padding[:, :NUM_PATCHES], ref[:, :NUM_PATCHES], rtol=0, atol=0)
    if mask_padding:
        torch.testing.assert_close(more_padding, ref, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(more_padding[:, NUM_PATCHES:], ref[:, NUM_PATCHES:], atol=1e-4)
    # What the padding positions hold never matters (masked, or zero features with the switch off: the text-feature
    # cache, which keeps real tokens only, then changes nothing); how many there are does, with the switch off.
    g = torch.Generator().manual_seed(4)
    hr, tokens = torch.randn(2, 4 * NUM_PATCHES, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    junk = torch.where(mask[..., None].bool(), tokens, torch.randn(tokens.shape, generator=g))
    with torch.no_grad():
        dp = model.strategy.dp
        torch.testing.assert_close(dp(hr, junk, mask), dp(hr, tokens, mask), rtol=0, atol=0)
        trimmed = dp(hr[1:], tokens[1:, :2], mask[1:, :2])
        assert torch.allclose(trimmed, dp(hr[1:], tokens[1:], mask[1:]), atol=1e-5) == mask_padding
    other = dict(batch, instruction_input_ids=batch["instruction_input_ids"].flip(0),
                 instruction_attention_mask=batch["instruction_attention_mask"].flip(0))
    changed = _forward(model, other).image_hidden_states
    torch.testing.assert_close(changed[:, :NUM_PATCHES], ref[:, :NUM_PATCHES])  # no FOM: base tokens unchanged
    assert not torch.allclose(changed[:, NUM_PATCHES:], ref[:, NUM_PATCHES:])


def test_dp_feed_forward_has_a_single_skip():
    """Reference (Idefics2 perceiver layer): ``x = x + attn; x = x + SwiGLU(RMSNorm(x))``. With the
    attention's and the SwiGLU's output projections zeroed, a layer is exactly the identity (an
    extra skip inside the feed-forward would add RMSNorm(x) to it)."""
    from architectures.tg_llava import PerceiverLayer, TGLlavaConfig

    torch.manual_seed(0)
    layer = PerceiverLayer(16, TGLlavaConfig(**{**TINY_TG, "dp_heads": 2, "dp_kv_heads": 1}))
    latents, context = torch.randn(2, 3, 16) * 3, torch.randn(2, 5, 16)
    with torch.no_grad():
        layer.attn.o_proj.weight.zero_()
        torch.testing.assert_close(layer(latents, context, None), latents + layer.mlp(layer.ffn_norm(latents)))
        layer.mlp.w3.weight.zero_()
        assert torch.equal(layer(latents, context, None), latents)


def test_dp_rmsnorm_eps_is_the_references():
    """Every RMSNorm of TG-DP uses eps 1e-5 (the Mistral text config inside Idefics2Config): on a
    constant input c the norm gives c / sqrt(c^2 + eps), 0.3015 for c = 1e-3 (0.7071 with 1e-6)."""
    model = tg_model(use_fom=False)
    norms = [m for m in model.strategy.dp.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 7  # latent, context and feed-forward norm of both layers, + the final one
    x = torch.full((1, 2, norms[0].normalized_shape[0]), 1e-3)
    for norm in norms:
        with torch.no_grad():
            out = norm(x) / norm.weight
        torch.testing.assert_close(out, torch.full_like(x, 1e-3 / (1e-6 + 1e-5) ** 0.5))


def _check_reference_init(strategy):
    """TG-DP's position embedding N(0, 1) (nn.Embedding's init); the Q-Former's Linears N(0, 0.02)
    with zero bias (BERT's init); FOM/DP input projections PyTorch's Linear init; latents and
    queries N(0, 0.02); FOM head zero."""
    pos = strategy.dp.pos_embed.weight
    assert pos.numel() >= 2000 and 0.9 < pos.std() < 1.1 and abs(pos.mean()) < 0.05
    for tokens in (strategy.dp.latents.weight, strategy.fom.queries.weight):
        assert 0.015 < tokens.std() < 0.025
    linears = [(n, m) for n, m in strategy.fom.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 4 + 2 * 2  # self-attn x2, cross-attn x1, FFN x2
    weights = torch.cat([m.weight.flatten() for _, m in linears])
    assert 0.019 < weights.std() < 0.021 and abs(weights.mean()) < 1e-3
    for name, m in linears:
        assert m.bias is not None and not m.bias.any(), name
    for proj in (strategy.fom.text_proj, strategy.dp.text_proj):  # nn.Linear default: U(+-1/sqrt(fan_in))
        bound = proj.in_features**-0.5
        assert proj.bias.abs().max() <= bound and proj.bias.std() > bound / 3
        assert 0.9 * bound / 3**0.5 < proj.weight.std() < 1.1 * bound / 3**0.5
    assert not strategy.fom.mask_head.weight.any() and not strategy.fom.mask_head.bias.any()


def test_initialisation_is_the_references(tmp_path):
    """The reference's inits, both when a model is built and when from_pretrained starts the
    strategy fresh over a llava checkpoint (missing modules re-initialised)."""
    _check_reference_init(tg_model(seed=3).strategy)
    tiny_model("llava", seed=0).save_pretrained(tmp_path)
    tg = VLMForConditionalGeneration.from_pretrained(tmp_path, config=tg_model().config)
    _check_reference_init(tg.strategy)


def test_stage1_plain_instruction_is_the_human_turn(pixels):
    """Stage 1 (``plain`` template): the LLM's tokens hold only the image and the caption, but the
    text tower gets the human turn's text without the image token, as the reference's does; two
    captioning prompts then give the same image different FOM masks and DP tokens."""
    from test_templates import build_word_tokenizer
    from vlmzoo import VLMConfig
    from vlmzoo.processing import VLMProcessor

    from tokenizers import processors

    tok = build_word_tokenizer(auto_bos=True)
    text_tok = build_word_tokenizer(auto_bos=True)
    # As CLIP's tokenizer: </s> closes the text, and the text tower pools that token (without it,
    # CLIP pools position 0, the same <s> for both prompts, and FOM could not see them differ).
    bos, eos = text_tok.bos_token_id, text_tok.eos_token_id
    text_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    text_config = dict(TINY_LLMS["llama"], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    from tiny import tiny_clip_vision_spec

    config = VLMConfig(text_config=text_config, vision_config=tiny_clip_vision_spec(), strategy="tg_llava",
                       image_token_id=tok.convert_tokens_to_ids("<image>"),
                       text_encoder_config=dict(CLIP_TEXT, bos_token_id=bos, eos_token_id=eos),
                       strategy_config=dict(TINY_TG))
    torch.manual_seed(0)
    model = VLMForConditionalGeneration(config).eval()
    _perturb_zero_init(model)
    processor = VLMProcessor.for_model(model, tok, text_tokenizer=text_tok, template="plain")
    prompts = ["Describe the image.\n<image>", "<image>\nGive a short caption."]
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": "A dog runs in the park."}]
             for p in prompts]
    from PIL import Image

    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    batch = processor(convs, images=[[image], [image]])
    texts = text_tok.batch_decode(batch["instruction_input_ids"], skip_special_tokens=True)
    assert texts == ["Describe the image.", "Give a short caption."]
    assert "Describe" not in tok.decode(batch["input_ids"][0])  # the LLM never sees it
    out = _forward(model, dict(batch)).image_hidden_states
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert not torch.allclose(out[0, :NUM_PATCHES], out[1, :NUM_PATCHES])  # FOM reads the text
    assert not torch.allclose(out[0, NUM_PATCHES:], out[1, NUM_PATCHES:])  # DP too


def test_fom_trains_through_its_zero_head_and_dp_at_once(pixels):
    model = tg_model().train()
    batch = _batch(model, pixels)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100).masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        if step == 0:
            # Zero-init head: only it gets a gradient inside FOM on the first step; DP trains at once.
            assert model.strategy.fom.mask_head.weight.grad.abs().sum() > 0
            assert model.strategy.fom.text_proj.weight.grad.abs().sum() == 0
            for name, p in model.strategy.dp.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            opt.step()
    for name, p in model.strategy.fom.named_parameters():
        # Cross-attention to ONE text token: softmax over one key is constant, so its query/key
        # projections never get a gradient (as in the reference design).
        if ".cross_attn.q_proj." in name or ".cross_attn.k_proj." in name:
            assert p.grad.abs().max() < 1e-6, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_start_from_llava_checkpoint(tmp_path, pixels):
    """A llava checkpoint loads into tg_llava: shared weights kept, FOM/DP (and text tower) new, FOM head zero."""
    llava = tiny_model("llava", seed=0)
    llava.save_pretrained(tmp_path)
    config = tg_model().config
    tg, info = VLMForConditionalGeneration.from_pretrained(tmp_path, config=config, output_loading_info=True)
    tg.eval()
    missing = set(info["missing_keys"])
    assert missing and all(k.startswith(("strategy.fom.", "strategy.dp.", "text_encoder.")) for k in missing)
    assert "strategy.connector.layers.0.weight" not in missing
    assert tg.strategy.fom.mask_head.weight.abs().sum() == 0
    assert tg.strategy.dp.latents.weight.std() > 0.01  # N(0, 0.02), not left empty or zero
    base = _batch(llava, pixels)
    a = _forward(llava, {k: base[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    b = _forward(tg, _batch(tg, pixels))
    torch.testing.assert_close(b.image_hidden_states[:, :NUM_PATCHES], a.image_hidden_states, rtol=0, atol=0)


def test_init_from_a_llava_folder_reports_loaded_kept_and_dropped(tmp_path, pixels, caplog):
    """The runner's model.init_from path: weights by name over a built tg_llava, with a report."""
    import logging

    from safetensors.torch import save_file

    from vlmzoo.training.runner import load_weights_by_name

    llava = tiny_model("llava", seed=0)
    llava.save_pretrained(tmp_path / "llava")
    tg = tg_model()
    with caplog.at_level(logging.INFO, logger="vlmzoo.training"):
        report = load_weights_by_name(tg, tmp_path / "llava")
    assert set(report["loaded"]) == set(llava.state_dict()) and not report["dropped"]
    assert report["kept"] and all(k.startswith(("strategy.fom.", "strategy.dp.", "text_encoder.")) for k in report["kept"])
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Kept as built (not in the checkpoint): strategy.fom.* (") for m in messages), messages
    tg.eval()
    base = _batch(llava, pixels)
    a = _forward(llava, {k: base[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    b = _forward(tg, _batch(tg, pixels))
    torch.testing.assert_close(b.image_hidden_states[:, :NUM_PATCHES], a.image_hidden_states, rtol=0, atol=0)

    (tmp_path / "bad").mkdir()
    save_file({"strategy.connector.layers.0.weight": torch.zeros(3, 3)}, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors has strategy\.connector\.layers\.0\.weight of shape \(3, 3\)"):
        load_weights_by_name(tg, tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors .* in .*empty"):
        (tmp_path / "empty").mkdir()
        load_weights_by_name(tg, tmp_path / "empty")


def test_needs_a_text_encoder():
    with pytest.raises(ValueError, match="needs an instruction text encoder"):
        tiny_model("tg_llava", strategy_config=TINY_TG)
    # Both switches off: plain llava, no text encoder needed.
    assert tiny_model("tg_llava", strategy_config={"use_fom": False, "use_dp": False}).strategy.num_visual_tokens == NUM_PATCHES


def _oracle_batch(model, pixels, cells=(9, 4)):
    """Two prompts, one image each; each image's region mask marks one patch (row-major index)."""
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, [1, 5], [6]), prompt_ids(n, [1, 7], [8, 9, 10])])
    regions = torch.zeros(2, NUM_PATCHES)
    regions[0, cells[0]] = regions[1, cells[1]] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels[:2], region_mask=regions)


def test_oracle_fom_reads_the_region_mask_not_the_text(pixels):
    """fom_source='oracle': no text encoder, M = region_mask * v; a fresh model is llava (v = 0),
    and once v is non-zero the base tokens follow the mask: only the marked patch's token changes."""
    model = tiny_model("tg_llava", strategy_config={**TINY_TG, "use_dp": False, "fom_source": "oracle"})
    assert model.text_encoder is None and set(model.strategy.module_groups()) == {"connector", "fom"}
    needs = model.strategy.needs
    assert needs.query_regions and needs.instruction_text == () and needs.high_res_factor == 1
    assert model.config.get_input_spec().query_region_grid == 4
    assert [n for n, _ in model.strategy.fom.named_parameters()] == ["v"] and model.strategy.fom.v.abs().sum() == 0

    llava = tiny_model("llava", seed=3)
    model.load_state_dict(llava.state_dict(), strict=False)
    batch = _oracle_batch(model, pixels)
    plain = _forward(llava, {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    torch.testing.assert_close(_forward(model, batch).image_hidden_states, plain.image_hidden_states, rtol=0, atol=0)

    with torch.no_grad():
        model.strategy.fom.v.copy_(torch.randn(model.strategy.fom.v.shape, generator=torch.Generator().manual_seed(0)))
    a = _forward(model, batch)
    moved = _forward(model, _oracle_batch(model, pixels, cells=(9, 15)))  # image 1's mark moves from patch 4 to 15
    torch.testing.assert_close(moved.image_hidden_states[0], a.image_hidden_states[0], rtol=0, atol=0)
    changed = (moved.image_hidden_states[1] - a.image_hidden_states[1]).abs().sum(-1) > 0  # (P,)
    assert changed.nonzero().flatten().tolist() == [4, 15]
    assert not torch.allclose(moved.logits[1], a.logits[1])
    assert not (a.image_hidden_states[0] - plain.image_hidden_states[0]).abs().sum(-1)[[i for i in range(16) if i != 9]].any()


def test_oracle_v_gets_gradient_from_zero_through_the_mask(pixels):
    model = tiny_model("tg_llava", strategy_config={**TINY_TG, "use_dp": False, "fom_source": "oracle"}).train()
    batch = _oracle_batch(model, pixels)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100).masked_fill(
        batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    assert model.strategy.fom.v.grad.abs().sum() > 0
    model.zero_grad()
    model(**{**batch, "region_mask": torch.zeros_like(batch["region_mask"])}, labels=labels).loss.backward()
    assert model.strategy.fom.v.grad.abs().sum() == 0  # no region, no gradient: it comes through the mask


def test_oracle_needs_a_region_mask_of_the_tower_grid(pixels):
    model = tiny_model("tg_llava", strategy_config={**TINY_TG, "use_dp": False, "fom_source": "oracle"})
    batch = _oracle_batch(model, pixels)
    with pytest.raises(ValueError, match=r"reads the query's regions: pass region_mask \(2, 16\)"):
        _forward(model, {k: v for k, v in batch.items() if k != "region_mask"})
    with pytest.raises(ValueError, match=r"region_mask has shape \(2, 9\); expected \(2, 16\)"):
        _forward(model, {**batch, "region_mask": torch.zeros(2, 9)})
    with pytest.raises(ValueError, match=r"strategy_config\[tg_llava\]\.fom_source must be one of 'text', 'oracle', got 'boxes'"):
        tiny_model("tg_llava", strategy_config={**TINY_TG, "use_dp": False, "fom_source": "boxes"})
    # TG-DP still reads the text: then a text encoder is needed again
    with pytest.raises(ValueError, match="needs an instruction text encoder"):
        tiny_model("tg_llava", strategy_config={**TINY_TG, "fom_source": "oracle"})
    both = tiny_model("tg_llava", text_encoder_config=dict(CLIP_TEXT), strategy_config={**TINY_TG, "fom_source": "oracle"})
    assert both.strategy.needs.instruction_text == ("tokens",) and both.strategy.needs.query_regions


def test_a_text_fom_model_has_no_region_input():
    """The default (text) TG-FOM and llava read no regions: their spec has no grid, so no batch gets a region_mask."""
    for model in (tg_model(), tiny_model("llava")):
        assert not model.strategy.needs.query_regions and not model.config.get_input_spec().query_regions


def _fom_params(d_v=1024, d_t=768, p=576, ffn=4096, layers=2, cross_layers=1):
    attn = 4 * (d_v * d_v + d_v) + 2 * d_v  # q, k, v, out + LayerNorm
    ffn_block = d_v * ffn + ffn + ffn * d_v + d_v + 2 * d_v
    return (d_t * d_v + d_v) + p * d_v + 2 * d_v + layers * (attn + ffn_block) + cross_layers * attn + (d_v * d_v + d_v)


def _dp_params(d_v=1024, d_t=768, p=576, d_llm=4096, k=64, heads=16, kv_heads=4, head_dim=96, ffn=4096):
    layer = 3 * d_v + d_v * heads * head_dim * 2 + 2 * d_v * kv_heads * head_dim + 3 * d_v * ffn
    connector = d_v * d_llm + d_llm + d_llm * d_llm + d_llm
    return 4 * p * d_v + 2 * (d_v * d_v + d_v) + (d_t * d_v + d_v) + k * d_v + 2 * layer + d_v + connector


def test_reference_scale_counts_on_meta(capsys):
    """configs/tg_llava/reference.yaml on meta: per-module counts, those of the reference's modules
    that run (its Q-Former also builds weights a queries-only input never uses: docs/tg_llava.md)."""
    from tiny import run_count_params

    counts, out = run_count_params(capsys, "--arch", "tg_llava", "--scale", "reference")
    assert counts["connector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert counts["fom"] == _fom_params() == 31_821_824
    assert counts["dp"] == _dp_params() == 59_328_512
    assert 123_000_000 < counts["text_encoder"] < 124_000_000  # CLIP-L text tower
    assert "visual tokens per image: 640" in out




def test_reference_configs_recipe_and_siglip_variant():
    """Both reference configs: the paper's two-stage recipe; the SigLIP variant builds on meta (729 + 64 tokens)."""
    from pathlib import Path

    from vlmzoo.build import build_on_meta
    from vlmzoo.config import load_run_config

    configs = Path(__file__).resolve().parent.parent / "configs" / "tg_llava"
    for name in ("reference", "reference_siglip"):
        cfg = load_run_config(configs / f"{name}.yaml", resolve_vars=False)
        s1, s2 = cfg.training.stages
        assert (s1.train, s1.lr, s2.train, s2.lr) == (["strategy"], 1e-3, ["strategy", "llm"], 2e-5)
        assert cfg.model.text_encoder == cfg.model.vision_tower
    model = build_on_meta(load_run_config(configs / "reference_siglip.yaml", resolve_vars=False))
    assert model.vision_tower.num_patches == 729 and not model.vision_tower.has_cls
    assert model.text_encoder.hidden_size == 1152
    assert model.strategy.num_visual_tokens == 729 + 64
    assert model.strategy.dp.pos_embed.weight.shape == (4 * 729, 1152)


# config -> (FOM on, DP latents or 0): tiny.yaml is the paper's final row, the others its ablations.
TINY_CONFIGS = {"tiny": (True, 8), "tiny_fom_only": (True, 0), "tiny_dp_only": (False, 8), "tiny_dp4": (True, 4),
                "tiny_dp16": (True, 16), "tiny_dp32": (True, 32)}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    import json

    from vlmzoo_lab.tinyworld import small_test_config

    cache = tmp_path_factory.mktemp("tg_world")
    return [f"tiny_world.cache_dir={cache}", f"tiny_world.config={json.dumps(small_test_config().to_dict())}"]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_configs_train_two_stages_and_evaluate(small_world, tmp_path, name):
    """configs/tg_llava/<name>.yaml on a seconds-scale tiny world: both stages train (the FOM head
    leaves zero), the saved model reloads with its text tower and the right token count, eval runs."""
    from pathlib import Path

    from vlmzoo.config import load_run_config
    from vlmzoo.training import run_training

    fom, latents = TINY_CONFIGS[name]
    repo = Path(__file__).resolve().parent.parent
    overrides = [*small_world, f"output.dir={tmp_path / 'run'}", "eval.batch_size=16"]
    for i in (0, 1):
        overrides += [f"training.stages.{i}.max_steps=2", f"training.stages.{i}.batch_size=4",
                      f"training.stages.{i}.save_steps=2"]
    cfg = load_run_config(repo / "configs" / "tg_llava" / f"{name}.yaml", overrides)
    assert cfg.model.text_encoder == cfg.model.vision_tower  # the tower's own CLIP checkpoint
    result = run_training(cfg)
    model = VLMForConditionalGeneration.from_pretrained(result.final_model_dir)
    assert model.config.strategy == "tg_llava" and model.text_encoder is not None
    assert model.strategy.num_visual_tokens == model.strategy.dims.vision_num_patches + latents
    assert (model.strategy.fom is not None) == fom and (model.strategy.dp is not None) == (latents > 0)
    if fom:
        assert model.strategy.fom.mask_head.weight.abs().sum() > 0
    assert result.eval_metrics["n"] > 0 and set(result.eval_metrics["per_type"]) >= {"colour", "fine"}


def test_processor_truncates_instructions_to_the_text_encoder_limit():
    """for_model: instructions are cut to min(77, the text encoder's positions), so the encoder never
    sees more tokens than it accepts (SigLIP: 64; this tiny CLIP text tower: 16)."""
    from types import SimpleNamespace

    from test_templates import build_word_tokenizer
    from vlmzoo.processing import VLMProcessor
    from vlmzoo.strategy import InputSpec

    tok = build_word_tokenizer()
    config = SimpleNamespace(image_token="<image>", image_token_id=tok.convert_tokens_to_ids("<image>"),
                             strategy="tg_llava", vision_config={},
                             get_input_spec=lambda: InputSpec(num_visual_tokens=3, instruction_text=("pooled",)))
    tower = SimpleNamespace(image_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    model = SimpleNamespace(config=config, vision_tower=tower, text_encoder=SimpleNamespace(max_length=16))
    text_tok = build_word_tokenizer(auto_bos=True)
    p = VLMProcessor.for_model(model, tok, text_tokenizer=text_tok, template="qwen2")
    assert p.text_max_length == 16
    ids, mask = p.tokenize_instructions([" ".join(["one"] * 40)])
    assert ids.shape[1] == 16 and int(mask.sum()) == 16
    model.text_encoder = SimpleNamespace(max_length=512)
    assert VLMProcessor.for_model(model, tok, text_tokenizer=text_tok, template="qwen2").text_max_length == 77
    assert VLMProcessor.for_model(model, tok, text_tokenizer=text_tok, template="qwen2",
                                  text_max_length=8).text_max_length == 8


# ---- native high-resolution input (pixel_values_hr) ------------------------------------------------
def test_high_res_features_come_from_pixel_values_hr(pixels):
    """TG-DP's crops are cut from pixel_values_hr when given: its features differ from those of the
    upsampled base image, and forward hands the strategy exactly encode_images(pixel_values, pixel_values_hr)."""
    import torch.nn.functional as F

    from tiny import IMAGE_SIZE

    model = tg_model()
    needs = model.strategy.needs
    (layer,) = needs.high_res_layers
    hr = torch.randn(2, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        direct = model.encode_images(pixels[:2], needs, hr)
        upsampled = model.encode_images(pixels[:2], needs)
        bilinear = model.encode_images(pixels[:2], needs, F.interpolate(pixels[:2], scale_factor=2, mode="bilinear"))
    assert direct.high_res[layer].shape == (2, 4 * NUM_PATCHES, model.vision_tower.hidden_size)
    assert not torch.allclose(direct.high_res[layer], upsampled.high_res[layer], atol=1e-3)
    assert torch.equal(bilinear.high_res[layer], upsampled.high_res[layer])  # the fallback is that upsampling
    assert torch.equal(direct.layers[layer], upsampled.layers[layer])  # base features do not change

    seen = []
    model.strategy.register_forward_pre_hook(lambda module, args: seen.append(args[0].vision))
    _forward(model, {**_batch(model, pixels), "pixel_values_hr": hr})
    _forward(model, _batch(model, pixels))
    assert torch.equal(seen[0].high_res[layer], direct.high_res[layer])
    assert torch.equal(seen[1].high_res[layer], upsampled.high_res[layer])
    with pytest.raises(ValueError, match=r"pixel_values_hr has shape \(2, 3, 32, 32\); expected \(2, 3, 64, 64\)"):
        _forward(model, {**_batch(model, pixels), "pixel_values_hr": pixels[:2]})


def test_evaluation_passes_pixel_values_hr(tmp_path):
    """generate_answers / evaluate_model with a high-res folder: the model's prefill sees the
    features of the processed 2x images (as training does); a missing 2x file names it and the record."""
    import json

    import numpy as np
    from PIL import Image

    from test_templates import build_word_tokenizer
    from tiny import tiny_clip_vision_spec
    from vlmzoo import VLMConfig
    from vlmzoo.evaluation import _image_first, evaluate_model, generation_batch, load_eval_records
    from vlmzoo.processing import VLMProcessor

    tok = build_word_tokenizer(auto_bos=True)
    text_config = dict(TINY_LLMS["llama"], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = VLMConfig(text_config=text_config, vision_config=tiny_clip_vision_spec(), strategy="tg_llava",
                       image_token_id=tok.convert_tokens_to_ids("<image>"), text_encoder_config=dict(CLIP_TEXT),
                       strategy_config=dict(TINY_TG))
    torch.manual_seed(0)
    model = VLMForConditionalGeneration(config).eval()
    processor = VLMProcessor.for_model(model, tok, text_tokenizer=build_word_tokenizer(auto_bos=True), template="vicuna_v1")
    assert processor.high_res_factor == 2  # from the strategy's needs

    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        big = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        for folder, im in (("images_2x", big), ("images", big.resize((32, 32), Image.Resampling.BOX))):
            (tmp_path / folder).mkdir(exist_ok=True)
            im.save(tmp_path / folder / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A cat."}]})
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))

    seen = []
    model.strategy.register_forward_pre_hook(lambda module, args: seen.append(args[0].vision))
    metrics = evaluate_model(model, processor, data, tmp_path / "images", high_res_images=tmp_path / "images_2x",
                             batch_size=3, max_new_tokens=2)
    assert metrics["n"] == 3 and metrics["generation"]["high_res_images"] == str(tmp_path / "images_2x")
    recs = load_eval_records(data)
    load = lambda folder: [[Image.open(tmp_path / folder / r.images[0]).convert("RGB")] for r in recs]  # noqa: E731
    batch = generation_batch(model, processor, [_image_first(r) for r in recs], load("images"), load("images_2x"))
    assert batch["pixel_values_hr"].shape == (3, 3, 64, 64)
    with torch.no_grad():
        expected = model.encode_images(batch["pixel_values"], model.strategy.needs, batch["pixel_values_hr"])
    (layer,) = model.strategy.needs.high_res_layers
    assert len(seen) == 1 and torch.equal(seen[0].high_res[layer], expected.high_res[layer])  # prefill only

    seen.clear()
    evaluate_model(model, processor, data, tmp_path / "images", batch_size=3, max_new_tokens=2)  # no folder: upsampled
    assert not torch.equal(seen[0].high_res[layer], expected.high_res[layer])
    (tmp_path / "images_2x" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"Eval record 'r1': high-res image file not found: .*images_2x/1\.png"):
        evaluate_model(model, processor, data, tmp_path / "images", high_res_images=tmp_path / "images_2x", batch_size=3)
