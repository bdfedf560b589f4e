"""The `resampler` strategy (architectures/resampler.py): an instruction-agnostic Perceiver resampler.

Tiny random-init models (tiny CLIP tower: 16 patches of 32 channels; tiny Llama, d_llm = 32); the
reference scale is built on the meta device only. Save/load, cached generation, gradient reach and the
reference config's meta build are checked for every strategy by test_conformance.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from test_templates import build_word_tokenizer
from tiny import (
    NUM_PATCHES,
    TINY_CLIP_TEXT,
    TINY_LLMS,
    left_pad,
    prompt_ids,
    run_count_params,
    tiny_clip_vision_spec,
    tiny_model,
)
from vlmzoo import StrategyNeeds, VLMConfig, VLMForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
D_V = tiny_clip_vision_spec()["hidden_size"]  # 32
D_LLM = TINY_LLMS["llama"]["hidden_size"]  # 32
TINY_RS = dict(num_latents=4, heads=4, ffn_size=64)  # 4 heads x 8 channels


def rs_model(seed: int = 0, **strategy_config) -> VLMForConditionalGeneration:
    return tiny_model("resampler", seed=seed, strategy_config={**TINY_RS, **strategy_config})


def _batch(model, pixels) -> dict[str, torch.Tensor]:
    """Two left-padded prompts, one image each, text on both sides of the image."""
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, [1, 5], [6, 11]), prompt_ids(n, [1, 7], [8, 9, 10])])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels[:2])


def _forward(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, **kw)


# ---- declarations and shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("latents", [3, 8])
def test_output_shape_and_token_count(pixels, latents):
    model = rs_model(num_latents=latents)
    s = model.strategy
    assert s.num_visual_tokens == latents
    assert s.resampler.latents.weight.shape == (latents, D_V)
    out = _forward(model, _batch(model, pixels))
    assert out.image_hidden_states.shape == (2, latents, D_LLM)
    assert out.logits.shape[:2] == _batch(model, pixels)["input_ids"].shape and torch.isfinite(out.logits).all()


def test_declarations_need_no_instruction():
    s = rs_model(vision_layer=-3).strategy
    assert s.needs == StrategyNeeds(vision_layers=(-3,))
    assert s.needs.instruction_text == () and not s.needs.instruction_span
    assert s.visual_token_grids == ()  # latents have no image position
    assert s.adapter_layers == ()
    assert set(s.module_groups()) == {"resampler", "connector"}
    assert len(s.resampler.layers) == 2 and s.resampler.layers[0].attn.head_dim == D_V // 4


def test_tokens_by_hand(pixels):
    """visual tokens = connector(LN(layers(latents))) with each layer written out: pre-norm, keys/values
    = CAT(norm(context), norm(latents)), bias-free multi-head attention, residual GELU FFN."""
    model = rs_model(num_layers=2)
    s = model.strategy
    batch = _batch(model, pixels)
    out = _forward(model, batch)

    def ln(x, norm):
        return F.layer_norm(x, (D_V,), norm.weight, norm.bias, norm.eps)

    def heads(x, n_heads):  # (N, T, H * hd) -> (N, H, T, hd)
        return x.view(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2)

    with torch.no_grad():
        context = model.vision_tower(batch["pixel_values"])[-2][:, 1:]  # (N, P, D_v), CLS dropped
        assert context.shape == (2, NUM_PATCHES, D_V)
        x = s.resampler.latents.weight.expand(2, -1, -1)
        for layer in s.resampler.layers:
            a = layer.attn
            assert a.q_proj.bias is None and a.o_proj.bias is None and layer.ffn_in.bias is None
            h = ln(x, layer.latent_norm)
            kv = torch.cat([ln(context, layer.context_norm), h], dim=1)
            q, k, v = heads(h @ a.q_proj.weight.T, 4), heads(kv @ a.k_proj.weight.T, 4), heads(kv @ a.v_proj.weight.T, 4)
            probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (N, H, K, P + K)
            attn = (probs @ v).transpose(1, 2).reshape(2, x.shape[1], -1) @ a.o_proj.weight.T
            x = x + attn
            x = x + F.gelu(ln(x, layer.ffn_norm) @ layer.ffn_in.weight.T) @ layer.ffn_out.weight.T
        expected = s.connector(ln(x, s.resampler.final_norm))
    torch.testing.assert_close(out.image_hidden_states, expected, rtol=1e-5, atol=1e-5)


def test_rmsnorm_variant_and_explicit_head_dim(pixels):
    model = rs_model(norm="rmsnorm", heads=2, head_dim=8, num_layers=1)
    layer = model.strategy.resampler.layers[0]
    assert isinstance(layer.latent_norm, torch.nn.RMSNorm) and isinstance(model.strategy.resampler.final_norm, torch.nn.RMSNorm)
    assert layer.attn.q_proj.weight.shape == (2 * 8, D_V)
    assert _forward(model, _batch(model, pixels)).image_hidden_states.shape == (2, TINY_RS["num_latents"], D_LLM)


# ---- instruction-agnostic ---------------------------------------------------------------------------
QUESTIONS = ["What is in the picture?", "What colour is it? Give a short caption."]


def _with_processor(text_encoder: bool):
    """A tiny resampler model + processor (word-level tokenizer, qwen2 template); optionally with a
    tiny CLIP text encoder, so the instruction's text features are computed too."""
    from vlmzoo.processing import VLMProcessor

    tok = build_word_tokenizer()
    llm = {**TINY_LLMS["llama"], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = VLMConfig(text_config=llm, vision_config=tiny_clip_vision_spec(), strategy="resampler",
                       strategy_config=dict(TINY_RS), image_token_id=tok.convert_tokens_to_ids("<image>"),
                       text_encoder_config=dict(TINY_CLIP_TEXT) if text_encoder else None)
    torch.manual_seed(3)
    model = VLMForConditionalGeneration(config).eval()
    text_tok = build_word_tokenizer(auto_bos=True) if text_encoder else None
    return model, VLMProcessor.for_model(model, tok, text_tokenizer=text_tok, template="qwen2")


@pytest.mark.parametrize("text_encoder", [False, True])
def test_tokens_do_not_change_when_only_the_question_changes(text_encoder):
    model, processor = _with_processor(text_encoder)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]

    def run(question: str, image: Image.Image):
        batch = processor([{"role": "user", "content": "<image>\n" + question}], images=[image], add_generation_prompt=True)
        assert ("instruction_input_ids" in batch) == text_encoder
        return batch, _forward(model, dict(batch))

    batch_a, a = run(QUESTIONS[0], images[0])
    batch_b, b = run(QUESTIONS[1], images[0])
    # The question really differs for the LLM (and for the text encoder, when there is one) ...
    assert batch_a["input_ids"].shape != batch_b["input_ids"].shape
    assert batch_a["instruction_mask"].sum() != batch_b["instruction_mask"].sum()
    if text_encoder:
        assert batch_a["instruction_input_ids"].shape != batch_b["instruction_input_ids"].shape
    assert not torch.allclose(a.logits[:, -1], b.logits[:, -1])
    # ... but the visual tokens are bit-identical; they follow the image only.
    assert torch.equal(a.image_hidden_states, b.image_hidden_states)
    _, other_image = run(QUESTIONS[0], images[1])
    assert not torch.allclose(other_image.image_hidden_states, a.image_hidden_states)


