"""Vision towers (hf CLIP/SigLIP, timm, open_clip) and instruction-text encoders, on tiny random models.

Every tower must return ``num_layers + 1`` hidden states ``(N, has_cls + P, D)`` matching its
attributes, build on the meta device, and reload saved weights to identical outputs; each is
checked against its library's own forward. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from vlmzoo.towers import text as text_mod
from vlmzoo.towers.text import build_text_encoder, load_pretrained_text_encoder, register_text_backend
from vlmzoo.towers.vision import VisionTower, build_vision_tower, load_pretrained_vision_tower

N = 2
IMAGE = 32

HF_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": IMAGE, "patch_size": 8}
TIMM_KWARGS = {"img_size": IMAGE, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}
CLIP_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 98, "eos_token_id": 99,
             "pad_token_id": 0}

VISION_SPECS: dict[str, dict[str, Any]] = {
    "hf_clip": {"backend": "hf", "model_type": "clip_vision_model", **HF_VISION},
    "hf_siglip": {"backend": "hf", "model_type": "siglip_vision_model", **HF_VISION},
    "timm": {"backend": "timm", "model_name": "vit_tiny_patch16_224", "model_kwargs": TIMM_KWARGS},
    "open_clip": {"backend": "open_clip", "model_name": "tiny-vit", "model_cfg": OPEN_CLIP_CFG},
}
EXPECTED_CLS = {"hf_clip": True, "hf_siglip": False, "timm": True, "open_clip": True}


def _pixels() -> torch.Tensor:
    return torch.randn(N, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))


def _build(name: str) -> VisionTower:
    torch.manual_seed(0)
    return build_vision_tower(VISION_SPECS[name]).eval()


def _attrs(tower: VisionTower) -> tuple:
    return (tower.hidden_size, tower.num_layers, tower.num_patches, tower.has_cls, tower.image_size,
            tuple(tower.image_mean), tuple(tower.image_std))


# ------------------------------------------------------------------------------------ vision


@pytest.mark.parametrize("name", VISION_SPECS)
def test_forward_returns_all_hidden_states(name: str) -> None:
    tower = _build(name)
    assert (tower.hidden_size, tower.num_layers, tower.image_size) == (32, 2, IMAGE)
    assert tower.num_patches == (IMAGE // 8) ** 2
    assert tower.has_cls is EXPECTED_CLS[name]
    with torch.no_grad():
        states = tower(_pixels())
    assert len(states) == tower.num_layers + 1
    for state in states:
        assert state.shape == (N, int(tower.has_cls) + tower.num_patches, tower.hidden_size)
    assert not torch.equal(states[0], states[-1])


@pytest.mark.parametrize("name", VISION_SPECS)
def test_truncated_forward_equals_the_full_one_and_skips_later_blocks(name: str) -> None:
    tower = _build(name)
    pixels = _pixels()
    with torch.no_grad():
        full = tower(pixels)
        for k in range(1, tower.num_layers + 2):
            part = tower(pixels, num_states=k)
            assert len(part) == k
            for a, b in zip(part, full[:k]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    ran: list[int] = []
    blocks = [m for m in tower.modules() if type(m).__name__ in ("CLIPEncoderLayer", "SiglipEncoderLayer", "Block",
                                                                "ResidualAttentionBlock")]
    assert len(blocks) == tower.num_layers
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *_a, i=i: ran.append(i))
    with torch.no_grad():
        tower(pixels, num_states=2)  # the embedding output and the first block's output
    assert ran == [0]
    with pytest.raises(ValueError, match="num_states must be in 1..3"):
        tower(pixels, num_states=4)


@pytest.mark.parametrize("name", VISION_SPECS)
def test_builds_on_meta_device_and_spec_is_json(name: str) -> None:
    with torch.device("meta"):
        tower = build_vision_tower(VISION_SPECS[name])
    assert all(p.device.type == "meta" for p in tower.parameters())
    rebuilt = build_vision_tower(json.loads(json.dumps(tower.spec)))
    assert _attrs(rebuilt) == _attrs(tower)


def _save_tower(name: str, tower: VisionTower, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """Save weights the way each library's users do; returns ``(path, loader kwargs)``."""
    if name.startswith("hf"):
        tower.model.save_pretrained(tmp_path)
        return str(tmp_path), {}
    if name == "timm":
        save_file(tower.model.state_dict(), tmp_path / "vit.safetensors")
        return str(tmp_path / "vit.safetensors"), {"model_name": "vit_tiny_patch16_224", "model_kwargs": TIMM_KWARGS}
    torch.save(tower.state_dict(), tmp_path / "visual.pt")
    return str(tmp_path / "visual.pt"), {"model_cfg": OPEN_CLIP_CFG}


