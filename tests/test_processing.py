"""VLMProcessor: image-token expansion, image/placeholder checks, padding, instruction tokens, save/load."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from test_templates import build_word_tokenizer
from vlmzoo.data import IGNORE_INDEX
from vlmzoo.processing import VLMProcessor, make_image_processor, pad_to_square
from vlmzoo.strategy import InputSpec

N_VIS = 5
SIZE = 32
SPEC = InputSpec(num_visual_tokens=N_VIS)


def save_model_config(folder, spec: InputSpec | None) -> None:
    """The config.json a model saved beside the processor writes (its input spec, or none: an old folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "vlmzoo", "input_spec": spec and spec.to_dict()}))


def fake_config(tok, spec: InputSpec, **fields) -> SimpleNamespace:
    """The parts of a VLMConfig that for_model reads."""
    values = {"image_token": "<image>", "image_token_id": tok.convert_tokens_to_ids("<image>"), "strategy": "llava",
              "vision_config": {"image_size": SIZE}, **fields}
    config = SimpleNamespace(**values)
    config.get_input_spec = lambda: spec
    return config


def image(w: int = SIZE, h: int = SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor() -> VLMProcessor:
    return VLMProcessor(
        build_word_tokenizer(),
        image_processor=make_image_processor(SIZE),
        text_tokenizer=build_word_tokenizer(auto_bos=True),
        template="qwen2",
        input_spec=SPEC,
    )


def conv(question: str, answer: str | None = "one two") -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": question}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def test_image_token_expansion_and_keys(processor):
    batch = processor(
        [conv("<image>\nWhat is in the picture?"), conv("Hello"), conv("<image> one <image> two")],
        images=[[image(seed=1)], None, [image(seed=2), image(48, 20, seed=3)]],
    )
    image_id = processor.image_token_id
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [N_VIS, 0, 2 * N_VIS]
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    B, T = batch["input_ids"].shape
    for key in ("attention_mask", "labels", "instruction_mask"):
        assert batch[key].shape == (B, T)
    assert batch["instruction_mask"].dtype == torch.bool
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE_INDEX).all()
    # One instruction row per image, each the instruction of the image's sample.
    assert batch["instruction_input_ids"].shape[0] == 3
    texts = processor.text_tokenizer.batch_decode(batch["instruction_input_ids"], skip_special_tokens=True)
    assert texts == ["What is in the picture?", "one  two", "one  two"]
    assert batch["instruction_attention_mask"].shape == batch["instruction_input_ids"].shape


@pytest.mark.parametrize("side", ["right", "left"])
def test_instruction_tokens_equal_the_tokenizers_batch_call(side):
    """tokenize_instructions remembers each text's ids; its padded batch is exactly the text
    tokenizer's own batch call, on either padding side, for repeated and truncated texts."""
    text_tok = build_word_tokenizer(auto_bos=True)
    text_tok.padding_side = side
    p = VLMProcessor(build_word_tokenizer(), image_processor=make_image_processor(SIZE), text_tokenizer=text_tok,
                     template="qwen2", input_spec=SPEC, text_max_length=6)
    texts = ["one two", "What is in the picture?", "one two", " ".join(["one"] * 9), "two"]
    for _ in range(2):  # the second call is served from memory
        ids, mask = p.tokenize_instructions(texts)
        ref = text_tok(texts, padding=True, truncation=True, max_length=6, return_tensors="pt")
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert len(p._instruction_ids) == 4


def test_text_only_batch_has_no_image_keys(processor):
    batch = processor([conv("Hello"), conv("one")])
    assert "pixel_values" not in batch and "instruction_input_ids" not in batch
    assert not (batch["input_ids"] == processor.image_token_id).any()


