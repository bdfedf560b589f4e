"""Captions and questions about a scene; every answer is a single word (one token).

Question types (the eval's ``question_type``):

* ``colour``   - "what colour is the <shape>?" about a shape that occurs once among several
  objects (binding a shape to its colour).
* ``exist``    - "is there a <colour> <shape>?" yes/no; negatives are POPE-style: ``random``
  (any absent kind), ``popular`` (absent kind among the most frequent kinds of the world) or
  ``adversarial`` (both the colour and the shape are in the image, only not together).
* ``count``    - "how many <colour> objects are there?" / "how many <shape>s are there?",
  answers zero..max_count, balanced.
* ``position`` - "where is the <colour> <shape>?" -> cell name (``b3``: column b, row 3).
* ``fine``     - "what pattern is on the <colour> <shape>?" -> mark kind; the mark is legible
  only at 2x resolution (see :mod:`vlmzoo_lab.tinyworld.scene`).
* ``shade``    - "is the <colour> <shape> light or dark?" (worlds with ``shades``): a low-level
  property whose evidence the tiny tower keeps in an early layer only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .config import TinyWorldConfig
from .scene import Scene, cell_box, cell_name, cell_names

#: Question types of every world; ``shade`` is added when the world has shades (:func:`question_types`).
QUESTION_TYPES: tuple[str, ...] = ("colour", "exist", "count", "position", "fine")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Question templates (one per form; fields: colour, shape, shapes = plural).
TEMPLATES: dict[str, str] = {
    "colour": "what colour is the {shape}?",
    "exist": "is there a {colour} {shape}?",
    "count_colour": "how many {colour} objects are there?",
    "count_shape": "how many {shapes} are there?",
    "position": "where is the {colour} {shape}?",
    "fine": "what pattern is on the {colour} {shape}?",
    "shade": "is the {colour} {shape} light or dark?",
}


def question_types(cfg: TinyWorldConfig) -> tuple[str, ...]:
    """The world's question types, in the order they rotate over the training images."""
    return QUESTION_TYPES + (("shade",) if cfg.shades else ())


@dataclass(frozen=True)
class QA:
    """One question about a scene, with its single-word answer and bookkeeping."""

    question_type: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x", "ch", "sh")) else shape + "s"


def caption(scene: Scene, cfg: TinyWorldConfig, with_marks: bool = False,
            order: Sequence[int] | None = None) -> str:
    """List of objects, e.g. ``"red circle at a1, blue square at c2."``: row-major, or in ``order``
    (indices into ``scene.objects``).

    ``with_marks`` adds the fine marks (``"... at a1 with checkered pattern"``) and, in worlds
    with shades, the shade (``"light red circle ..."``). The stage-1 captions have them when the
    config's ``caption_details`` is on; the tiny CLIP's contrastive captions never do.
    """
    parts = []
    for o in (scene.objects if order is None else [scene.objects[k] for k in order]):
        shade = f"{cfg.shades[o.shade]} " if (with_marks and cfg.shades) else ""
        text = f"{shade}{cfg.colour_names[o.colour]} {cfg.shapes[o.shape]} at {cell_name(o.row, o.col)}"
        if with_marks:
            text += f" with {cfg.marks[o.mark]} pattern"
        parts.append(text)
    return ", ".join(parts) + "."


def answer_choices(cfg: TinyWorldConfig) -> dict[str, list[str]]:
    """The closed answer set of each question type (chance = 1 / len for balanced types)."""
    choices = {
        "colour": list(cfg.colour_names),
        "exist": ["yes", "no"],
        "count": list(NUMBER_WORDS[: cfg.max_count + 1]),
        "position": [cell_name(r, c) for r in range(cfg.grid) for c in range(cfg.grid)],
        "fine": list(cfg.marks),
        "shade": list(cfg.shades),
    }
    return {t: choices[t] for t in question_types(cfg)}


