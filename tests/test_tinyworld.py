"""The tiny world (:mod:`vlmzoo_lab.tinyworld`): determinism, caching, the data contract, fine marks,
the tokenizer, the saved towers and the embedding-collapse check, on :func:`small_test_config`.

One real world is built per module (seconds); cache-logic tests replace the expensive build by
a stub so that only ``build_tiny_world``'s own bookkeeping is exercised.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import vlmzoo_lab.tinyworld as tw
from vlmzoo.data import LlavaJsonDataset
from vlmzoo.processing import VLMProcessor
from vlmzoo.strategy import InputSpec
from vlmzoo_lab.tinyworld import QUESTION_TYPES, build_tiny_world, small_test_config
from vlmzoo_lab.tinyworld.generate import generate_world
from vlmzoo_lab.tinyworld.pretrain import (
    base_view, check_word_embeddings, embedding_cosines, normalize, question_word_groups, word_groups,
)
from vlmzoo_lab.tinyworld.questions import NUMBER_WORDS, POPE_SPLITS, answer_choices, plural, question_types
from vlmzoo_lab.tinyworld.scene import (
    MARK_RGB,
    box_downsample,
    cell_name,
    kind_prior,
    mark_box,
    render,
    sample_scene,
    shaded,
)
from vlmzoo_lab.tinyworld.tokenizer import IMAGE, template_texts, vicuna_prompt
from vlmzoo.towers.vision import build_vision_tower, load_pretrained_vision_tower

CFG = small_test_config()
TYPES = question_types(CFG)
DATA_FILES = ("stage1_captions.json", "stage2_instruct.json", "eval.json", "scenes.json", "world.json")


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tw.TinyWorldPaths:
    """The real build of ``small_test_config()`` (data, tokenizer, tiny CLIP, tiny Llama)."""
    return build_tiny_world(tmp_path_factory.mktemp("cache"), CFG, log=_quiet)


@pytest.fixture(scope="module")
def data(world) -> dict[str, Any]:
    return {name: json.loads((world.data_dir / name).read_text()) for name in DATA_FILES}


@pytest.fixture(scope="module")
def tokenizer(world):
    return AutoTokenizer.from_pretrained(world.tokenizer_dir)


# ---------------------------------------------------------------------------- helpers
def _image_bytes(data_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for sub in ("images", "images_2x")
        for p in sorted((data_dir / sub).rglob("*.png"))
    }


def _unique(objects: list[dict[str, Any]], colour: str, shape: str) -> dict[str, Any]:
    hits = [o for o in objects if o["colour"] == colour and o["shape"] == shape]
    assert len(hits) == 1, f"'{colour} {shape}' is not unique in {objects}"
    return hits[0]


def oracle(question: str, objects: list[dict[str, Any]]) -> str:
    """The answer to any tiny-world question, computed from the object annotations alone."""
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        hits = [o for o in objects if o["shape"] == m[1]]
        assert len(hits) == 1 and len(objects) > 1, f"ill-posed colour question {question!r} about {objects}"
        return hits[0]["colour"]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return NUMBER_WORDS[sum(o["colour"] == m[1] for o in objects)]
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        (shape,) = [s for s in CFG.shapes if plural(s) == m[1]]
        return NUMBER_WORDS[sum(o["shape"] == shape for o in objects)]
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        o = _unique(objects, m[1], m[2])
        return cell_name(o["row"], o["col"])
    if m := re.fullmatch(r"what pattern is on the (\w+) (\w+)\?", question):
        return _unique(objects, m[1], m[2])["mark"]
    if m := re.fullmatch(r"is the (\w+) (\w+) light or dark\?", question):
        return _unique(objects, m[1], m[2])["shade"]
    raise AssertionError(f"question matches no template: {question!r}")


def named_regions(question: str, objects: list[dict[str, Any]]) -> list[list[float]]:
    """The cell boxes of the objects a question names, from the annotations alone: the shape's object
    (colour), the kind's objects (exist: none when absent; position, fine, shade), none (count)."""
    g = CFG.grid
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        named = [o for o in objects if o["shape"] == m[1]]
    elif m := re.fullmatch(r"(?:is there a|where is the|what pattern is on the|is the) (\w+) (\w+)(?: light or dark)?\?", question):
        named = [o for o in objects if (o["colour"], o["shape"]) == (m[1], m[2])]
    else:
        assert question.startswith("how many"), question
        named = []
    return [[o["col"] / g, o["row"] / g, (o["col"] + 1) / g, (o["row"] + 1) / g] for o in named]


