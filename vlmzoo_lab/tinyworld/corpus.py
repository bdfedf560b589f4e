"""The tiny LLM's pretraining text: scene descriptions followed by questions about them.

Text-only pretraining on the world's captions and questions makes colour (and shape) words
interchangeable - nothing in such text tells "red" from "blue" - and their embeddings
collapse together, which later makes colour questions unlearnable even with perfect visual
features. Here every answer is determined by the context (a caption earlier in the same
document), so the model must keep the words apart to copy the right one. Document kinds:

* ``chat``  - vicuna_v1 conversation, the caption opening the first user turn (optionally
  after the system prompt), then 1-4 question/answer turns;
* ``qa``    - the same without roles: "caption q a q a ...";
* ``caption`` - a caption alone, ended by ``</s>`` (like stage 1's plain template).

Captions with marks ("... with checkered pattern"), and shades in worlds that have them, let fine
and shade questions be answered too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import TinyWorldConfig
from .questions import QA, caption, enumerate_questions, pick_any, question_types
from .scene import kind_prior, sample_scene
from .tokenizer import EOS, VICUNA_SYSTEM, vicuna_prompt

_STREAM = 4


@dataclass(frozen=True)
class Document:
    """A pretraining document and the (question type, answer) pairs it contains."""

    text: str
    kind: str
    answers: tuple[tuple[str, str], ...]


def _questions(scene, cfg: TinyWorldConfig, popular, rng: np.random.Generator, with_marks: bool, n: int) -> list[QA]:
    # fine / shade answers are only in the context when the caption gives marks and shades
    types = [t for t in question_types(cfg) if with_marks or t not in ("fine", "shade")]
    out: list[QA] = []
    for _ in range(4 * n):
        if len(out) >= n:
            break
        qa = pick_any(enumerate_questions(scene, types[int(rng.integers(len(types)))], cfg, popular), rng)
        if qa is not None and all(qa.question != q.question for q in out):
            out.append(qa)
    return out


def make_document(i: int, cfg: TinyWorldConfig, prior: np.ndarray, popular: set[tuple[int, int]], stream: int = _STREAM) -> Document:
    """The i-th pretraining document (deterministic in ``cfg.seed``, ``stream`` and ``i``)."""
    rng = np.random.default_rng([cfg.seed, stream, i])
    scene = sample_scene(rng, cfg, prior)
    u = rng.random()
    with_marks = bool(rng.random() < 0.5)
    context = caption(scene, cfg, with_marks=with_marks)
    qas = _questions(scene, cfg, popular, rng, with_marks, 1 + int(rng.integers(4))) if u >= 0.15 else []
    if not qas:  # a caption alone (also when a rare scene admits no question of the drawn types)
        return Document(f"{context}{EOS}", "caption", ())
    answers = tuple((q.question_type, q.answer) for q in qas)
    if u < 0.75:
        turns: list[tuple[str, str | None]] = [(f"{context} {qas[0].question}", qas[0].answer)]
        turns += [(q.question, q.answer) for q in qas[1:]]
        system = VICUNA_SYSTEM if rng.random() < 0.5 else None
        return Document(vicuna_prompt(turns, system), "chat", answers)
    body = " ".join(f"{q.question} {q.answer}." for q in qas)
    return Document(f"{context} {body}{EOS}", "qa", answers)


def make_corpus(cfg: TinyWorldConfig, n: int, stream: int = _STREAM) -> list[Document]:
    prior, ranked = kind_prior(cfg)
    popular = set(ranked[: cfg.popular_top_k])
    return [make_document(i, cfg, prior, popular, stream) for i in range(n)]