@pytest.mark.parametrize("name", VISION_SPECS)
def test_pretrained_round_trip(name: str, tmp_path: Path) -> None:
    tower = _build(name)
    path, kwargs = _save_tower(name, tower, tmp_path)
    backend = VISION_SPECS[name]["backend"]
    loaded = load_pretrained_vision_tower(path, backend, **kwargs).eval()
    assert _attrs(loaded) == _attrs(tower)
    pixels = _pixels()
    with torch.no_grad():
        for a, b in zip(tower(pixels), loaded(pixels), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The loaded tower's spec rebuilds the same architecture.
    assert _attrs(build_vision_tower(json.loads(json.dumps(loaded.spec)))) == _attrs(tower)


def test_hf_clip_matches_transformers_clip_vision_model() -> None:
    tower = _build("hf_clip")
    reference = CLIPVisionModel(CLIPVisionConfig(**HF_VISION)).eval()
    reference.load_state_dict(tower.model.state_dict())
    pixels = _pixels()
    with torch.no_grad():
        states = tower(pixels)
        out = reference(pixel_values=pixels, output_hidden_states=True)
    assert len(states) == len(out.hidden_states)
    for ours, theirs in zip(states, out.hidden_states):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # The last state is the pre-post_layernorm output of the last block.
    torch.testing.assert_close(states[-1], out.last_hidden_state)
    inner = getattr(reference, "vision_model", reference)
    torch.testing.assert_close(states[0], inner.pre_layrnorm(inner.embeddings(pixels)))


def test_timm_states_are_block_inputs_and_outputs() -> None:
    tower = _build("timm")
    model, pixels = tower.model, _pixels()
    with torch.no_grad():
        states = tower(pixels)
        first_input = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
        outputs = model.forward_intermediates(
            pixels, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    torch.testing.assert_close(states[0], first_input)
    for state, (patches, prefix) in zip(states[1:], outputs, strict=True):
        torch.testing.assert_close(state, torch.cat([prefix, patches], dim=1))
    assert tower.image_mean == tuple(model.pretrained_cfg["mean"])


@pytest.mark.parametrize("class_token", [True, False])
def test_timm_extra_prefix_tokens_are_dropped(class_token: bool) -> None:
    pool = "token" if class_token else "avg"
    kwargs = {**TIMM_KWARGS, "reg_tokens": 3, "class_token": class_token, "global_pool": pool}
    tower = build_vision_tower({"backend": "timm", "model_name": "vit_tiny_patch16_224", "model_kwargs": kwargs}).eval()
    assert tower.has_cls is class_token
    pixels = _pixels()
    with torch.no_grad():
        states = tower(pixels)
        outputs = tower.model.forward_intermediates(
            pixels, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
    assert states[0].shape == (N, int(class_token) + tower.num_patches, 32)
    patches, prefix = outputs[-1]
    expected = torch.cat([prefix[:, :1], patches], dim=1) if class_token else patches
    torch.testing.assert_close(states[-1], expected)


def test_timm_loads_directory_saved_by_timm(tmp_path: Path) -> None:
    tower = _build("timm")
    timm.models.save_for_hf(tower.model, tmp_path, safe_serialization=True)
    loaded = load_pretrained_vision_tower(str(tmp_path), "timm").eval()
    assert loaded.spec["model_name"] == "vit_tiny_patch16_224"
    pixels = _pixels()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels)[-1], tower(pixels)[-1], rtol=0, atol=0)


def test_timm_missing_weights_fail_loudly(tmp_path: Path) -> None:
    state = {k: v for k, v in _build("timm").model.state_dict().items() if not k.startswith("blocks.1.")}
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(RuntimeError, match="blocks.1"):
        load_pretrained_vision_tower(str(tmp_path / "partial.safetensors"), "timm",
                                     model_name="vit_tiny_patch16_224", model_kwargs=TIMM_KWARGS)


def _open_clip_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", load_weights=False, pretrained_text=False, **OPEN_CLIP_CFG).eval()


def test_open_clip_loads_full_clip_checkpoint(tmp_path: Path) -> None:
    model = _open_clip_model()
    save_file(model.state_dict(), tmp_path / "clip.safetensors")
    tower = load_pretrained_vision_tower(str(tmp_path / "clip.safetensors"), "open_clip", model_cfg=OPEN_CLIP_CFG)
    pixels = _pixels()
    with torch.no_grad():
        states = tower.eval()(pixels)
        ref = model.visual.forward_intermediates(
            pixels, output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
        )
    blocks = zip(ref["image_intermediates"], ref["image_intermediates_prefix"], strict=True)
    for state, (patches, cls) in zip(states[1:], blocks, strict=True):
        torch.testing.assert_close(state, torch.cat([cls, patches], dim=1))


def test_open_clip_loads_its_own_directory_layout(tmp_path: Path) -> None:
    model = _open_clip_model()
    config = {"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), tmp_path / "open_clip_model.safetensors")
    tower = load_pretrained_vision_tower(str(tmp_path), "open_clip").eval()
    encoder = load_pretrained_text_encoder(str(tmp_path), "open_clip").eval()
    assert tower.image_mean == (0.5, 0.5, 0.5) and tower.spec["model_cfg"] == OPEN_CLIP_CFG
    rebuilt = build_vision_tower(json.loads(json.dumps(tower.spec))).eval()
    rebuilt.load_state_dict(tower.state_dict())
    pixels = _pixels()
    context = OPEN_CLIP_CFG["text_cfg"]["context_length"]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels)[-1], tower(pixels)[-1], rtol=0, atol=0)
        reference = model.encode_text(torch.nn.functional.pad(IDS, (0, context - IDS.shape[1])))
        torch.testing.assert_close(encoder(IDS, MASK).pooled @ model.text_projection, reference)