def test_every_image_question_carries_the_named_objects_regions(data):
    """Stage 2 and eval human turns: the named objects' cells; captions' <image> turn: []; text-only: none.
    A position question's one box is its answer's cell."""
    scenes = data["scenes.json"]
    assert all(r["conversations"][0]["regions"] == [] for r in data["stage1_captions.json"])
    n_boxes = Counter()
    for split, records in (("train", data["stage2_instruct.json"]), ("eval", data["eval.json"])):
        for r in records:
            humans = r["conversations"][0::2]
            if "image" not in r:
                assert not any("regions" in t for t in humans), r["id"]
                continue
            for turn in humans:
                question = turn["value"].removeprefix(f"{IMAGE}\n")
                assert turn["regions"] == named_regions(question, scenes[split][r["image"]]), r["id"]
                n_boxes[question_type(question), len(turn["regions"])] += 1
                if question_type(question) == "position":
                    ((x0, y0, _, _),) = turn["regions"]
                    assert cell_name(round(y0 * CFG.grid), round(x0 * CFG.grid)) == oracle(question, scenes[split][r["image"]])
    assert {n for (t, n) in n_boxes if t == "count"} == {0} and (("exist", 0) in n_boxes and ("exist", 1) in n_boxes)
    assert {n for (t, n) in n_boxes if t in ("colour", "position", "fine")} == {1}


def test_the_data_digest_covers_only_what_the_towers_read(world, tmp_path):
    """The shipped towers' digest: the files tower pretraining reads, without their regions, so
    annotating regions, or changing the captions or the eval questions, keeps it."""
    import shutil

    from vlmzoo_lab.tinyworld.files import DATA_FILES as FILES, data_digest

    copy = tmp_path / "copy"
    for rel in FILES:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(world.root / rel, copy / rel)
    before = data_digest(copy)
    assert before == world.manifest()["data_digest"]
    for name in ("stage2_instruct.json", "eval.json"):
        records = json.loads((copy / "data" / name).read_text())
        for r in records:
            for t in r["conversations"]:
                t.pop("regions", None)
        (copy / "data" / name).write_text(json.dumps(records) + "\n")  # also another layout
    assert data_digest(copy) == before
    for name in ("stage1_captions.json", "eval.json"):  # no tower reads them
        records = json.loads((copy / "data" / name).read_text())
        records[0]["conversations"][1]["value"] = "something else"
        (copy / "data" / name).write_text(json.dumps(records))
    assert data_digest(copy) == before
    records = json.loads((copy / "data" / "stage2_instruct.json").read_text())
    records[0]["conversations"][1]["value"] = "something else"
    (copy / "data" / "stage2_instruct.json").write_text(json.dumps(records))
    assert data_digest(copy) != before  # the questions' text counts (the tokenizer reads it)


def question_type(question: str) -> str:
    starts = {"what colour": "colour", "is there": "exist", "how many": "count", "where is": "position",
              "what pattern": "fine", "is the ": "shade"}
    (qtype,) = [t for prefix, t in starts.items() if question.removeprefix(f"{IMAGE}\n").startswith(prefix)]
    return qtype


