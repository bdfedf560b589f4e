"""Importing llava-hf checkpoints: a tiny transformers LlavaForConditionalGeneration, converted,
must give the same logits in vlmzoo, whatever key layout or sharding the source uses."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, NUM_PATCHES, PATCH, TINY_LLMS, VOCAB, left_pad, prompt_ids
from vlmzoo import VLMForConditionalGeneration
from converters.llava_hf import ConversionError, convert_llava_hf, map_llava_key

ROOT = Path(__file__).resolve().parents[1]
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, patch_size=PATCH, image_size=IMAGE_SIZE, projection_dim=16)


def _llava_config(**overrides):
    from transformers import LlavaConfig

    kwargs = dict(vision_config=dict(VISION), text_config=dict(TINY_LLMS["llama"]), image_token_index=IMAGE_TOKEN_ID,
                  image_seq_length=NUM_PATCHES)
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def _tiny_tokenizer():
    """A word-level tokenizer whose ids fit the tiny LLM: pad 0, bos 1, eos 2, ``<image>`` = IMAGE_TOKEN_ID."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "USER", "ASSISTANT", ":", "What", "is", "this", "?", "A", "cat", "."]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), IMAGE_TOKEN_ID)})
    vocab["<image>"] = IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def _save_source(model, path: Path, **save_kwargs) -> Path:
    """What a llava-hf repo holds: model + LlavaProcessor (tokenizer, image processor)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    model.save_pretrained(path, **save_kwargs)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=image_processor, tokenizer=_tiny_tokenizer(), patch_size=PATCH,
                   vision_feature_select_strategy="default", image_token="<image>").save_pretrained(path)
    return path


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _write_layout(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of ``src`` (config, tokenizer) whose weights are ``tensors`` in one file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def reference():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(_llava_config()).eval()


@pytest.fixture(scope="module")
def source(reference, tmp_path_factory) -> Path:
    return _save_source(reference, tmp_path_factory.mktemp("llava_hf"))


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("vlmzoo")
    convert_llava_hf(source, dst)
    return dst


@pytest.fixture(scope="module")
def batch():
    """Two left-padded samples, one image each, with labels."""
    g = torch.Generator().manual_seed(1)
    ids, mask = left_pad([prompt_ids(NUM_PATCHES, [1, 20], [30, 31, 32]), prompt_ids(NUM_PATCHES, [1], [40, 41, 42, 43, 44])])
    labels = ids.masked_fill((ids == IMAGE_TOKEN_ID) | (mask == 0), -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g))


def _assert_same_outputs(reference, model_dir: Path, batch, atol: float = 1e-5) -> None:
    model = VLMForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        want = reference(**batch)
        got = model(**batch)
    torch.testing.assert_close(got.logits, want.logits, atol=atol, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=atol, rtol=0)


# ---- numerics -------------------------------------------------------------------------------------
def test_converted_logits_match_transformers(reference, converted, batch):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "vlmzoo" and config["strategy"] == "llava"
    assert config["image_token_id"] == IMAGE_TOKEN_ID
    assert config["strategy_config"] == {"vision_layer": -2, "connector_depth": 2, "connector_act": "gelu"}
    assert config["vision_config"]["backend"] == "hf"
    _assert_same_outputs(reference, converted, batch)


def test_every_model_key_is_written(converted):
    model = VLMForConditionalGeneration.from_pretrained(converted)
    assert set(_tensors(converted)) == set(model.state_dict())


def test_generation_matches_transformers(reference, converted, batch):
    model = VLMForConditionalGeneration.from_pretrained(converted).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    want = reference.generate(**inputs, max_new_tokens=5, do_sample=False)
    got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


# ---- source layouts and sharding ------------------------------------------------------------------
def _legacy_name(key: str) -> str:
    """v5 on-disk name -> the name released llava-hf repos (transformers < 4.52) use."""
    return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key


@pytest.mark.parametrize("layout", ["legacy", "in_memory"])
def test_other_key_layouts_convert_identically(layout, reference, source, converted, tmp_path):
    if layout == "legacy":  # language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*
        tensors = {_legacy_name(k): v for k, v in _tensors(source).items()}
        assert any(k.startswith("vision_tower.vision_model.") for k in tensors)
    else:  # model.language_model.*, model.vision_tower.*, lm_head.* (transformers 4.52+ / v5 state_dict)
        tensors = dict(reference.state_dict())
        assert "lm_head.weight" in tensors
    src = _write_layout(source, tmp_path / "src", tensors)
    convert_llava_hf(src, tmp_path / "dst")
    want, got = _tensors(converted), _tensors(tmp_path / "dst")
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_legacy_layout_logits_and_dropped_buffers(reference, source, batch, tmp_path):
    """Old checkpoints also carry buffers transformers now recomputes (position_ids): dropped, not an error."""
    tensors = {_legacy_name(k): v for k, v in _tensors(source).items()}
    tensors["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(NUM_PATCHES + 1)[None]
    src = _write_layout(source, tmp_path / "src", tensors)
    result = convert_llava_hf(src, tmp_path / "dst")
    assert [e.src_key for e in result.plan.dropped] == ["vision_tower.vision_model.embeddings.position_ids"]
    _assert_same_outputs(reference, tmp_path / "dst", batch)


def test_sharded_source_and_output(reference, source, converted, batch, tmp_path):
    src = _save_source(reference, tmp_path / "src", max_shard_size="20KB")
    assert len(list(src.glob("model-*.safetensors"))) > 3 and (src / "model.safetensors.index.json").is_file()
    dst = tmp_path / "dst"
    result = convert_llava_hf(src, dst, max_shard_size="40KB")
    assert len(result.weight_files) > 1
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.weight_files)
    assert set(index["weight_map"]) == set(_tensors(converted))
    _assert_same_outputs(reference, dst, batch)


def test_map_llava_key_layouts():
    expected = "vision_tower.model.encoder.layers.0.mlp.fc1.weight"
    for key in ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                "vision_tower.encoder.layers.0.mlp.fc1.weight",
                "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert map_llava_key(key)[0] == expected
    assert map_llava_key("multi_modal_projector.linear_2.bias")[0] == "strategy.connector.layers.2.bias"
    assert map_llava_key("model.multi_modal_projector.linear_1.weight")[0] == "strategy.connector.layers.0.weight"
    assert map_llava_key("lm_head.weight")[0] == "language_model.lm_head.weight"
    assert map_llava_key("language_model.lm_head.weight")[0] == "language_model.lm_head.weight"
    assert map_llava_key("model.language_model.norm.weight")[0] == "language_model.model.norm.weight"
    assert map_llava_key("image_newline") is None


# ---- dtype, tokenizer, processor ------------------------------------------------------------------
def test_dtype_option(source, tmp_path):
    convert_llava_hf(source, tmp_path, dtype="bfloat16")
    assert {t.dtype for t in _tensors(tmp_path).values()} == {torch.bfloat16}
    model = VLMForConditionalGeneration.from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tokenizer_and_processor(reference, converted):
    from transformers import AutoTokenizer

    from vlmzoo.processing import VLMProcessor

    assert AutoTokenizer.from_pretrained(converted).convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    assert "LlavaProcessor" not in (converted / "tokenizer_config.json").read_text()
    processor = VLMProcessor.from_pretrained(converted)
    assert processor.num_visual_tokens == NUM_PATCHES and processor.image_shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    from PIL import Image

    image = Image.new("RGB", (40, 24), (200, 30, 30))
    inputs = processor([{"role": "user", "content": "<image>\nWhat is this ?"}], images=[image],
                       add_generation_prompt=True)
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == NUM_PATCHES
    model = VLMForConditionalGeneration.from_pretrained(converted).eval()
    with torch.no_grad():
        got = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    pixel_values=inputs["pixel_values"]).logits
        want = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_without_tokenizer_files_weights_still_convert(reference, source, batch, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src, ignore=shutil.ignore_patterns("tokenizer*", "processor_config.json"))
    result = convert_llava_hf(src, tmp_path / "dst")
    assert not result.processor_saved and "no tokenizer files" in result.processor_error
    _assert_same_outputs(reference, tmp_path / "dst", batch)


def test_released_style_config(reference, source, tmp_path):
    """A 4.36-era llava-hf config.json (torch_dtype, top-level pad_token_id/vocab_size/ignore_index,
    no image_seq_length) with float16 weights in the legacy layout."""
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": IMAGE_TOKEN_ID,
        "model_type": "llava", "pad_token_id": 0, "projector_hidden_act": "gelu",
        "text_config": {**{k: v for k, v in TINY_LLMS["llama"].items() if k != "pad_token_id"},
                        "architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {**VISION, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": VOCAB,
    }
    tensors = {_legacy_name(k): v.half() for k, v in _tensors(source).items()}
    src = _write_layout(source, tmp_path / "src", tensors)
    (src / "config.json").write_text(json.dumps(config))
    convert_llava_hf(src, tmp_path / "dst")
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["dtype"] == "float16" and written["text_config"]["pad_token_id"] == 0
    model = VLMForConditionalGeneration.from_pretrained(tmp_path / "dst")
    assert model.dtype == torch.float16
    want = _tensors(tmp_path / "dst")
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key
    assert torch.equal(want["strategy.connector.layers.0.weight"],
                       reference.model.multi_modal_projector.linear_1.weight.detach().half())


# ---- errors -----------------------------------------------------------------------------------------
def test_unmapped_key_is_an_error(source, tmp_path):
    tensors = _tensors(source)
    tensors["model.image_newline"] = torch.zeros(32)
    src = _write_layout(source, tmp_path / "src", tensors)
    with pytest.raises(ConversionError, match=r"model\.image_newline"):
        convert_llava_hf(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_missing_key_is_an_error(source, tmp_path):
    tensors = _tensors(source)
    del tensors["multi_modal_projector.linear_2.bias"]
    src = _write_layout(source, tmp_path / "src", tensors)
    with pytest.raises(ConversionError, match=r"strategy\.connector\.layers\.2\.bias"):
        convert_llava_hf(src, tmp_path / "dst")


def _with_config(source: Path, tmp_path: Path, **changes) -> Path:
    src = tmp_path / "src"
    shutil.copytree(source, src)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vision_feature_select_strategy": "full"}, "'full'"),
        ({"multimodal_projector_bias": False}, "multimodal_projector_bias"),
        ({"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
        ({"model_type": "llava_next"}, "llava_next"),
    ],
)
def test_unsupported_configs_are_errors(source, tmp_path, changes, message):
    with pytest.raises(ConversionError, match=message):
        convert_llava_hf(_with_config(source, tmp_path, **changes), tmp_path / "dst")


def test_existing_weights_need_overwrite(source, tmp_path):
    convert_llava_hf(source, tmp_path)
    with pytest.raises(ConversionError, match="overwrite"):
        convert_llava_hf(source, tmp_path)
    convert_llava_hf(source, tmp_path, overwrite=True)


# ---- CLI --------------------------------------------------------------------------------------------
def _cli():
    spec = importlib.util.spec_from_file_location("convert_llava_hf", ROOT / "scripts" / "convert_llava_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_dry_run_prints_mapping_and_writes_nothing(source, tmp_path, capsys):
    assert _cli().main(["--src", str(source), "--dst", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "multi_modal_projector.linear_1.weight" in out and "strategy.connector.layers.0.weight" in out
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_reports_errors(reference, source, batch, tmp_path, capsys):
    cli = _cli()
    assert cli.main(["--src", str(source), "--dst", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    _assert_same_outputs(reference, tmp_path / "out", batch)
    bad = _with_config(source, tmp_path, vision_feature_select_strategy="full")
    assert cli.main(["--src", str(bad), "--dst", str(tmp_path / "bad")]) == 1
    assert "full" in capsys.readouterr().err
