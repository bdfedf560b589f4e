"""Per-turn regions: records parse and validate them, the processor and collator rasterise the query's
boxes to a (N, P) patch mask for a model whose input spec asks, and nothing changes for one that does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_templates import build_word_tokenizer
from vlmzoo.data import LlavaDataError, LlavaJsonDataset, VLMDataCollator, normalize_record
from vlmzoo.data.regions import query_regions, region_patch_mask
from vlmzoo.evaluation import image_first_messages, load_eval_records
from vlmzoo.processing import VLMProcessor, make_image_processor
from vlmzoo.strategy import InputSpec, StrategyNeeds

N_VIS, SIZE, GRID = 3, 16, 4
Q = "where is the red circle?"


def _processor(grid: int) -> VLMProcessor:
    return VLMProcessor(build_word_tokenizer(), image_processor=make_image_processor(SIZE), template="vicuna_v1",
                        input_spec=InputSpec(num_visual_tokens=N_VIS, query_region_grid=grid))


def human(v: str, regions=None) -> dict:
    return {"from": "human", "value": v, **({} if regions is None else {"regions": regions})}


def gpt(v: str) -> dict:
    return {"from": "gpt", "value": v}


CELL_B3 = [0.25, 0.5, 0.5, 0.75]  # column b, row 3 of a 4 x 4 grid: patch 2 * 4 + 1 = 9
RECORDS = [
    # two turns: the query is the last human turn (a2 = patch 4), not the first
    {"id": "two-turns", "image": "a.png",
     "conversations": [human("<image>\n" + Q, [CELL_B3]), gpt("b3"), human("what colour is it?", [[0, 0.25, 0.25, 0.5]]),
                       gpt("red")]},
    {"id": "text", "conversations": [human("hello"), gpt("one")]},  # no image: no regions needed
    {"id": "count", "image": "a.png", "conversations": [human("<image>\nhow many?", []), gpt("two")]},
]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    return tmp_path


def load(folder, processor, records, name="data.json", **kwargs) -> LlavaJsonDataset:
    path = folder / name
    path.write_text(json.dumps(records))
    return LlavaJsonDataset(path, processor, folder / "img", cache_dir=str(folder / "cache"), **kwargs)


def test_rasterise_known_boxes():
    """Row-major patches, 1 where the patch centre lies in any box (edges included)."""
    assert region_patch_mask([CELL_B3], GRID).nonzero().flatten().tolist() == [9]
    assert region_patch_mask([], GRID).sum() == 0
    # a 2 x 2 block of cells (c1..d2) and, in a union, the top-left cell
    mask = region_patch_mask([[0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 0.25, 0.25]], GRID)
    assert mask.dtype == torch.float32 and mask.shape == (16,)
    assert mask.nonzero().flatten().tolist() == [0, 2, 3, 6, 7]
    # a box ending exactly on the first patch centre (0.125) covers it; one just short of it does not
    assert region_patch_mask([[0, 0, 0.125, 0.125]], GRID).nonzero().flatten().tolist() == [0]
    assert region_patch_mask([[0, 0, 0.12, 0.12]], GRID).sum() == 0
    # the whole image on a 2 x 2 grid
    assert region_patch_mask([[0, 0, 1, 1]], 2).tolist() == [1.0] * 4


def test_records_keep_the_regions_of_human_turns():
    rec = normalize_record(RECORDS[0], 0)
    assert rec["messages"][0] == {"role": "user", "content": "<image>\n" + Q, "regions": [CELL_B3]}
    assert "regions" not in rec["messages"][1] and query_regions(rec["messages"]) == [[0.0, 0.25, 0.25, 0.5]]
    assert query_regions(normalize_record(RECORDS[1], 1)["messages"]) is None  # no field
    assert query_regions(normalize_record(RECORDS[2], 2)["messages"]) == []  # names nothing


BAD_REGIONS = {
    "outside the image": (human("<image>\nhi", [[0.5, 0.5, 1.5, 1.0]]), r"'regions' box 0 is \[0.5, 0.5, 1.5, 1.0\]"),
    "empty box": (human("<image>\nhi", [[0.0, 0.0, 1.0, 1.0], [0.5, 0.2, 0.5, 0.4]]), "'regions' box 1 is"),
    "three numbers": (human("<image>\nhi", [[0.1, 0.2, 0.3]]), "x0 < x1 <= 1"),
    "not a list": (human("<image>\nhi", "b3"), "'regions' must be a list of"),
    "a bool": (human("<image>\nhi", [[False, 0, 1, 1]]), "'regions' box 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_REGIONS))
def test_bad_regions_raise_naming_file_and_record(folder, case):
    turn, reason = BAD_REGIONS[case]
    record = {"id": f"bad-{case.replace(' ', '-')}", "image": "a.png", "conversations": [turn, gpt("one")]}
    name = f"{case.replace(' ', '_')}.json"
    with pytest.raises(LlavaDataError, match=reason) as err:
        load(folder, _processor(0), [RECORDS[1], record], name=name)  # even a model that reads no regions refuses them
    assert name in str(err.value) and repr(record["id"]) in str(err.value) and "(#1)" in str(err.value)
    assert "turn 0" in str(err.value)
    # the eval reader too
    with pytest.raises(LlavaDataError, match=reason) as err:
        load_eval_records(folder / name)
    assert repr(record["id"]) in str(err.value)


def test_regions_on_an_answer_are_refused(folder):
    record = {"id": "on-gpt", "image": "a.png", "conversations": [human("<image>\nhi"), {**gpt("one"), "regions": []}]}
    with pytest.raises(LlavaDataError, match=r"record 'on-gpt'.*turn 1 \(assistant\) has 'regions'"):
        load(folder, _processor(0), [record])


def test_collator_rasterises_the_query_regions(folder):
    processor = _processor(GRID)
    ds = load(folder, processor, RECORDS)
    assert [ds[i]["query_regions"] for i in range(3)] == [[[0.0, 0.25, 0.25, 0.5]], None, []]
    batch = VLMDataCollator(processor)([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 2 and batch["region_mask"].shape == (2, GRID * GRID)
    expected = torch.zeros(2, GRID * GRID)
    expected[0, 4] = 1  # a2: row 1, column 0 -- the last human turn's box, not the first turn's b3
    assert torch.equal(batch["region_mask"], expected)


def test_a_record_without_the_query_regions_is_named(folder, caplog):
    missing = {"id": "no-regions", "image": "a.png", "conversations": [human("<image>\nhi", [CELL_B3]), gpt("one"),
                                                                        human("and?"), gpt("two")]}
    with pytest.raises(LlavaDataError, match=r"data.json: record 'no-regions' \(#3\): its query .* has no 'regions'"):
        load(folder, _processor(GRID), [*RECORDS, missing])
    ds = load(folder, _processor(GRID), [*RECORDS, missing], name="skip.json", on_error="skip")
    assert [s.record_id for s in ds.skipped] == ["no-regions"] and len(ds) == 3
    # a model that reads no regions takes the record as it is
    assert len(load(folder, _processor(0), [*RECORDS, missing], name="plain.json")) == 4


def test_processor_call_reads_the_last_user_message_and_names_a_sample_without_regions(folder):
    processor = _processor(GRID)
    image = Image.open(folder / "img" / "a.png")
    conv = [{"role": "user", "content": "<image>\n" + Q, "regions": [CELL_B3]}]
    batch = processor([conv, conv[:0] + [{"role": "user", "content": "hi"}]], images=[[image], None],
                      add_generation_prompt=True)
    assert batch["region_mask"].shape == (1, 16) and batch["region_mask"][0].nonzero().flatten().tolist() == [9]
    with pytest.raises(ValueError, match=r"Sample 1 has an image but its query .* has no 'regions'"):
        processor([conv, [{"role": "user", "content": "<image>\nhi"}]], images=[[image], [image]], add_generation_prompt=True)
    # the eval's prompt layout keeps the regions with their turn
    moved = image_first_messages([{"role": "user", "content": Q + "\n<image>", "regions": [CELL_B3]}], 1)
    assert moved == [{"role": "user", "content": "<image>\n" + Q, "regions": [CELL_B3]}]


def test_a_spec_without_regions_adds_no_key(folder):
    """Data with regions, a model that reads none: items and batches are those of data without regions."""
    plain = _processor(0)
    with_regions = load(folder, plain, RECORDS)
    stripped = [{**r, "conversations": [{k: v for k, v in t.items() if k != "regions"} for t in r["conversations"]]}
                for r in RECORDS]
    without = load(folder, plain, stripped, name="stripped.json")
    collate = VLMDataCollator(plain)
    a, b = collate([with_regions[i] for i in range(3)]), collate([without[i] for i in range(3)])
    assert "query_regions" not in with_regions[0] and "region_mask" not in a
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    image = Image.open(folder / "img" / "a.png")
    call = plain([[{"role": "user", "content": "<image>\nhi", "regions": [CELL_B3]}]], images=[[image]])
    assert "region_mask" not in call


def test_input_spec_carries_the_region_grid():
    spec = InputSpec.from_needs(StrategyNeeds(query_regions=True), num_visual_tokens=16, num_patches=16)
    assert spec.query_region_grid == 4 and spec.query_regions
    assert InputSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "query_region_grid"}  # a config saved before regions
    assert not InputSpec.from_dict(old).query_regions
    assert InputSpec.from_needs(StrategyNeeds(), 16, 16).query_region_grid == 0
    with pytest.raises(ValueError, match="square patch grid, but the tower has 12 patches"):
        InputSpec.from_needs(StrategyNeeds(query_regions=True), 12, 12)
    with pytest.raises(ValueError, match="query_region_grid must be an integer >= 0"):
        InputSpec(num_visual_tokens=1, query_region_grid=-1)