def test_unknown_vision_backend_is_named() -> None:
    with pytest.raises(ValueError, match=r"'timmm'.*did you mean 'timm'.*Known backends: hf, open_clip, timm"):
        build_vision_tower({"backend": "timmm", "model_name": "x"})
    with pytest.raises(ValueError, match=r"'nope'.*Known backends: hf, open_clip, timm"):
        load_pretrained_vision_tower("x", backend="nope")


# -------------------------------------------------------------------------------------- text

TEXT_SPECS: dict[str, dict[str, Any]] = {
    "hf_clip": {"backend": "hf", "model_type": "clip_text_model", **CLIP_TEXT},
    "hf_siglip": {"backend": "hf", "model_type": "siglip_text_model", **{**CLIP_TEXT, "pad_token_id": 1}},
    "open_clip": {"backend": "open_clip", "model_name": "tiny-vit", "model_cfg": OPEN_CLIP_CFG},
}
# Two right-padded instructions ending in EOS (99); 0 = padding.
IDS = torch.tensor([[98, 5, 7, 9, 99, 0], [98, 5, 99, 0, 0, 0]])
MASK = (IDS != 0).long()


def _text_encoder(name: str) -> text_mod.TextEncoder:
    torch.manual_seed(0)
    return build_text_encoder(TEXT_SPECS[name]).eval()


@pytest.mark.parametrize("name", TEXT_SPECS)
def test_text_encoder_shapes(name: str) -> None:
    encoder = _text_encoder(name)
    assert encoder.hidden_size == 32 and encoder.max_length == 16
    with torch.no_grad():
        features = encoder(IDS, MASK)
    assert features.pooled.shape == (N, 32)
    assert features.tokens.shape == (N, IDS.shape[1], 32)
    assert torch.equal(features.mask, MASK)
    assert build_text_encoder(json.loads(json.dumps(encoder.spec))).hidden_size == 32


@pytest.mark.parametrize("name", TEXT_SPECS)
def test_extra_right_padding_does_not_change_features(name: str) -> None:
    encoder = _text_encoder(name)
    # Pad with a token id other than the pad id (HF CLIP tokenizers pad with EOS): only the mask counts.
    padded_ids = torch.cat([IDS, torch.full((N, 4), 99)], dim=1)
    padded_mask = torch.cat([MASK, torch.zeros(N, 4, dtype=MASK.dtype)], dim=1)
    with torch.no_grad():
        short = encoder(IDS, MASK)
        long = encoder(padded_ids, padded_mask)
    torch.testing.assert_close(long.pooled, short.pooled, rtol=1e-5, atol=1e-5)
    real = MASK.bool()
    torch.testing.assert_close(long.tokens[:, : IDS.shape[1]][real], short.tokens[real], rtol=1e-5, atol=1e-5)


def test_hf_clip_text_pooled_is_eos_feature() -> None:
    encoder = _text_encoder("hf_clip")
    with torch.no_grad():
        features = encoder(IDS, MASK)
    eos = (IDS == 99).int().argmax(dim=1)
    torch.testing.assert_close(features.pooled, features.tokens[torch.arange(N), eos])


