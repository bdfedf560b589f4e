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
from vlmzoo.strategy import StrategyNeeds

N_VIS = 5
SIZE = 32


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
        num_visual_tokens=N_VIS,
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
    stretched = VLMProcessor(processor.tokenizer, make_image_processor(SIZE), template="qwen2", num_visual_tokens=N_VIS, pad_to_square=False)
    assert not torch.allclose(stretched.preprocess_images([wide])[0], px)


def test_save_load_round_trip_gives_identical_outputs(processor, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vlmzoo"}))  # a model saved alongside
    processor.save_pretrained(tmp_path)
    loaded = VLMProcessor.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "vlm_processor_config.json").read_text())["template"] == "qwen2"
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


def test_for_model_reads_strategy_tower_and_checks_token(processor):
    tok = processor.tokenizer
    config = SimpleNamespace(
        image_token="<image>", image_token_id=tok.convert_tokens_to_ids("<image>"), strategy="llava",
        vision_config={"backend": "hf", "model_type": "siglip_vision_model", "image_size": 24},
    )
    with pytest.raises(ValueError, match="pass num_visual_tokens"):
        VLMProcessor.for_model(config, tok, template="qwen2")
    p = VLMProcessor.for_model(config, tok, template="qwen2", num_visual_tokens=3)
    assert p.num_visual_tokens == 3 and p.image_shape == (3, 24, 24) and list(p.image_processor.image_mean) == [0.5] * 3

    tower = SimpleNamespace(image_size=16, image_mean=(0.1, 0.2, 0.3), image_std=(1.0, 1.0, 1.0))
    model = SimpleNamespace(config=config, vision_tower=tower, strategy=SimpleNamespace(num_visual_tokens=7, needs=StrategyNeeds()))
    p = VLMProcessor.for_model(model, tok, template="qwen2")
    assert p.num_visual_tokens == 7 and p.image_shape == (3, 16, 16)
    model.strategy.needs = StrategyNeeds(instruction_text=("pooled",))
    with pytest.raises(ValueError, match="needs instruction text"):
        VLMProcessor.for_model(model, tok, template="qwen2")
    config.image_token_id = 0
    with pytest.raises(ValueError, match="image_token_id is 0"):
        VLMProcessor.for_model(config, tok, template="qwen2", num_visual_tokens=3)