def parse_caption(text: str) -> list[dict[str, Any]]:
    """Objects of a ``"red circle at a1, ..."`` caption (colour, shape, cell)."""
    found = re.findall(r"(\w+) (\w+) at ([a-z])(\d)", text)
    return [{"colour": c, "shape": s, "col": ord(col) - ord("a"), "row": int(row) - 1} for c, s, col, row in found]


def assert_caption_lists(text: str, objects: list[dict[str, Any]], cfg) -> None:
    """``text`` names every object once (with shade and mark under ``caption_details``), in reading
    order under ``caption_order: row_major``."""
    if cfg.caption_details:
        listed, expected = parse_detailed_caption(text), objects
    else:
        listed = parse_caption(text)
        expected = [{k: o[k] for k in ("colour", "shape", "col", "row")} for o in objects]
        assert "pattern" not in text
    assert text.count(",") == len(objects) - 1 and len(listed) == len(objects)
    cell = lambda o: (o["row"], o["col"])  # noqa: E731
    assert sorted(listed, key=cell) == sorted(expected, key=cell)
    if cfg.caption_order == "row_major":
        assert listed == expected


def parse_detailed_caption(text: str) -> list[dict[str, Any]]:
    """Objects of a ``"light red circle at a1 with checkered pattern, ..."`` caption."""
    found = re.findall(r"(\w+) (\w+) (\w+) at ([a-z])(\d) with (\w+) pattern", text)
    return [{"shade": sh, "colour": c, "shape": s, "col": ord(col) - ord("a"), "row": int(row) - 1, "mark": mk}
            for sh, c, s, col, row, mk in found]


def _all_texts(data: dict[str, Any]) -> list[str]:
    texts = [turn["value"] for name in ("stage1_captions.json", "stage2_instruct.json", "eval.json")
             for rec in data[name] for turn in rec["conversations"]]
    for rec in data["eval.json"]:
        texts += [rec["question"], rec["answer"], *rec["choices"]]
    return texts