# ---- training recipe, starting from llava -----------------------------------------------------------------
def test_tiny_recipe_trains_the_whole_strategy_in_both_stages():
    """configs/resampler/tiny.yaml (read, never resolved: no tiny world is built): 8 latents, the same
    budget as TA-LLaVA's tiny prefix, and every strategy parameter trains in both stages."""
    from vlmzoo.config import load_run_config
    from vlmzoo.training.groups import StagePlan

    cfg = load_run_config(REPO / "configs" / "resampler" / "tiny.yaml", resolve_vars=False)
    ta = load_run_config(REPO / "configs" / "ta_llava" / "tiny.yaml", resolve_vars=False)
    sc = cfg.model.strategy_config
    assert cfg.model.strategy == "resampler"
    assert sc["num_latents"] == ta.model.strategy_config["num_prefix_tokens"] == 8
    assert (sc["heads"], sc["ffn_size"], sc["num_layers"]) == (4, 512, 2)
    model = rs_model()
    assert len(cfg.training.stages) == 2
    for stage in cfg.training.stages:
        plan = StagePlan.build(model, stage)
        assert {"resampler", "connector", "llm"} <= set(plan.trained)
        assert plan.lrs["resampler"] == plan.lrs["connector"] == stage.group_lr["strategy"]
        plan.apply(model)
        assert all(p.requires_grad for p in model.strategy.parameters())
        assert not any(p.requires_grad for p in model.vision_tower.parameters())