def test_hf_towers_load_from_full_clip_model_dir(tmp_path: Path, caplog, capsys) -> None:
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=HF_VISION, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="vlmzoo.towers"):
        encoder = load_pretrained_text_encoder(str(tmp_path)).eval()
        tower = load_pretrained_vision_tower(str(tmp_path), "hf").eval()
    # the other tower's weights: one counted line each, not transformers' per-key load report
    lines = [r.getMessage() for r in caplog.records if r.name == "vlmzoo.towers.loading"]
    assert len(lines) == 2 and "text-tower loaded" in lines[0] and "vision tower loaded" in lines[1], lines
    not_vision = [k for k in clip.state_dict() if not k.startswith("vision_model.")]  # text tower, projections, scale
    assert f"{len(not_vision)} other weights" in lines[1]
    assert "LOAD REPORT" not in capsys.readouterr().err + "".join(r.getMessage() for r in caplog.records)
    pixels = _pixels()
    with torch.no_grad():
        features = encoder(IDS, MASK)
        text_ref = clip.text_model(input_ids=IDS, attention_mask=MASK)
        vision_ref = clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        states = tower(pixels)
    torch.testing.assert_close(features.pooled, text_ref.pooler_output)
    torch.testing.assert_close(features.tokens, text_ref.last_hidden_state)
    torch.testing.assert_close(states[-2], vision_ref.hidden_states[-2])
    assert encoder.spec["model_type"] == "clip_text_model" and tower.spec["model_type"] == "clip_vision_model"
    json.dumps(encoder.spec)


def test_hf_text_loading_rejects_incomplete_checkpoints(tmp_path: Path) -> None:
    CLIPVisionModel(CLIPVisionConfig(**HF_VISION)).save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match="No transformers text model for model_type 'clip_vision_model'"):
        load_pretrained_text_encoder(str(tmp_path / "vision"))
    encoder = _text_encoder("hf_clip")
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items() if "layers.1." not in k}
    encoder.model.save_pretrained(tmp_path / "text", state_dict=state)
    with pytest.raises(ValueError, match="lacks text-tower weights"):
        load_pretrained_text_encoder(str(tmp_path / "text"))
    vision = CLIPVisionModel(CLIPVisionConfig(**HF_VISION))
    state = {k: v.contiguous() for k, v in vision.state_dict().items() if "layers.0." not in k}
    vision.save_pretrained(tmp_path / "partial_vision", state_dict=state)
    with pytest.raises(ValueError, match=r"lacks vision tower weights .*layers\.0\."):
        load_pretrained_vision_tower(str(tmp_path / "partial_vision"), "hf")


def test_open_clip_text_loads_full_clip_checkpoint(tmp_path: Path) -> None:
    model = _open_clip_model()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    encoder = load_pretrained_text_encoder(str(tmp_path / "clip.pt"), "open_clip", model_cfg=OPEN_CLIP_CFG).eval()
    context = OPEN_CLIP_CFG["text_cfg"]["context_length"]
    with torch.no_grad():
        features = encoder(IDS, MASK)
        reference = model.encode_text(torch.nn.functional.pad(IDS, (0, context - IDS.shape[1])))
    # open_clip's text embedding is the pooled feature (EOT token) times text_projection.
    torch.testing.assert_close(features.pooled @ model.text_projection, reference)
    # Round trip through the encoder's own state dict.
    save_file(encoder.state_dict(), tmp_path / "text.safetensors")
    again = load_pretrained_text_encoder(str(tmp_path / "text.safetensors"), "open_clip", model_cfg=OPEN_CLIP_CFG)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(IDS, MASK).pooled, features.pooled, rtol=0, atol=0)


def test_open_clip_tokenizer_matches_encoder() -> None:
    tokenizer = text_mod.text_tokenizer_for({"backend": "open_clip", "model_name": "ViT-B-32"})
    ids = tokenizer(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids[0, 0] == tokenizer.sot_token_id


def test_unknown_text_backend_is_named() -> None:
    with pytest.raises(ValueError, match=r"'open-clip'.*did you mean 'open_clip'.*Known backends: hf, open_clip, sentence_transformers"):
        build_text_encoder({"backend": "open-clip"})
    with pytest.raises(ValueError, match=r"'sentence-transformers'.*did you mean 'sentence_transformers'"):
        load_pretrained_text_encoder("x", backend="sentence-transformers")


def test_register_text_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_mod, "_TEXT_BACKENDS", dict(text_mod._TEXT_BACKENDS))
    monkeypatch.setattr(text_mod, "_TEXT_LOADERS", dict(text_mod._TEXT_LOADERS))
    register_text_backend("toy", lambda spec: _text_encoder("hf_clip"))
    assert build_text_encoder({"backend": "toy"}).hidden_size == 32
    with pytest.raises(ValueError, match="already registered"):
        register_text_backend("toy", lambda spec: _text_encoder("hf_clip"))
    with pytest.raises(ValueError, match="cannot load pretrained"):
        load_pretrained_text_encoder("x", backend="toy")
