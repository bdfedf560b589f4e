"""LLaVA JSON loading: records, caching, collation, truncation counts, bad-data errors and skip mode."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_templates import build_word_tokenizer
from vlmzoo.data import IGNORE_INDEX, LlavaDataError, LlavaJsonDataset, VLMDataCollator, iter_json_records
from vlmzoo.processing import VLMProcessor, make_image_processor
from vlmzoo.strategy import InputSpec

N_VIS = 3
SIZE = 16
Q, A = "What is in the picture?", "A cat on a mat."


def _processor(high_res_factor: int = 1) -> VLMProcessor:
    return VLMProcessor(
        build_word_tokenizer(),
        image_processor=make_image_processor(SIZE),
        text_tokenizer=build_word_tokenizer(auto_bos=True),
        template="vicuna_v1",
        input_spec=InputSpec(num_visual_tokens=N_VIS, image_views=(1,) if high_res_factor == 1 else (1, high_res_factor)),
    )


@pytest.fixture(scope="module")
def processor() -> VLMProcessor:
    return _processor()


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / "sub" / "b.jpg")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return tmp_path


def human(v: str) -> dict:
    return {"from": "human", "value": v}


def gpt(v: str) -> dict:
    return {"from": "gpt", "value": v}


GOOD = [
    {"id": "multi", "image": "a.png", "conversations": [human("<image>\n" + Q), gpt(A), human("What colour is it?"), gpt("It is black.")]},
    {"id": "text", "conversations": [human("Hello there"), gpt("one two three four five six seven eight nine ten")]},
    {"id": "at-end", "image": "sub/b.jpg", "conversations": [human(Q + "\n<image>"), gpt("A dog.")]},
]


def write(folder, records, name="data.json") -> str:
    path = folder / name
    path.write_text(records if isinstance(records, str) else json.dumps(records, indent=1))
    return str(path)


def load(folder, processor, records, name="data.json", **kwargs) -> LlavaJsonDataset:
    path = write(folder, records, name)
    return LlavaJsonDataset(path, processor, folder / "img", cache_dir=str(folder / "cache"), **kwargs)


def decode(processor, ids) -> str:
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def test_loads_text_only_multi_turn_and_image_at_end(folder, processor):
    ds = load(folder, processor, GOOD)
    assert len(ds) == 3 and ds.num_records == 3 and ds.skipped == []
    multi, text, at_end = ds[0], ds[1], ds[2]
    assert multi["pixel_values"].shape == (1, 3, SIZE, SIZE) and text["pixel_values"].shape == (0, 3, SIZE, SIZE)
    img = "<image>" * N_VIS
    # Same tokens as the processor's own encoding of the converted messages.
    expected = processor.encode([{"role": "user", "content": "<image>\n" + Q}, {"role": "assistant", "content": A},
                                 {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "It is black."}])
    assert multi["input_ids"] == expected.input_ids and multi["labels"] == expected.labels
    assert multi["instruction_text"] == "What colour is it?"  # the last user turn
    # "<image>" at the end of the turn is moved to the front, as LLaVA-1.5 does.
    assert f"USER: {img}\n{Q} ASSISTANT: A dog.</s>" in decode(processor, at_end["input_ids"])
    assert text["instruction_text"] == "Hello there" and ds.modality_lengths[1] < 0 < ds.modality_lengths[0]

    kept = load(folder, processor, GOOD, name="kept.json", move_image_to_front=False)
    assert f"USER: {Q}\n{img} ASSISTANT: A dog.</s>" in decode(processor, kept[2]["input_ids"])


def test_collator_shapes_and_padding(folder, processor):
    ds = load(folder, processor, GOOD)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=VLMDataCollator(processor))
    batch = next(iter(loader))
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["instruction_input_ids"].shape[0] == 2 == batch["instruction_attention_mask"].shape[0]
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [N_VIS, 0, N_VIS]
    for row, n in enumerate(lengths):  # right padding: pad id, no loss, no instruction
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and not batch["instruction_mask"][row, n:].any()
    assert batch["pixel_values"].dtype == torch.float32 and batch["instruction_mask"].dtype == torch.bool


def test_jsonl_and_cache_invalidation(folder, processor):
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    ds = LlavaJsonDataset(path, processor, folder / "img", cache_dir=str(folder / "cache"))
    assert [ds[i]["id"] for i in range(3)] == ["multi", "text", "at-end"]
    again = LlavaJsonDataset(path, processor, folder / "img", cache_dir=str(folder / "cache"))
    assert again.data.cache_files == ds.data.cache_files  # reused
    path.write_text(json.dumps(GOOD[1]) + "\n")
    os.utime(path, ns=(1, 1))  # make sure the stamp changes even on coarse clocks
    changed = LlavaJsonDataset(path, processor, folder / "img", cache_dir=str(folder / "cache"))
    assert len(changed) == 1 and changed[0]["id"] == "text"


def test_truncation_is_counted_in_one_warning(folder, processor, caplog):
    full = load(folder, processor, GOOD)
    n_long = sum(n > 70 for n in full.lengths)
    assert 0 < n_long < 3 or n_long == 3
    with caplog.at_level("WARNING"):
        ds = load(folder, processor, GOOD, name="trunc.json", max_length=70)
    assert ds.num_truncated == n_long and len(ds) == 3 and max(ds.lengths) == 70
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(lines) == 1 and f"truncated {n_long} of 3 records to max_length=70" in lines[0]
    assert ds[0]["input_ids"] == full[0]["input_ids"][:70]


def test_incremental_parser_across_chunk_boundaries(folder):
    path = write(folder, GOOD)
    assert [r for _, r in iter_json_records(path, chunk_chars=7)] == GOOD
    for indent in (None, 2):  # one long line, and many lines
        text = json.dumps(GOOD, indent=indent)
        broken = text[:-40] + "}" + text[-40:]
        path = write(folder, broken, "broken.json")
        with pytest.raises(json.JSONDecodeError) as ref:
            json.loads(broken)
        for chunk in (5, 64, 1 << 20):
            with pytest.raises(LlavaDataError, match=f"line {ref.value.lineno}, column {ref.value.colno} .character {ref.value.pos}"):
                list(iter_json_records(path, chunk_chars=chunk))


BAD_CASES = {
    "missing image": ({"id": "bad-missing", "image": "nope.png", "conversations": [human("<image>\nHi"), gpt("one")]}, "image file not found"),
    "count mismatch": ({"id": "bad-count", "image": "a.png", "conversations": [human("Hi"), gpt("one")]},
                       r"0 <image> placeholder\(s\) in its conversations but 1 image\(s\)"),
    "placeholder without image": ({"id": "bad-noimg", "conversations": [human("<image> Hi"), gpt("one")]}, r"1 <image> placeholder\(s\).*but 0 image"),
    "placeholder in answer": ({"id": "bad-gpt", "conversations": [human("Hi"), gpt("<image>")]}, "images belong in human turns"),
    "wrong role order": ({"id": "bad-order", "conversations": [gpt("one"), human("Hi")]}, "'user' was expected"),
    "no conversations": ({"id": "bad-empty", "conversations": []}, "non-empty list"),
    "image truncated": ({"id": "bad-trunc", "image": "a.png",
                         "conversations": [human("one two three four five six seven"), gpt("eight nine ten"), human("<image>"), gpt("one")]},
                        "would cut into image 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_naming_file_and_record(folder, processor, case):
    record, reason = BAD_CASES[case]
    with pytest.raises(LlavaDataError, match=reason) as err:
        load(folder, processor, [GOOD[1], record], name=f"{case.replace(' ', '_')}.json", max_length=70)
    message = str(err.value)
    assert f"{case.replace(' ', '_')}.json" in message and repr(record["id"]) in message and "(#1)" in message


def test_corrupt_image_raises_naming_file_and_record(folder, processor):
    record = {"id": "bad-corrupt", "image": "corrupt.png", "conversations": [human("<image>\nHi"), gpt("one")]}
    ds = load(folder, processor, [GOOD[1], record], name="corrupt.json")  # the file exists: found on access
    with pytest.raises(LlavaDataError, match=r"corrupt\.json: record 'bad-corrupt' \(#1\): cannot read image .*corrupt\.png"):
        ds[1]
    with pytest.raises(LlavaDataError, match=r"corrupt\.json: record 'bad-corrupt'"):
        load(folder, processor, [GOOD[1], record], name="corrupt.json", check_images="decode")


@pytest.mark.parametrize(
    "text, reason",
    [("", "the file is empty"), ("  \n", "the file is empty"), ("[]", "array is empty"), ('{"a": 1}', "'conversations' must be")],
)
def test_empty_or_degenerate_files(folder, processor, text, reason):
    with pytest.raises(LlavaDataError, match=reason) as err:
        load(folder, processor, text, name="degenerate.json")
    assert "degenerate.json" in str(err.value)


def test_malformed_json_names_position_and_record(folder, processor):
    text = json.dumps(GOOD[:2], indent=1) [:-2] + ',\n {"id": "bad-json", "conversations": [{"from": "human" "value": "x"}]}\n]'
    with pytest.raises(LlavaDataError, match=r"malformed\.json: record 'bad-json' \(#2\): malformed JSON at line \d+, column \d+") as err:
        load(folder, processor, text, name="malformed.json")
    assert "Expecting ',' delimiter" in str(err.value)
    with pytest.raises(LlavaDataError, match="malformed.json.*expected ',' or ']'"):
        load(folder, processor, '[{"id": "x", "conversations": []} {"id": "y"}]', name="malformed.json")
    with pytest.raises(LlavaDataError, match="malformed.json.*ends inside the array"):
        load(folder, processor, json.dumps(GOOD)[:-1] + ",", name="malformed.json")


def test_skip_mode_counts_and_reports(folder, processor, caplog):
    bad = [BAD_CASES[c][0] for c in ("missing image", "count mismatch", "wrong role order", "image truncated")]
    corrupt = {"id": "bad-corrupt", "image": "corrupt.png", "conversations": [human("<image>\nHi"), gpt("one")]}
    with caplog.at_level("WARNING"):
        ds = load(folder, processor, [bad[0], GOOD[0], bad[1], GOOD[1], bad[2], corrupt, bad[3]], max_length=70, on_error="skip")
    assert [s.record_id for s in ds.skipped] == ["bad-missing", "bad-count", "bad-order", "bad-trunc"]
    assert [s.index for s in ds.skipped] == [0, 2, 4, 6] and "image file not found" in ds.skipped[0].reason
    assert len(ds) == 3 and [ds.data[i]["id"] for i in range(3)] == ["multi", "text", "bad-corrupt"]
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1 and "skipped 4 of 7 records" in summary[0]
    assert all(rid in summary[0] for rid in ("bad-missing", "bad-count", "bad-order", "bad-trunc"))
    # An unreadable image found on access is reported and replaced by the next record.
    caplog.clear()
    with caplog.at_level("WARNING"):
        item = ds[2]
    assert item["id"] == "multi" and [s.record_id for s in ds.runtime_skipped] == ["bad-corrupt"]
    assert "bad-corrupt" in caplog.text


# ---- native high-resolution images (pixel_values_hr) ------------------------------------------------


@pytest.fixture(scope="module")
def hr_processor() -> VLMProcessor:
    """As ``processor``, for a strategy with 2x high-res crops (``StrategyNeeds.high_res_factor=2``)."""
    return _processor(high_res_factor=2)


@pytest.fixture
def hr_folder(tmp_path):
    """``img_2x/``: random pictures at 2x the tower's size (one square, one 3:2); ``img/``: each
    box-downsampled by 2, as a renderer would draw the same scene at the base resolution."""
    rng = np.random.default_rng(3)
    for rel, (w, h) in (("sq.png", (2 * SIZE, 2 * SIZE)), ("sub/wide.png", (60, 40))):
        big = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for folder, im in (("img_2x", big), ("img", big.resize((w // 2, h // 2), Image.Resampling.BOX))):
            (tmp_path / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            im.save(tmp_path / folder / rel)
    return tmp_path


HR_RECORDS = [
    {"id": "sq", "image": "sq.png", "conversations": [human("<image>\n" + Q), gpt(A)]},
    {"id": "text", "conversations": [human("Hello there"), gpt("one two")]},
    {"id": "wide", "image": "sub/wide.png", "conversations": [human("<image>\n" + Q), gpt("A dog.")]},
]


def test_high_res_folder_gives_pixel_values_hr_row_for_row(hr_folder, hr_processor):
    ds = load(hr_folder, hr_processor, HR_RECORDS, high_res_folder=hr_folder / "img_2x")
    assert ds[0]["pixel_values_hr"].shape == (1, 3, 2 * SIZE, 2 * SIZE) and ds[1]["pixel_values_hr"].shape == (0, 3, 2 * SIZE, 2 * SIZE)
    batch = VLMDataCollator(hr_processor)([ds[i] for i in range(3)])
    pv, hr = batch["pixel_values"], batch["pixel_values_hr"]
    assert pv.shape == (2, 3, SIZE, SIZE) and hr.shape == (2, 3, 2 * SIZE, 2 * SIZE) and hr.dtype == pv.dtype
    # The 2x box-mean of each high-res row is its base row: the same picture, aligned row for row.
    down = torch.nn.functional.avg_pool2d(hr, 2)
    assert (down[0] - pv[0]).abs().max() < 0.03  # both exactly sized: only the uint8 rounding of the base PNG
    assert (down[1] - pv[1]).abs().mean() < 0.1  # padded to a square and resized: bicubic differences
    assert (down[0] - pv[1]).abs().mean() > 0.3 and (down[1] - pv[0]).abs().mean() > 0.3  # not the other row
    # A high-res image already at 2x the tower's size is only normalised (same mean/std as the base).
    mean = torch.tensor(hr_processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(hr_processor.image_processor.image_std)[:, None, None]
    raw = torch.from_numpy(np.array(Image.open(hr_folder / "img_2x" / "sq.png"))).permute(2, 0, 1).float() / 255
    assert torch.allclose(hr[0], (raw - mean) / std, atol=1e-5)


def test_missing_or_mismatched_high_res_file_names_path_and_record(hr_folder, hr_processor):
    (hr_folder / "img_2x" / "sub" / "wide.png").unlink()
    with pytest.raises(LlavaDataError, match=r"record 'wide' \(#2\): high-res image file not found: .*img_2x/sub/wide\.png"):
        load(hr_folder, hr_processor, HR_RECORDS, high_res_folder=hr_folder / "img_2x")
    # Found on access too (no check at load time), never replaced by the upsampled base image.
    ds = load(hr_folder, hr_processor, HR_RECORDS, high_res_folder=hr_folder / "img_2x", check_images="none")
    assert "pixel_values_hr" in ds[0]
    with pytest.raises(LlavaDataError, match=r"record 'wide' \(#2\): high-res image file not found: .*img_2x/sub/wide\.png"):
        ds[2]
    # A file of another aspect ratio is not the same picture.
    Image.new("RGB", (64, 64)).save(hr_folder / "img_2x" / "sub" / "wide.png")
    ds = load(hr_folder, hr_processor, HR_RECORDS, high_res_folder=hr_folder / "img_2x")
    with pytest.raises(LlavaDataError, match=r"record 'wide' \(#2\): the high-res image is 64x64 pixels, its base image 30x20"):
        ds[2]


def test_records_whose_features_are_cached_are_not_read(hr_folder, hr_processor):
    ds = load(hr_folder, hr_processor, HR_RECORDS, high_res_folder=hr_folder / "img_2x")
    keys = [ds[i]["image_keys"] for i in range(3)]
    sq = f"{hr_folder / 'img' / 'sq.png'}|{hr_folder / 'img_2x' / 'sq.png'}"
    assert keys == [[sq], [], [sq.replace("sq.png", "sub/wide.png")]]
    batch = VLMDataCollator(hr_processor)([ds[i] for i in range(3)])
    assert batch["image_keys"] == keys[0] + keys[2]  # row for row with pixel_values

    cached = load(hr_folder, hr_processor, HR_RECORDS, high_res_folder=hr_folder / "img_2x",
                  features_cached=lambda key: key == sq)
    (hr_folder / "img" / "sq.png").unlink()  # a cached record is never opened
    item = cached[0]
    assert item["pixel_values"].shape == (1, 3, SIZE, SIZE) and item["pixel_values"].isnan().all()
    assert item["pixel_values_hr"].shape == (1, 3, 2 * SIZE, 2 * SIZE) and item["pixel_values_hr"].isnan().all()
    assert not cached[2]["pixel_values"].isnan().any() and cached.reads_saved == 1  # not cached: read as always
    with pytest.raises(LlavaDataError, match=r"record 'sq' \(#0\): image file not found"):
        ds[0]


def test_no_high_res_folder_or_factor_means_no_pixel_values_hr(hr_folder, hr_processor, processor):
    without_folder = load(hr_folder, hr_processor, HR_RECORDS)
    assert "pixel_values_hr" not in without_folder[0]
    assert "pixel_values_hr" not in VLMDataCollator(hr_processor)([without_folder[i] for i in range(3)])
    # A strategy without a high-res factor never reads the folder (here: one without the files).
    (hr_folder / "empty").mkdir()
    no_factor = load(hr_folder, processor, HR_RECORDS, name="f1.json", high_res_folder=hr_folder / "empty")
    assert list(no_factor.view_folders) == [1] and "pixel_values_hr" not in no_factor[0]
    assert "pixel_values_hr" not in VLMDataCollator(processor)([no_factor[i] for i in range(3)])
