"""Write the tiny world's data set: PNGs plus LLaVA-format JSON files.

Layout under ``data_dir``::

    images/train/000000.png      base resolution (what the tower sees; JSON "image" paths)
    images/eval/000000.png
    images_2x/train/000000.png   the same scenes at 2x (same relative names): the only place
    images_2x/eval/000000.png    the fine marks are legible; for high-resolution crops
    stage1_captions.json         [{"id", "image", "conversations": [<image> | caption]}]
    stage2_instruct.json         1..max_turns Q/A turns per image + a few text-only records
    eval.json                    one question per image: id, image, question, answer,
                                 question_type, choices, pope_split, negative_kind, conversations
    scenes.json                  per-image object annotations (for probes and analysis)
    world.json                   vocabulary, answer sets, chance levels, sizes

Every human turn about an image carries ``"regions"``: the grid-cell boxes ``[x0, y0, x1, y1]``
(normalised image coordinates) of the objects its question names
(:func:`~.questions.question_regions`), ``[]`` when it names no object present (count, exist-no,
and the captions' bare ``<image>`` turn); text-only records have none. The towers never read them:
the data digest that ties shipped towers to their data leaves them out (:mod:`.files`).

Everything is a deterministic function of the config: each image has its own random stream
(``[seed, split, index]``), so output does not depend on worker count or order.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .config import TinyWorldConfig
from .questions import (
    POPE_SPLITS,
    QA,
    answer_choices,
    caption,
    enumerate_questions,
    pick_any,
    pick_with_answer,
    question_regions,
    question_types,
)
from .scene import MARK_TILES, Scene, box_downsample, kind_prior, render, sample_scene

IMAGE_TOKEN = "<image>"
_TRAIN, _EVAL, _TEXT, _CAPTION = 1, 2, 3, 5  # 4: the LLM corpus (corpus.py)
_MAX_TRIES = 20000


@dataclass
class GeneratedWorld:
    """What :func:`generate_world` produced (scenes are kept for tower pretraining)."""

    train_scenes: list[Scene]
    eval_scenes: list[Scene]
    train_hires: np.ndarray | None  # (N, S, S, 3) uint8, stored resolution, if kept


def popular_kinds(cfg: TinyWorldConfig) -> set[tuple[int, int]]:
    _, ranked = kind_prior(cfg)
    return set(ranked[: cfg.popular_top_k])


def _conditioned_scene(
    rng: np.random.Generator, cfg: TinyWorldConfig, prior: np.ndarray, popular: set[tuple[int, int]],
    qtype: str, answer: str, pope_split: str | None,
) -> tuple[Scene, QA]:
    """Rejection-sample a scene that admits a ``qtype`` question with this answer.

    Conditioning on the answer (chosen first, uniformly) makes every type's answers balanced
    while keeping each scene a draw from the world's distribution given that answer.
    """
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng, cfg, prior)
        qa = pick_with_answer(enumerate_questions(scene, qtype, cfg, popular), answer, pope_split, rng)
        if qa is not None:
            return scene, qa
    raise RuntimeError(
        f"Could not sample a scene with a {qtype!r} question answered {answer!r} in {_MAX_TRIES} tries; "
        "the config makes it (nearly) impossible (check max_count / object counts)."
    )


def _human(question: str, with_image: bool, regions: list[list[float]] | None = None) -> dict[str, Any]:
    turn: dict[str, Any] = {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if with_image else question}
    if regions is not None:
        turn["regions"] = regions
    return turn


def _gpt(answer: str) -> dict[str, str]:
    return {"from": "gpt", "value": answer}


def _train_record(i: int, cfg: TinyWorldConfig, prior: np.ndarray, popular: set[tuple[int, int]]) -> tuple[Scene, list[QA]]:
    rng = np.random.default_rng([cfg.seed, _TRAIN, i])
    choices = answer_choices(cfg)
    types = question_types(cfg)
    qtype = types[i % len(types)]
    answer = choices[qtype][int(rng.integers(len(choices[qtype])))]
    split = POPE_SPLITS[int(rng.integers(len(POPE_SPLITS)))] if qtype == "exist" else None
    scene, primary = _conditioned_scene(rng, cfg, prior, popular, qtype, answer, split)
    n_turns = 1 + int(rng.choice(cfg.max_turns, p=np.array(cfg.turn_weights) / sum(cfg.turn_weights)))
    qas = [primary]
    for _ in range(4 * n_turns):
        if len(qas) >= n_turns:
            break
        extra = pick_any(enumerate_questions(scene, types[int(rng.integers(len(types)))], cfg, popular), rng)
        if extra is not None and all(extra.question != q.question for q in qas):
            qas.append(extra)
    order = rng.permutation(len(qas))
    return scene, [qas[j] for j in order]


def _eval_item(j: int, qtype: str, cfg: TinyWorldConfig, prior: np.ndarray, popular: set[tuple[int, int]]) -> tuple[Scene, QA]:
    """The j-th eval question of a type; answers (and POPE splits) cycle for exact balance."""
    rng = np.random.default_rng([cfg.seed, _EVAL, question_types(cfg).index(qtype), j])
    choices = answer_choices(cfg)[qtype]
    if qtype == "exist":
        answer, split = choices[j % 2], POPE_SPLITS[(j // 2) % len(POPE_SPLITS)]
    else:
        answer, split = choices[j % len(choices)], None
    return _conditioned_scene(rng, cfg, prior, popular, qtype, answer, split)


def _text_only_record(i: int, cfg: TinyWorldConfig, prior: np.ndarray, popular: set[tuple[int, int]]) -> dict[str, Any]:
    """A text-only instruction: the (detailed) caption is in the prompt, no image."""
    rng = np.random.default_rng([cfg.seed, _TEXT, i])
    types = question_types(cfg)
    qtype = types[i % len(types)]
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng, cfg, prior)
        qa = pick_any(enumerate_questions(scene, qtype, cfg, popular), rng)
        if qa is not None:
            break
    else:
        raise RuntimeError(f"No {qtype!r} question possible for text-only record {i}.")
    prompt = f"{caption(scene, cfg, with_marks=True)} {qa.question}"
    return {"id": f"text-{i:06d}", "conversations": [_human(prompt, False), _gpt(qa.answer)]}


def _scene_json(scene: Scene, cfg: TinyWorldConfig) -> list[dict[str, Any]]:
    return [
        {"colour": cfg.colour_names[o.colour], "shape": cfg.shapes[o.shape], "mark": cfg.marks[o.mark],
         "row": o.row, "col": o.col, **({"shade": cfg.shades[o.shade]} if cfg.shades else {})}
        for o in scene.objects
    ]


# ----------------------------------------------------------------------------- images
def _write_images(job: tuple[TinyWorldConfig, str, list[tuple[str, Scene]], bool]) -> np.ndarray | None:
    cfg, data_dir, items, keep = job
    hires = np.empty((len(items), cfg.stored_size, cfg.stored_size, 3), dtype=np.uint8) if keep else None
    for k, (rel, scene) in enumerate(items):
        img = render(scene, cfg)
        base = np.rint(box_downsample(img, cfg.hires_factor)).astype(np.uint8)
        Image.fromarray(base).save(os.path.join(data_dir, "images", rel), compress_level=cfg.png_compress_level)
        Image.fromarray(img).save(os.path.join(data_dir, "images_2x", rel), compress_level=cfg.png_compress_level)
        if hires is not None:
            hires[k] = img
    return hires


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    size = max(1, -(-len(items) // n))
    for s in range(0, len(items), size):
        yield items[s : s + size]


def render_all(cfg: TinyWorldConfig, data_dir: str, items: list[tuple[str, Scene]], keep: bool) -> np.ndarray | None:
    """Render and save ``items`` (relative path, scene) at both resolutions, in parallel."""
    for sub in ("images", "images_2x"):
        for rel_dir in {os.path.dirname(rel) for rel, _ in items}:
            os.makedirs(os.path.join(data_dir, sub, rel_dir), exist_ok=True)
    jobs = [(cfg, data_dir, chunk, keep) for chunk in _chunks(items, max(1, cfg.workers) * 4)]
    bar = tqdm(total=len(items), desc="[tinyworld] images", unit="img", mininterval=2, leave=False)
    if cfg.workers > 1 and len(items) > 256:
        with mp.get_context("fork").Pool(cfg.workers) as pool:
            parts = []
            for job, part in zip(jobs, pool.imap(_write_images, jobs)):
                parts.append(part)
                bar.update(len(job[2]))
    else:
        parts = []
        for job in jobs:
            parts.append(_write_images(job))
            bar.update(len(job[2]))
    bar.close()
    return np.concatenate(parts) if keep else None  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- main entry
def _dump(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))
        f.write("\n")


def _stage1_caption(i: int, scene: Scene, cfg: TinyWorldConfig) -> str:
    """Train image ``i``'s stage-1 caption (details and order from the config; its own RNG stream,
    so neither changes any other file)."""
    order = None
    if cfg.caption_order == "shuffled":
        order = np.random.default_rng([cfg.seed, _CAPTION, i]).permutation(len(scene.objects)).tolist()
    return caption(scene, cfg, with_marks=cfg.caption_details, order=order)


def generate_world(cfg: TinyWorldConfig, data_dir: str, keep_train_hires: bool = True,
                   log: Any = print) -> GeneratedWorld:
    """Generate all JSON files and PNGs under ``data_dir`` (see the module docstring)."""
    for m in cfg.marks:
        if m not in MARK_TILES:
            raise ValueError(f"Unknown mark {m!r}; known marks: {', '.join(MARK_TILES)}.")
    os.makedirs(data_dir, exist_ok=True)
    prior, ranked = kind_prior(cfg)
    popular = set(ranked[: cfg.popular_top_k])
    t0 = time.perf_counter()

    train_scenes: list[Scene] = []
    stage1: list[dict[str, Any]] = []
    stage2: list[dict[str, Any]] = []
    for i in range(cfg.n_train_images):
        scene, qas = _train_record(i, cfg, prior, popular)
        train_scenes.append(scene)
        rel = f"train/{i:06d}.png"
        if i < cfg.n_caption_images:
            stage1.append({"id": f"cap-{i:06d}", "image": rel,
                           "conversations": [{"from": "human", "value": IMAGE_TOKEN, "regions": []},
                                             _gpt(_stage1_caption(i, scene, cfg))]})
        conv = []
        for k, qa in enumerate(qas):
            conv += [_human(qa.question, with_image=k == 0, regions=question_regions(qa, scene, cfg)), _gpt(qa.answer)]
        stage2.append({"id": f"train-{i:06d}", "image": rel, "conversations": conv})
    text_only = [_text_only_record(i, cfg, prior, popular) for i in range(cfg.n_text_only)]
    # Spread the text-only records through the file (deterministically).
    rng = np.random.default_rng([cfg.seed, _TEXT, 10**6])
    positions = sorted(rng.integers(0, len(stage2) + 1, size=len(text_only)).tolist(), reverse=True)
    for rec, pos in zip(reversed(text_only), positions):
        stage2.insert(pos, rec)

    eval_scenes: list[Scene] = []
    eval_items: list[dict[str, Any]] = []
    choices = answer_choices(cfg)
    for qtype in question_types(cfg):
        for j in range(cfg.n_eval_per_type):
            scene, qa = _eval_item(j, qtype, cfg, prior, popular)
            idx = len(eval_scenes)
            eval_scenes.append(scene)
            rel = f"eval/{idx:06d}.png"
            eval_items.append({
                "id": f"eval-{qtype}-{j:05d}", "image": rel, "question": qa.question, "answer": qa.answer,
                "question_type": qtype, "choices": choices[qtype],
                "pope_split": qa.meta.get("pope_split"), "negative_kind": qa.meta.get("negative_kind"),
                "conversations": [_human(qa.question, True, question_regions(qa, scene, cfg)), _gpt(qa.answer)],
            })
    log(f"[tinyworld]   scenes + questions: {len(stage2)} stage-2 records, {len(stage1)} captions, "
        f"{len(eval_items)} eval questions ({time.perf_counter() - t0:.1f}s)")

    t1 = time.perf_counter()
    train_hires = render_all(cfg, data_dir, [(f"train/{i:06d}.png", s) for i, s in enumerate(train_scenes)], keep_train_hires)
    render_all(cfg, data_dir, [(f"eval/{i:06d}.png", s) for i, s in enumerate(eval_scenes)], keep=False)
    log(f"[tinyworld]   rendered {len(train_scenes) + len(eval_scenes)} images x 2 resolutions "
        f"({time.perf_counter() - t1:.1f}s)")

    _dump(stage1, os.path.join(data_dir, "stage1_captions.json"))
    _dump(stage2, os.path.join(data_dir, "stage2_instruct.json"))
    _dump(eval_items, os.path.join(data_dir, "eval.json"))
    _dump({"train": {f"train/{i:06d}.png": _scene_json(s, cfg) for i, s in enumerate(train_scenes)},
           "eval": {f"eval/{i:06d}.png": _scene_json(s, cfg) for i, s in enumerate(eval_scenes)}},
          os.path.join(data_dir, "scenes.json"))
    _dump(world_metadata(cfg, ranked), os.path.join(data_dir, "world.json"))
    return GeneratedWorld(train_scenes=train_scenes, eval_scenes=eval_scenes, train_hires=train_hires)


def world_metadata(cfg: TinyWorldConfig, ranked: list[tuple[int, int]]) -> dict[str, Any]:
    """Sizes, answer sets and chance levels (uniform guessing over each type's answers)."""
    choices = answer_choices(cfg)
    return {
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "question_types": list(question_types(cfg)),
        "answer_choices": choices,
        "chance": {t: 1.0 / len(c) for t, c in choices.items()},
        "pope_splits": list(POPE_SPLITS),
        "popular_kinds": [f"{cfg.colour_names[c]} {cfg.shapes[s]}" for c, s in ranked[: cfg.popular_top_k]],
        "base_image_size": cfg.image_size,
        "hires_image_size": cfg.stored_size,
        "patch_size": cfg.cell_size,
        "grid": cfg.grid,
        "image_dirs": {"base": "images", "hires": "images_2x"},
    }