def test_start_from_llava_checkpoint(tmp_path):
    """A `llava` checkpoint's connector loads into the resampler's (same name and shape); the
    resampler starts fresh, with its latents N(0, 0.02) rather than empty or zero."""
    llava = tiny_model("llava", seed=0)
    llava.save_pretrained(tmp_path)
    model, info = VLMForConditionalGeneration.from_pretrained(tmp_path, config=rs_model().config, output_loading_info=True)
    missing = set(info["missing_keys"])
    assert missing and all(k.startswith("strategy.resampler.") for k in missing)
    for a, b in zip(llava.strategy.connector.parameters(), model.strategy.connector.parameters(), strict=True):
        assert torch.equal(a, b)
    assert 0.01 < model.strategy.resampler.latents.weight.std() < 0.04
    assert torch.equal(model.strategy.resampler.layers[0].latent_norm.weight, torch.ones(D_V))


def test_bad_configs():
    from vlmzoo.utils import ConfigKeyError

    with pytest.raises(ValueError, match="must divide the tower width 32"):
        rs_model(heads=5)
    with pytest.raises(ValueError, match="num_latents >= 1"):
        rs_model(num_latents=0)
    with pytest.raises(ValueError, match="num_layers >= 1"):
        rs_model(num_layers=0)
    with pytest.raises(ValueError, match=r"strategy_config\[resampler\]\.norm must be one of 'layernorm', 'rmsnorm', got 'batchnorm'"):
        rs_model(norm="batchnorm")
    with pytest.raises(ConfigKeyError, match="num_latents"):
        rs_model(num_latent=8)


def test_registered_through_the_entry_point_and_found_by_the_study():
    import importlib.metadata as md

    from vlmzoo import available_strategies
    from vlmzoo_lab.study import default_archs

    declared = {ep.name: ep.value for ep in md.entry_points(group="vlmzoo.strategies")}
    assert declared.get("resampler") == "architectures.resampler"
    assert "resampler" in available_strategies() and "resampler" in default_archs("tiny")


# ---- reference scale on meta ------------------------------------------------------------------------------


def _resampler_params(d=1024, k=64, layers=2, heads=16, head_dim=64, ffn=4096, norm=2):
    """Latents + per layer (3 norms, bias-free q/k/v/o, bias-free FFN) + final norm; ``norm`` = parameters
    per channel of one norm (LayerNorm 2, RMSNorm 1)."""
    inner = heads * head_dim
    layer = 3 * norm * d + 4 * d * inner + 2 * d * ffn
    return k * d + layers * layer + norm * d


def test_reference_scale_counts_on_meta(capsys):
    """`python scripts/count_params.py --arch resampler --scale reference`: 64 tokens, 25.2M + 21.0M."""
    counts, out = run_count_params(capsys, "--arch", "resampler", "--scale", "reference")
    assert counts["resampler"] == _resampler_params() == 25_245_696
    assert counts["connector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # = llava's
    assert counts["total"] == counts["resampler"] + counts["connector"] + counts["llm"] + counts["vision_tower"]
    assert "visual tokens per image: 64" in out
    counts, out = run_count_params(capsys, "--arch", "resampler", "--scale", "reference", "model.strategy_config.num_latents=32",
                                "model.strategy_config.num_layers=3", "model.strategy_config.norm=rmsnorm",
                                "model.strategy_config.head_dim=96", "model.strategy_config.ffn_size=2048")
    assert counts["resampler"] == _resampler_params(k=32, layers=3, head_dim=96, ffn=2048, norm=1)
    assert "visual tokens per image: 32" in out


def test_reference_config_recipe():
    from vlmzoo.config import load_run_config

    cfg = load_run_config(REPO / "configs" / "resampler" / "reference.yaml", resolve_vars=False)
    s1, s2 = cfg.training.stages
    assert (s1.train, s2.train) == (["strategy"], ["strategy", "llm"])
    assert cfg.model.strategy == "resampler" and not cfg.model.text_encoder