def test_image_count_mismatch_names_sample_and_counts(processor):
    with pytest.raises(ValueError, match=r"Sample 1 has 1 '<image>' placeholder\(s\) but 0 image\(s\)"):
        processor([conv("Hello"), conv("<image> one")], images=[None, []])
    with pytest.raises(ValueError, match=r"Sample 0 has 1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        processor(conv("<image> one"), images=[image(), image()])
    with pytest.raises(ValueError, match="2 conversations but images for 1"):
        processor([conv("a"), conv("b")], images=[[image()]])


def test_padding_sides(processor):
    short, long = conv("Hello", None), conv("<image>\nWhat is in the picture? one two three", None)
    gen = processor([short, long], images=[None, [image()]], add_generation_prompt=True)
    assert "labels" not in gen
    mask, ids = gen["attention_mask"], gen["input_ids"]
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and (mask[0, :n_pad] == 0).all() and (mask[0, n_pad:] == 1).all()
    assert (ids[0, :n_pad] == processor.tokenizer.pad_token_id).all()
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row in ids:  # both prompts end with the assistant header, ready for generation
        assert row[-len(header):].tolist() == header
    assert not gen["instruction_mask"][0, :n_pad].any()

    train = processor([conv("Hello"), conv("<image> one two three four five", "six")], images=[None, [image()]])
    n_pad = int((train["attention_mask"][0] == 0).sum())
    assert n_pad > 0 and (train["attention_mask"][0, -n_pad:] == 0).all()
    assert (train["labels"][0, -n_pad:] == IGNORE_INDEX).all() and not train["instruction_mask"][0, -n_pad:].any()
    left = processor([conv("Hello")], padding_side="left")
    assert left["input_ids"].shape[1] == int(train["attention_mask"][0].sum())


def test_max_length_truncates_with_warning(processor, caplog):
    full = processor(conv("Hello", "one two three four five"))
    length = full["input_ids"].shape[1]
    with caplog.at_level("WARNING"):
        cut = processor(conv("Hello", "one two three four five"), max_length=length - 2)
    assert cut["input_ids"].shape[1] == length - 2
    assert "Truncated 1 of 1 samples" in caplog.text


def test_pad_to_square_uses_mean_colour(processor):
    wide = Image.new("RGB", (SIZE, SIZE // 2), (255, 255, 255))
    squared = pad_to_square(wide, processor.image_processor.image_mean)
    assert squared.size == (SIZE, SIZE)
    assert squared.getpixel((0, 0)) == tuple(int(c * 255) for c in processor.image_processor.image_mean)
    px = processor.preprocess_images([wide])[0]
    mean, std = torch.tensor(processor.image_processor.image_mean), torch.tensor(processor.image_processor.image_std)
    assert torch.allclose(px[:, 0, 0], (torch.tensor(squared.getpixel((0, 0))) / 255 - mean) / std, atol=1e-2)
    assert torch.allclose(px[:, SIZE // 2, SIZE // 2], (1 - mean) / std, atol=1e-2)
    stretched = VLMProcessor(processor.tokenizer, SPEC, make_image_processor(SIZE), template="qwen2", pad_to_square=False)
    assert not torch.allclose(stretched.preprocess_images([wide])[0], px)


def test_save_load_round_trip_gives_identical_outputs(processor, tmp_path):
    save_model_config(tmp_path, SPEC)  # a model saved alongside
    processor.save_pretrained(tmp_path)
    loaded = VLMProcessor.from_pretrained(tmp_path)
    saved = json.loads((tmp_path / "vlm_processor_config.json").read_text())
    assert saved["template"] == "qwen2" and "num_visual_tokens" not in saved  # the model config's to keep
    assert (tmp_path / "text_tokenizer").is_dir()
    assert (loaded.template, loaded.num_visual_tokens, loaded.image_token, loaded.text_max_length) == (
        processor.template, N_VIS, "<image>", 77,
    )
    images = [[image(40, 24)], None]
    for answer, kwargs in (("one", {}), (None, {"add_generation_prompt": True})):
        args = ([conv("<image>\nWhat is in the picture?", answer), conv("Hello", answer)], images)
        a, b = processor(*args, **kwargs), loaded(*args, **kwargs)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert loaded.batch_decode(a["input_ids"]) == processor.batch_decode(a["input_ids"])


def test_for_model_reads_the_config_spec_and_tower_and_checks_token(processor):
    tok = processor.tokenizer
    config = fake_config(tok, InputSpec(num_visual_tokens=3),
                         vision_config={"backend": "hf", "model_type": "siglip_vision_model", "image_size": 24})
    p = VLMProcessor.for_model(config, tok, template="qwen2")
    assert p.num_visual_tokens == 3 and p.image_shape == (3, 24, 24) and list(p.image_processor.image_mean) == [0.5] * 3
    assert p.input_spec is config.get_input_spec()

    tower = SimpleNamespace(image_size=16, image_mean=(0.1, 0.2, 0.3), image_std=(1.0, 1.0, 1.0))
    model = SimpleNamespace(config=fake_config(tok, InputSpec(num_visual_tokens=7)), vision_tower=tower)
    p = VLMProcessor.for_model(model, tok, template="qwen2")
    assert p.num_visual_tokens == 7 and p.image_shape == (3, 16, 16)
    model.config = fake_config(tok, InputSpec(num_visual_tokens=7, instruction_text=("pooled",)))
    with pytest.raises(ValueError, match="needs instruction text"):
        VLMProcessor.for_model(model, tok, template="qwen2")
    config.image_token_id = 0
    with pytest.raises(ValueError, match="image_token_id is 0"):
        VLMProcessor.for_model(config, tok, template="qwen2")


def test_high_res_images_become_the_crop_view(processor, tmp_path):
    """With a crop view of scale f = 2 in the input spec: the high-res images, resized to (2H, 2W)
    and normalised as the base images, go row for row into pixel_values_hr; without one they are ignored."""
    spec = InputSpec(num_visual_tokens=N_VIS, image_views=(1, 2))
    hr = VLMProcessor(processor.tokenizer, spec, make_image_processor(SIZE), template="qwen2")
    assert hr.view_shape(2) == (3, 2 * SIZE, 2 * SIZE) and hr.high_res_factor == 2
    exact, big, wide = image(2 * SIZE, 2 * SIZE, seed=4), image(4 * SIZE, 4 * SIZE, seed=5), image(96, 40, seed=6)
    convs = [conv("<image>\nWhat is in the picture?"), conv("Hello"), conv("<image> one <image> two")]
    base = [[image(seed=1)], None, [image(seed=2), image(48, 20, seed=3)]]
    batch = hr(convs, images=base, high_res_images=[[exact], None, [big, wide]])
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["pixel_values_hr"].shape == (3, 3, 2 * SIZE, 2 * SIZE)
    # An image already at (2H, 2W) is not resampled, only normalised with the base images' mean and std.
    mean, std = torch.tensor(hr.image_processor.image_mean)[:, None, None], torch.tensor(hr.image_processor.image_std)[:, None, None]
    raw = torch.from_numpy(np.array(exact)).permute(2, 0, 1).float() / 255
    assert torch.allclose(batch["pixel_values_hr"][0], (raw - mean) / std, atol=1e-5)
    assert torch.allclose(batch["pixel_values_hr"][1:], hr.preprocess_images([big, wide], scale=2))
    assert torch.equal(batch["pixel_values"], processor(convs, images=base)["pixel_values"])  # base rows unchanged

    assert "pixel_values_hr" not in hr(convs, images=base)  # no high-res images given
    assert "pixel_values_hr" not in processor(convs, images=base, high_res_images=[[exact], None, [big, wide]])  # no crop view
    with pytest.raises(ValueError, match=r"Sample 2 has 2 image\(s\) but 1 high-res image\(s\)"):
        hr(convs, images=base, high_res_images=[[exact], None, [big]])
    with pytest.raises(ValueError, match=r"scale=2 is not one of the input spec's image views \(1,\)"):
        processor.preprocess_images([exact], scale=2)

    # The view comes back from the model config saved beside the processor.
    save_model_config(tmp_path, spec)
    hr.save_pretrained(tmp_path)
    assert VLMProcessor.from_pretrained(tmp_path).input_spec == spec


def test_a_folder_saved_before_the_spec_lived_in_the_model_config_still_loads(processor, tmp_path):
    """An old folder: its config.json has no input_spec and its processor config holds the counts."""
    old = {"processor_class": "VLMProcessor", "template": "qwen2", "image_token": "<image>", "num_visual_tokens": 7,
           "text_max_length": 77, "pad_to_square": True, "high_res_factor": 2, "instruction_rule": "before_reply_role",
           "visual_tokens_first": True}
    processor.save_pretrained(tmp_path)
    (tmp_path / "vlm_processor_config.json").write_text(json.dumps(old))
    save_model_config(tmp_path, None)
    loaded = VLMProcessor.from_pretrained(tmp_path)
    assert loaded.input_spec == InputSpec(num_visual_tokens=7, image_views=(1, 2), instruction_span_rule="before_reply_role",
                                          visual_tokens_first=True)
    del old["num_visual_tokens"]
    (tmp_path / "vlm_processor_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"holds no input spec: no 'input_spec' in config\.json"):
        VLMProcessor.from_pretrained(tmp_path)


def test_images_already_at_the_tower_size_are_only_normalised_as_the_image_processor_would(processor) -> None:
    """The fast path (no per-image processor call) gives the image processor's pixels; other sizes
    still go through the image processor."""
    ip = processor.image_processor
    same = [image(seed=s) for s in range(3)]
    fast = processor.preprocess_images(same)
    assert fast.shape == (3, 3, SIZE, SIZE)
    torch.testing.assert_close(fast, ip(same, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=1e-5)
    other = [image(w=SIZE + 8, h=SIZE + 8, seed=4)]
    assert processor._normalize_only(other, (3, SIZE, SIZE)) is None
    torch.testing.assert_close(processor.preprocess_images(other), ip(other, return_tensors="pt")["pixel_values"])


def test_layout_settings_come_from_the_spec_and_survive_with_template(processor, tmp_path):
    """instruction_rule and visual_tokens_first are the input spec's; the processor saves neither,
    reads them back from the model config, and keeps them under another template."""
    tok = processor.tokenizer
    spec = InputSpec(num_visual_tokens=N_VIS, instruction_span=True, instruction_span_rule="before_reply_role",
                     visual_tokens_first=True)
    tower = SimpleNamespace(image_size=SIZE, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    p = VLMProcessor.for_model(SimpleNamespace(config=fake_config(tok, spec), vision_tower=tower), tok, template="qwen2")
    assert (p.instruction_rule, p.visual_tokens_first) == ("before_reply_role", True)
    batch = p([conv("What is in the picture? <image>", None)], images=[[image()]], add_generation_prompt=True)
    ids = batch["input_ids"][0]
    assert (ids[:N_VIS] == p.image_token_id).all() and not (ids[N_VIS:] == p.image_token_id).any()
    header = tok("<|im_start|>", add_special_tokens=False)["input_ids"]
    assert batch["instruction_mask"][0].tolist() == [False] * N_VIS + [True] * (len(ids) - N_VIS - 2) + [False] * 2
    assert ids[-3].item() == header[0]  # the last flagged token: the header's <|im_start|> (then "assistant", "\n")
    save_model_config(tmp_path, spec)
    p.save_pretrained(tmp_path)
    loaded = VLMProcessor.from_pretrained(tmp_path)
    assert loaded.input_spec == spec
    assert torch.equal(loaded([conv("What is in the picture? <image>")], images=[[image()]])["input_ids"],
                       p([conv("What is in the picture? <image>")], images=[[image()]])["input_ids"])
    again = p.with_template("vicuna_v1")
    assert again.input_spec is spec and again.template.name == "vicuna_v1"


def test_a_stage_can_centre_crop_instead_of_padding(processor):
    """with_template(..., pad_to_square=False) (a stage's pad_to_square: false) lets the
    image processor resize the short side and centre-crop; True pads with the mean colour."""
    wide = image(2 * SIZE, SIZE, seed=7)
    crop = processor.with_template("qwen2", pad_to_square=False)
    assert not crop.pad_to_square and processor.pad_to_square
    centre = wide.crop((SIZE // 2, 0, SIZE // 2 + SIZE, SIZE))  # the middle SIZE x SIZE square
    torch.testing.assert_close(crop.preprocess_images([wide]), processor.preprocess_images([centre]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(processor.preprocess_images([wide]), processor.preprocess_images([centre]))
    assert processor.with_template("qwen2") is processor
    assert crop.with_template("qwen2", pad_to_square=True).pad_to_square


@pytest.mark.parametrize("strategy", ["llava", "crop_tokens"])
def test_a_saved_model_folder_gives_its_processor_the_model_spec_with_no_override(processor, tmp_path, strategy):
    """The model writes its strategy's spec into its config; model and processor then load from the
    folder with plain from_pretrained calls, and the processor serves exactly that spec (crop view
    included); a processor for a model rebuilt with other fields takes that model's config."""
    from tiny import tiny_model

    from vlmzoo import VLMForConditionalGeneration

    model = tiny_model(strategy)
    spec = model.strategy.input_spec
    assert model.config.get_input_spec() == spec
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = VLMForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.get_input_spec() == spec
    assert VLMProcessor.from_pretrained(tmp_path).input_spec == spec
    assert (spec.high_res_factor, spec.image_views) == ((2, (1, 2)) if strategy == "crop_tokens" else (1, (1,)))
    other = tiny_model(strategy, strategy_config={"vision_layer": -1} if strategy == "llava" else {"include_base": False})
    assert VLMProcessor.from_pretrained(tmp_path, config=other.config).input_spec == other.strategy.input_spec


def test_input_spec_round_trips_through_json_and_rejects_bad_views():
    spec = InputSpec(num_visual_tokens=24, image_views=(1, 2), instruction_text=("pooled", "tokens"))
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec and spec.high_res_factor == 2
    for views in [(2,), (1, 1), (1, 2, 3), (1, 0)]:
        with pytest.raises(ValueError, match="image_views"):
            InputSpec(num_visual_tokens=3, image_views=views)
    with pytest.raises(ValueError, match=r"config\.input_spec must be a mapping with 'num_visual_tokens'"):
        InputSpec.from_dict({"image_views": [1]}, where="config.input_spec")