# ---------------------------------------------------------------------------- determinism
def test_generation_is_deterministic_and_seeded(world, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_world(CFG, str(a), keep_train_hires=False, log=_quiet)
    generate_world(CFG, str(b), keep_train_hires=False, log=_quiet)
    generate_world(small_test_config(seed=1), str(c), keep_train_hires=False, log=_quiet)

    for name in DATA_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        # build_tiny_world writes exactly what generate_world writes
        assert (a / name).read_bytes() == (world.data_dir / name).read_bytes(), name
    imgs_a, imgs_b = _image_bytes(a), _image_bytes(b)
    assert len(imgs_a) == 2 * (CFG.n_train_images + len(TYPES) * CFG.n_eval_per_type)
    assert imgs_a == imgs_b
    assert imgs_a == _image_bytes(world.data_dir)

    # another seed: other questions and other pictures
    for name in ("stage1_captions.json", "stage2_instruct.json", "eval.json", "scenes.json"):
        assert (a / name).read_bytes() != (c / name).read_bytes(), name
    imgs_c = _image_bytes(c)
    assert imgs_c.keys() == imgs_a.keys()
    assert sum(imgs_a[k] != imgs_c[k] for k in imgs_a) > 0.9 * len(imgs_a)


def test_generation_does_not_depend_on_worker_count(tmp_path):
    # > 256 images makes render_all use a process pool with workers > 1
    one, two = small_test_config(n_train_images=260, n_caption_images=8), small_test_config(
        n_train_images=260, n_caption_images=8, workers=2)
    generate_world(one, str(tmp_path / "w1"), keep_train_hires=False, log=_quiet)
    generate_world(two, str(tmp_path / "w2"), keep_train_hires=False, log=_quiet)
    for name in ("stage1_captions.json", "stage2_instruct.json", "eval.json", "scenes.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert _image_bytes(tmp_path / "w1") == _image_bytes(tmp_path / "w2")


# ---------------------------------------------------------------------------- cache
def test_second_call_reuses_the_cache(world, monkeypatch):
    cache = world.root.parent.parent
    assert world.root == cache / "tiny_world" / CFG.config_hash()
    manifest = world.root / tw.MANIFEST
    before = manifest.stat().st_mtime_ns
    record = world.manifest()
    assert record["format"] == tw.FORMAT_VERSION
    assert record["config_hash"] == CFG.config_hash()
    assert record["config"] == json.loads(json.dumps(CFG.to_dict()))
    assert record["paths"]["clip_dir"] == str(world.clip_dir)

    def boom(*args, **kwargs):
        raise AssertionError("the cached world was rebuilt")

    monkeypatch.setattr(tw, "_build", boom)
    assert build_tiny_world(cache, CFG, log=_quiet) == world
    assert build_tiny_world(cache, CFG.to_dict(), log=_quiet) == world  # dict form, same hash
    monkeypatch.setenv("VLMZOO_CACHE", str(cache))
    assert build_tiny_world(None, CFG, log=_quiet) == world  # $VLMZOO_CACHE is the default root
    assert manifest.stat().st_mtime_ns == before
    assert not world.root.with_name(world.root.name + ".building").exists()


def test_cache_folder_follows_the_config(tmp_path, monkeypatch):
    calls: list[str] = []

    def fake_build(cfg, paths, log, shipped):
        calls.append(cfg.config_hash())
        paths.root.mkdir(parents=True)
        (paths.root / "marker").write_text(str(cfg.seed))
        return {"seconds": {"total": 0.0}}

    monkeypatch.setattr(tw, "_build", fake_build)
    changed = small_test_config(seed=1)
    nested = small_test_config(clip=dataclasses.replace(CFG.clip, steps=4))
    a = build_tiny_world(tmp_path, CFG, log=_quiet)
    b = build_tiny_world(tmp_path, changed, log=_quiet)
    c = build_tiny_world(tmp_path, nested, log=_quiet)
    assert len({a.root, b.root, c.root}) == 3
    assert len(calls) == 3
    assert (b.root / "marker").read_text() == "1" and (a.root / "marker").read_text() == "0"
    assert (b.root / tw.MANIFEST).is_file()

    assert build_tiny_world(tmp_path, changed, log=_quiet) == b
    assert len(calls) == 3  # cached
    build_tiny_world(tmp_path, changed, force=True, log=_quiet)
    assert len(calls) == 4  # force rebuilds


def test_failed_build_leaves_no_world_and_is_retried(tmp_path, monkeypatch):
    def failing(cfg, paths, log, shipped):
        paths.root.mkdir(parents=True)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tw, "_build", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_tiny_world(tmp_path, CFG, log=_quiet)
    root = tmp_path / "tiny_world" / CFG.config_hash()
    assert not (root / tw.MANIFEST).exists()

    calls = []

    def ok(cfg, paths, log, shipped):
        calls.append(1)
        assert paths.root.is_dir()  # the interrupted build's folder is kept for _build to resume in
        paths.root.mkdir(parents=True, exist_ok=True)
        return {"seconds": {"total": 0.0}}

    monkeypatch.setattr(tw, "_build", ok)
    assert build_tiny_world(tmp_path, CFG, log=_quiet).root == root
    assert calls == [1] and (root / tw.MANIFEST).is_file()


# ---------------------------------------------------------------------------- data contract
# The templates of the world's runs (configs/base/tiny_world.yaml): its vocabulary has no newline
# (plain's end of caption) and not LLaVA-1.5's system prompt.
STAGE1_TEMPLATE = {"base": "plain", "assistant_end": "", "assistant_end_eos": True}
STAGE2_TEMPLATE = {"base": "vicuna_v1", "default_system": None}


@pytest.mark.parametrize(
    "name, template",
    [("stage1_captions.json", STAGE1_TEMPLATE), ("stage2_instruct.json", STAGE2_TEMPLATE), ("eval.json", STAGE2_TEMPLATE)],
)
def test_files_load_with_the_project_loader(world, data, tokenizer, tmp_path, name, template):
    n_vis = CFG.grid**2
    processor = VLMProcessor(tokenizer, InputSpec(num_visual_tokens=n_vis), AutoImageProcessor.from_pretrained(world.clip_dir),
                             template=template)
    ds = LlavaJsonDataset(world.data_dir / name, processor, world.images_dir, on_error="raise",
                          check_images="decode", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(data[name]) and not ds.skipped and ds.num_truncated == 0
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    for i, rec in enumerate(data[name]):
        item = ds[i]
        assert item["id"] == rec["id"]
        n_images = 1 if "image" in rec else 0
        assert sum(t == image_id for t in item["input_ids"]) == n_vis * n_images
        assert tokenizer.unk_token_id not in item["input_ids"]
        assert any(label != -100 for label in item["labels"])  # every record has a target
        if n_images:
            assert tuple(item["pixel_values"].shape) == (1, 3, CFG.image_size, CFG.image_size)


def test_eval_file_contract(data):
    records = data["eval.json"]
    choices = answer_choices(CFG)
    assert len({r["id"] for r in records}) == len(records)
    per_type = Counter(r["question_type"] for r in records)
    assert per_type == {t: CFG.n_eval_per_type for t in TYPES}
    for r in records:
        assert r["choices"] == choices[r["question_type"]]
        assert r["answer"] in r["choices"]
        assert r["conversations"] == [{"from": "human", "value": f"{IMAGE}\n{r['question']}",
                                       "regions": r["conversations"][0]["regions"]},
                                      {"from": "gpt", "value": r["answer"]}]
    for t in TYPES:
        answers = Counter(r["answer"] for r in records if r["question_type"] == t)
        counts = [answers.get(a, 0) for a in choices[t]]
        assert max(counts) - min(counts) <= 1, (t, answers)  # balanced answers


def test_eval_answers_match_the_scenes(data):
    scenes = data["scenes.json"]["eval"]
    seen = Counter()
    for r in data["eval.json"]:
        objects = scenes[r["image"]]
        assert CFG.min_objects <= len(objects) <= CFG.max_objects
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)  # one object per cell
        assert question_type(r["question"]) == r["question_type"]
        assert oracle(r["question"], objects) == r["answer"], r
        seen[r["question_type"]] += 1
    assert set(seen) == set(TYPES)


def test_exist_questions_are_pope_balanced(data):
    scenes = data["scenes.json"]["eval"]
    popular = set(data["world.json"]["popular_kinds"])
    _, ranked = kind_prior(CFG)
    assert popular == {f"{CFG.colour_names[c]} {CFG.shapes[s]}" for c, s in ranked[: CFG.popular_top_k]}
    exist = [r for r in data["eval.json"] if r["question_type"] == "exist"]
    assert Counter(r["answer"] for r in exist) == {"yes": len(exist) // 2, "no": len(exist) // 2}
    negatives = [r for r in exist if r["answer"] == "no"]
    assert {r["negative_kind"] for r in negatives} == set(POPE_SPLITS)
    assert all(r["negative_kind"] is None and r["pope_split"] in POPE_SPLITS for r in exist if r["answer"] == "yes")
    for split in POPE_SPLITS:  # each POPE split has as many yes as no
        answers = Counter(r["answer"] for r in exist if r["pope_split"] == split)
        assert answers["yes"] == answers["no"] > 0, (split, answers)
    for r in negatives:
        assert r["pope_split"] == r["negative_kind"]
        colour, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", r["question"]).groups()
        objects = scenes[r["image"]]
        assert not any(o["colour"] == colour and o["shape"] == shape for o in objects)
        if r["negative_kind"] == "adversarial":
            assert any(o["colour"] == colour for o in objects), r
            assert any(o["shape"] == shape for o in objects), r
        if r["negative_kind"] == "popular":
            assert f"{colour} {shape}" in popular, r


def test_training_files_match_the_scenes(data):
    scenes = data["scenes.json"]["train"]
    assert len(scenes) == CFG.n_train_images
    captions = data["stage1_captions.json"]
    assert len(captions) == CFG.n_caption_images
    for rec in captions:
        objects = scenes[rec["image"]]
        human, gpt = rec["conversations"]
        assert human == {"from": "human", "value": IMAGE, "regions": []}
        assert_caption_lists(gpt["value"], objects, CFG)

    stage2 = data["stage2_instruct.json"]
    text_only = [r for r in stage2 if "image" not in r]
    with_image = [r for r in stage2 if "image" in r]
    assert len(text_only) == CFG.n_text_only and len(with_image) == CFG.n_train_images
    assert any(len(r["conversations"]) > 2 for r in with_image)  # multi-turn records exist
    n_turns = Counter(len(r["conversations"]) // 2 for r in with_image)
    assert max(n_turns) <= CFG.max_turns
    for r in with_image:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith(f"{IMAGE}\n")
        assert sum(t["value"].count(IMAGE) for t in conv) == 1
        objects = scenes[r["image"]]
        for q, a in zip(conv[0::2], conv[1::2]):
            assert oracle(q["value"].removeprefix(f"{IMAGE}\n"), objects) == a["value"], r["id"]
    for r in text_only:
        (q, a) = r["conversations"]
        assert IMAGE not in q["value"]
        context, question = q["value"].split(". ", 1)
        objects = parse_detailed_caption(context)
        assert objects, q["value"]
        assert oracle(question, objects) == a["value"], r["id"]
    # every question type occurs in training
    types = {question_type(t["value"]) for r in with_image for t in r["conversations"][0::2]}
    assert types == set(TYPES)


def test_data_only_fields_keep_the_towers_hash():
    """Shipped towers serve every world that differs from theirs only in data no tower reads."""
    from vlmzoo_lab.tinyworld.config import DATA_ONLY_FIELDS

    assert DATA_ONLY_FIELDS == ("caption_details", "caption_order")
    other_order = "shuffled" if CFG.caption_order == "row_major" else "row_major"
    for variant in (replace(CFG, caption_details=not CFG.caption_details), replace(CFG, caption_order=other_order)):
        assert variant.config_hash() != CFG.config_hash() and variant.towers_hash() == CFG.towers_hash()
    other = replace(CFG, shade_strength=0.25)
    assert other.towers_hash() != CFG.towers_hash()
    with pytest.raises(ValueError, match="caption_order must be one of row_major, shuffled, got 'random'"):
        replace(CFG, caption_order="random")


@pytest.mark.parametrize("details, order", [(True, "shuffled"), (False, "row_major")])
def test_the_caption_switches_change_only_the_caption_file(data, tmp_path, details, order):
    """Each setting lists the scene's objects as it says (shuffled: a per-image order that is often
    not reading order); every other file the generator writes is unchanged."""
    cfg = replace(CFG, caption_details=details, caption_order=order)
    generate_world(cfg, str(tmp_path), keep_train_hires=False, log=_quiet)
    for name in DATA_FILES:
        if name not in ("stage1_captions.json", "world.json"):
            assert json.loads((tmp_path / name).read_text()) == data[name], name
    scenes = data["scenes.json"]["train"]
    reordered, captions = 0, json.loads((tmp_path / "stage1_captions.json").read_text())
    for rec in captions:
        text, objects = rec["conversations"][1]["value"], scenes[rec["image"]]
        assert_caption_lists(text, objects, cfg)
        reordered += details and parse_detailed_caption(text) != objects
    assert reordered > len(captions) // 2 if order == "shuffled" else reordered == 0


# ---------------------------------------------------------------------------- fine detail
def test_marks_are_legible_only_at_2x():
    prior, _ = kind_prior(CFG)
    rng = np.random.default_rng(123)
    checked = 0
    for _ in range(10):
        scene = sample_scene(rng, CFG, prior)
        for i, obj in enumerate(scene.objects):
            hires = [render(scene.with_mark(i, k), CFG) for k in range(len(CFG.marks))]
            base = [box_downsample(h, CFG.hires_factor) for h in hires]
            for k in range(1, len(CFG.marks)):
                np.testing.assert_array_equal(base[0], base[k])  # exactly the same base view
                assert not np.array_equal(hires[0], hires[k])  # but a different 2x image
            x0, y0 = mark_box(obj, CFG)
            m = CFG.mark_size
            for h in hires:  # the mark is really painted (half of its pixels)
                patch = h[y0 : y0 + m, x0 : x0 + m]
                assert (patch == np.array(MARK_RGB)).all(-1).sum() == m * m // 2
            checked += 1
    assert checked >= 20


def test_shades_change_only_the_object_colour_and_the_first_world_has_none():
    prior, _ = kind_prior(CFG)
    scene = sample_scene(np.random.default_rng(5), CFG, prior)
    flat = dataclasses.replace(CFG, shades=())
    plain = sample_scene(np.random.default_rng(5), flat, prior)
    # Same geometry, marks and kinds: shades are drawn after everything else in the stream.
    for a, b in zip(scene.objects, plain.objects):
        assert (a.colour, a.shape, a.mark, a.row, a.col, a.radius) == (b.colour, b.shape, b.mark, b.row, b.col, b.radius)
        assert list(a.rgb) == shaded(list(b.rgb), CFG.shades[a.shade], CFG.shade_strength)
        assert (sum(a.rgb) > sum(b.rgb)) == (CFG.shades[a.shade] == "light")
    twin = scene.with_shades_flipped(CFG)  # the tower's invariance twin: only the shades differ
    for a, b in zip(scene.objects, twin.objects):
        assert a.shade != b.shade and a.base_rgb == b.base_rgb
        assert dataclasses.replace(a, shade=b.shade, rgb=b.rgb) == b
    assert not np.array_equal(render(scene, CFG), render(twin, CFG))
    assert "shade" not in question_types(flat) and question_types(flat) == QUESTION_TYPES
    assert "shade" in question_types(CFG)


def test_stored_base_images_are_the_2x_images_downsampled(world, data):
    for rel in list(data["scenes.json"]["eval"])[:20]:
        base = np.asarray(Image.open(world.images_dir / rel).convert("RGB"))
        hires = np.asarray(Image.open(world.hires_images_dir / rel).convert("RGB"))
        assert base.shape == (CFG.image_size, CFG.image_size, 3)
        assert hires.shape == (CFG.stored_size, CFG.stored_size, 3)
        np.testing.assert_array_equal(base, np.rint(box_downsample(hires, CFG.hires_factor)).astype(np.uint8))


# ---------------------------------------------------------------------------- tokenizer
def test_tokenizer_covers_every_text(world, data, tokenizer):
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(world.clip_dir).get_vocab()
    texts = _all_texts(data) + template_texts() + [vicuna_prompt([("what colour is the circle?", "red")])]
    unk = tokenizer.unk_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids and unk not in ids, text
    # world text round-trips through the decoder (punctuation re-attached)
    for rec in data["stage1_captions.json"][:10] + data["eval.json"]:
        text = rec["conversations"][1]["value"] if "question" not in rec else rec["question"]
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text


def test_image_placeholder_is_one_token(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    assert image_id != tokenizer.unk_token_id
    assert tokenizer.tokenize(IMAGE) == [IMAGE]
    ids = tokenizer(f"{IMAGE}\nwhat colour is the circle?").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[1] == image_id and ids.count(image_id) == 1
    assert tokenizer.unk_token_id not in ids


# ---------------------------------------------------------------------------- towers
def test_vision_tower_loads_by_path(world, data):
    tower = load_pretrained_vision_tower(str(world.clip_dir))
    assert tower.hidden_size == CFG.clip.vision_hidden_size
    assert tower.num_layers == CFG.clip.vision_layers
    assert tower.num_patches == CFG.grid**2 and tower.has_cls
    assert tower.image_size == CFG.image_size

    rel = data["eval.json"][0]["image"]
    processor = AutoImageProcessor.from_pretrained(world.clip_dir)
    pixels = processor(images=Image.open(world.images_dir / rel).convert("RGB"), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, CFG.image_size, CFG.image_size)
    # the saved processor gives exactly the inputs the tower was pretrained on
    hires = torch.from_numpy(np.asarray(Image.open(world.hires_images_dir / rel).convert("RGB")).copy())[None]
    torch.testing.assert_close(pixels, normalize(base_view(hires, CFG.hires_factor)), atol=1e-5, rtol=0)

    tower.eval()
    with torch.no_grad():
        states = tower(pixels)
    assert len(states) == CFG.clip.vision_layers + 1
    for h in states:
        assert h.shape == (1, 1 + CFG.grid**2, CFG.clip.vision_hidden_size)

    # the spec rebuilds the same architecture; the saved weights give identical outputs
    spec = json.loads(json.dumps(tower.spec))
    rebuilt = build_vision_tower(spec).eval()
    assert not torch.equal(rebuilt(pixels)[-1], states[-1])  # random init differs...
    rebuilt.load_state_dict(tower.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels)[-2], states[-2])  # ...the loaded weights do not


def test_llm_loads_by_path(world, tokenizer):
    llm = AutoModelForCausalLM.from_pretrained(world.llm_dir).eval()
    assert isinstance(llm, LlamaForCausalLM)
    assert llm.config.hidden_size == CFG.llm.hidden_size
    assert llm.config.num_hidden_layers == CFG.llm.layers
    assert llm.config.vocab_size == len(tokenizer)
    assert llm.generation_config.eos_token_id == tokenizer.eos_token_id
    enc = tokenizer("red circle at a1. what colour is the circle?", return_tensors="pt")
    with torch.no_grad():
        logits = llm(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------- embedding check
def test_embedding_collapse_check(world, tokenizer):
    strict = dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, max_embedding_cosine=0.5))
    llm = AutoModelForCausalLM.from_pretrained(world.llm_dir)
    cos = check_word_embeddings(llm, tokenizer, strict)  # passes on the built model
    assert set(cos) == {"colour", "shape", "mark", "count"}
    assert all(v < 0.5 for v in cos.values())

    weight = llm.get_input_embeddings().weight
    colour_ids = tokenizer.convert_tokens_to_ids(list(CFG.colour_names))
    with torch.no_grad():
        weight[colour_ids] = weight[colour_ids[0]].clone()  # every colour word has the same embedding
    assert embedding_cosines(llm, tokenizer, strict)["colour"] == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match=r"colour=") as info:
        check_word_embeddings(llm, tokenizer, strict)
    assert "shape=" not in str(info.value)  # only the collapsed group is named


def test_embedding_check_spares_answer_only_words(world, tokenizer):
    """Mark and number words never occur in questions: their input embeddings may merge."""
    strict = dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm, max_embedding_cosine=0.5))
    assert question_word_groups(CFG) == ["colour", "shape"]
    llm = AutoModelForCausalLM.from_pretrained(world.llm_dir)
    weight = llm.get_input_embeddings().weight
    with torch.no_grad():
        for group in ("mark", "count"):
            ids = tokenizer.convert_tokens_to_ids(word_groups(CFG)[group])
            weight[ids] = weight[ids[0]].clone()
    cos = check_word_embeddings(llm, tokenizer, strict)  # does not raise
    assert cos["mark"] == pytest.approx(1.0) and cos["count"] == pytest.approx(1.0)