def enumerate_questions(scene: Scene, qtype: str, cfg: TinyWorldConfig, popular: set[tuple[int, int]]) -> list[QA]:
    """Every well-posed question of ``qtype`` about ``scene`` (objects referred to uniquely)."""
    C, S = cfg.colour_names, cfg.shapes
    kinds = Counter(o.kind for o in scene.objects)
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    out: list[QA] = []
    if qtype == "colour":
        for o in scene.objects:
            if shapes[o.shape] == 1 and len(scene.objects) > 1:
                out.append(QA("colour", TEMPLATES["colour"].format(shape=S[o.shape]), C[o.colour], {"target": [o.colour, o.shape]}))
    elif qtype == "exist":
        for k in kinds:
            out.append(QA("exist", TEMPLATES["exist"].format(colour=C[k[0]], shape=S[k[1]]), "yes", {"target": list(k)}))
        for c in range(len(C)):
            for s in range(len(S)):
                if (c, s) in kinds:
                    continue
                kinds_of = ["random"]
                if (c, s) in popular:
                    kinds_of.append("popular")
                if colours[c] and shapes[s]:
                    kinds_of.append("adversarial")
                out.append(QA("exist", TEMPLATES["exist"].format(colour=C[c], shape=S[s]), "no", {"target": [c, s], "negative_kinds": kinds_of}))
    elif qtype == "count":
        for c in range(len(C)):
            if colours[c] <= cfg.max_count:
                out.append(QA("count", TEMPLATES["count_colour"].format(colour=C[c]), NUMBER_WORDS[colours[c]], {"by": "colour", "target": c}))
        for s in range(len(S)):
            if shapes[s] <= cfg.max_count:
                out.append(QA("count", TEMPLATES["count_shape"].format(shapes=plural(S[s])), NUMBER_WORDS[shapes[s]], {"by": "shape", "target": s}))
    elif qtype in ("position", "fine", "shade") and qtype in question_types(cfg):
        for o in scene.objects:
            if kinds[o.kind] != 1:
                continue
            answer = {"position": lambda: cell_name(o.row, o.col), "fine": lambda: cfg.marks[o.mark],
                      "shade": lambda: cfg.shades[o.shade]}[qtype]()
            text = TEMPLATES[qtype].format(colour=C[o.colour], shape=S[o.shape])
            out.append(QA(qtype, text, answer, {"target": [o.colour, o.shape]}))
    else:
        raise ValueError(f"Unknown question type {qtype!r}; this world's types: {', '.join(question_types(cfg))}.")
    return out


def question_regions(qa: QA, scene: Scene, cfg: TinyWorldConfig) -> list[list[float]]:
    """The grid-cell boxes (:func:`~.scene.cell_box`) of the objects ``qa`` names: the objects of
    its target kind (colour and shape) for colour, position, fine, shade and exist-yes questions;
    ``[]`` for questions that name no object present (count, exist-no)."""
    if qa.question_type == "count" or (qa.question_type == "exist" and qa.answer == "no"):
        return []
    colour, shape = qa.meta["target"]
    return [cell_box(o.row, o.col, cfg.grid) for o in scene.objects if o.kind == (colour, shape)]


def pick_with_answer(cands: list[QA], answer: str, pope_split: str | None, rng: np.random.Generator) -> QA | None:
    """A uniformly chosen candidate with the wanted answer (and POPE negative kind), or None."""
    if pope_split is not None and answer == "no":
        ok = [q for q in cands if q.answer == "no" and pope_split in q.meta["negative_kinds"]]
    else:
        ok = [q for q in cands if q.answer == answer]
    if not ok:
        return None
    q = ok[int(rng.integers(len(ok)))]
    return finalize_exist(q, pope_split)


def finalize_exist(q: QA, pope_split: str | None) -> QA:
    """Record the POPE split (and, for negatives, the negative kind) on an exist question."""
    if q.question_type != "exist":
        return q
    meta = dict(q.meta)
    meta.pop("negative_kinds", None)
    meta["pope_split"] = pope_split
    meta["negative_kind"] = pope_split if q.answer == "no" else None
    return QA(q.question_type, q.question, q.answer, meta)


def pick_any(cands: list[QA], rng: np.random.Generator) -> QA | None:
    """A natural extra question: exist questions are yes/no 50:50, the rest uniform."""
    if not cands:
        return None
    if cands[0].question_type == "exist":
        want = "yes" if rng.random() < 0.5 else "no"
        split = POPE_SPLITS[int(rng.integers(len(POPE_SPLITS)))]
        q = pick_with_answer(cands, want, split, rng)
        if q is None:
            q = pick_with_answer(cands, want, "random", rng)
        return q
    return cands[int(rng.integers(len(cands)))]


def every_phrase(cfg: TinyWorldConfig) -> list[str]:
    """Every question, answer and caption fragment the world can produce (vocabulary source)."""
    out = []
    for c in cfg.colour_names:
        for s in cfg.shapes:
            fields = {"colour": c, "shape": s, "shapes": plural(s)}
            out += [t.format(**fields) for name, t in TEMPLATES.items() if name != "shade" or cfg.shades]
            out += [f"{c} {s} at {cell} with {m} pattern, {c} {s} at {cell}." for m in cfg.marks for cell in cell_names(cfg.grid)]
            out += [f"{shade} {c} {s}" for shade in cfg.shades]
    for answers in answer_choices(cfg).values():
        out += answers
    return out
