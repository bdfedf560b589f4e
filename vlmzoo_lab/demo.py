"""The web demo's engine: several saved models answer the same image and question, one after another.

No web code here (the Gradio page is :mod:`vlmzoo_lab.demo_app`). :class:`DemoBackend` keeps, per
browser session, one conversation per model (plain data in a ``state`` dict) and answers a question
with every model in turn through :class:`vlmzoo.chat.ChatSession` (the same prompt and decoding as
``scripts/chat.py`` and the evaluator), yielding a :class:`DemoUpdate` after every generated token.
Under each finished answer it draws

* the answer-to-image attention heat map of :mod:`vlmzoo_lab.visualize`, for strategies that declare
  image-grid tokens (``visual_token_grids``); follow-up answers are attributed over the whole
  conversation's prompt (:func:`vlmzoo_lab.visualize.attention_to_image`);
* a small bar chart of each per-image vector the strategy returns in its extras
  (``output_strategy_extras``; e.g. layer weights ``(1, K)``), for any strategy that returns one.

Example images come from the run each model folder belongs to (its ``resolved_config.yaml``: the
evaluation questions and their images) or from a folder given by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml
from PIL import Image

from vlmzoo.chat import ChatSession, GenerationSettings, ImageFileError, load_model_folder, open_image
from vlmzoo.config import run_config_from_dict
from vlmzoo.evaluation import load_eval_records

from .visualize import VisualizationError, answer_tokens, attention_to_image, draw_maps

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_EXTRA_BARS = 64  # longer per-image extras are not drawn as bars


@dataclass
class DemoModel:
    """One loaded model folder."""

    folder: str
    model: Any
    processor: Any

    @property
    def strategy(self) -> str:
        return str(self.model.config.strategy)

    @property
    def num_visual_tokens(self) -> int:
        return int(self.model.strategy.num_visual_tokens)

    @property
    def has_grids(self) -> bool:
        return bool(tuple(self.model.strategy.visual_token_grids))

    @property
    def short_folder(self) -> str:
        return "/".join(Path(self.folder).resolve().parts[-3:])


def load_models(folders: Sequence[str | os.PathLike], template: str | None = None) -> list[DemoModel]:
    """Every folder loaded (:func:`vlmzoo.chat.load_model_folder`; the first bad one raises, naming it)."""
    return [DemoModel(os.fspath(f), *load_model_folder(f, template)) for f in folders]


# ---- example images ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """An example image, the question asked about it (``""``: none) and its high-res version if any."""

    image: Path
    question: str = ""
    high_res: Path | None = None


def run_config_of(model_folder: str | os.PathLike) -> Path | None:
    """The ``resolved_config.yaml`` of the run a model folder belongs to (``<run>/<stage>/final``), if any."""
    folder = Path(model_folder).resolve()
    for parent in (folder, *list(folder.parents)[:3]):
        if (parent / "resolved_config.yaml").is_file():
            return parent / "resolved_config.yaml"
    return None


def run_examples(model_folder: str | os.PathLike, limit: int = 8) -> list[Example]:
    """Up to ``limit`` evaluation questions of the model's run, one per image, question types taken in turn.

    Nothing (and a log line) when the folder belongs to no run, or the run's evaluation data is not on disk.
    """
    path = run_config_of(model_folder)
    if path is None:
        return []
    try:
        cfg = run_config_from_dict(yaml.safe_load(path.read_text()))
        images_dir, hr_dir = cfg.eval_images(), cfg.eval_high_res_images()
        if not cfg.eval.data or not images_dir or not os.path.isfile(cfg.eval.data):
            logger.info("No example images from %s: its evaluation data is not on disk.", path)
            return []
        records = [r for r in load_eval_records(cfg.eval.data, cfg.eval.question_type_key) if len(r.images) == 1]
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("No example images from %s: %s", path, exc)
        return []
    by_type: dict[str, list[Any]] = {}
    for rec in records:
        by_type.setdefault(rec.question_type, []).append(rec)
    picked, seen = [], set()
    queues = [list(v) for v in by_type.values()]
    while len(picked) < limit and any(queues):
        for queue in queues:
            while queue and len(picked) < limit:
                rec = queue.pop(0)
                image = Path(images_dir) / rec.images[0]
                if rec.images[0] in seen or not image.is_file():
                    continue
                seen.add(rec.images[0])
                high_res = Path(hr_dir) / rec.images[0] if hr_dir else None
                question = rec.messages[-1]["content"].replace("<image>", " ").strip()
                picked.append(Example(image, question, high_res if high_res and high_res.is_file() else None))
                break
    return picked


def folder_examples(folder: str | os.PathLike, limit: int = 8) -> list[Example]:
    """The first ``limit`` image files of ``folder`` (sorted by name); a missing folder is an error naming it."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (--examples takes a folder of images)")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [Example(p) for p in files[:limit]]


def file_key(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: the same picture uploaded again, or an example's copy, has the same key."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- one question to every model ---------------------------------------------------------------------
@dataclass
class ModelPanel:
    """What the page shows for one model.

    Attributes:
        chat: the conversation as ``{"role", "content"}`` messages (the answer being streamed last).
        stats: strategy, visual tokens, latency and answer length of the last answer (Markdown).
        heatmap: the last answer's attention map (``None``: none drawn); ``note`` says why when none.
        extras: bar charts of the strategy's per-image extras (``None``: it returns none).
        extras_values: those extras as plain lists, key -> K floats.
    """

    chat: list[dict[str, str]] = field(default_factory=list)
    stats: str = ""
    heatmap: Image.Image | None = None
    extras: Image.Image | None = None
    extras_values: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""


@dataclass
class DemoUpdate:
    """One step of an answer round: the session state, a status line and every model's panel.

    ``images_changed``: the panels whose heat map / bar chart changed since the previous update (a
    page sends only those pictures, once each).
    """

    state: dict[str, Any]
    status: str
    panels: list[ModelPanel]
    images_changed: frozenset[int]

    @classmethod
    def snapshot(cls, state: dict[str, Any], status: str, panels: Sequence[ModelPanel],
                 images_changed: frozenset[int] = frozenset()) -> DemoUpdate:
        """An update that later steps do not change (each panel and its conversation copied)."""
        copies = [replace(p, chat=[dict(m) for m in p.chat], extras_values=dict(p.extras_values)) for p in panels]
        return cls(state, status, copies, images_changed)


class DemoBackend:
    """Answers each question with every model in turn; conversations live in a per-session ``state`` dict."""

    def __init__(self, models: Sequence[DemoModel], settings: GenerationSettings | None = None,
                 examples: Sequence[Example] = ()) -> None:
        if not models:
            raise ValueError("the demo needs at least one model folder")
        self.models = list(models)
        self.settings = settings or GenerationSettings(max_new_tokens=64)
        self.examples = list(examples)
        self._high_res = {file_key(e.image): e.high_res for e in self.examples if e.high_res is not None}

    def new_state(self) -> dict[str, Any]:
        """No image, an empty conversation per model."""
        return {"image_key": None, "conversations": [[] for _ in self.models], "panels": [ModelPanel() for _ in self.models]}

    def ask(self, state: dict[str, Any] | None, image_path: str | None, question: str) -> Iterator[DemoUpdate]:
        """Answer ``question`` about the image at ``image_path`` (``None``: text only) with every model.

        A new image (by content) starts new conversations; the same image continues them. Bad input
        (no question, an unreadable image) yields one update whose status says so, state unchanged.
        """
        state = state if state is not None else self.new_state()
        question = (question or "").strip()
        if not question:
            yield DemoUpdate.snapshot(state, "Type a question first.", state["panels"])
            return
        try:
            image, key, high_res = self._image(image_path)
        except ImageFileError as exc:
            yield DemoUpdate.snapshot(state, f"Error: {exc}", state["panels"])
            return
        state = dict(state)
        if key != state["image_key"]:
            state.update(image_key=key, conversations=[[] for _ in self.models], panels=[ModelPanel() for _ in self.models])
        panels = [ModelPanel(p.chat, p.stats, p.heatmap, p.extras, p.extras_values, p.note) for p in state["panels"]]
        conversations = [list(c) for c in state["conversations"]]
        errors = []
        for i, entry in enumerate(self.models):
            session = ChatSession(entry.model, entry.processor, self.settings, image=image, high_res_image=high_res,
                                  messages=list(conversations[i]))
            panel = panels[i]
            panel.chat = [*conversations_to_chat(conversations[i]), {"role": "user", "content": question},
                          {"role": "assistant", "content": ""}]
            panel.heatmap, panel.extras, panel.extras_values, panel.note = None, None, {}, ""
            panel.stats = f"{entry.num_visual_tokens} visual tokens - answering ..."
            yield DemoUpdate.snapshot(state, f"{entry.strategy} is answering ...", panels, frozenset({i}))
            text = ""
            try:
                for piece in session.stream(question):
                    text += piece
                    panel.chat[-1] = {"role": "assistant", "content": text.lstrip()}
                    yield DemoUpdate.snapshot(state, f"{entry.strategy} is answering ...", panels)
            except (ValueError, RuntimeError) as exc:
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                errors.append(f"{entry.strategy}: {message}")
                panel.chat = conversations_to_chat(conversations[i])
                panel.stats = f"{entry.num_visual_tokens} visual tokens - error: {message}"
                yield DemoUpdate.snapshot(state, f"Error: {errors[-1]}", panels, frozenset({i}))
                continue
            answer = session.last
            assert answer is not None
            conversations[i] = session.messages
            panel.chat = conversations_to_chat(session.messages)
            first = f", first token {answer.first_token_seconds:.2f} s" if answer.first_token_seconds is not None else ""
            panel.stats = (f"{entry.num_visual_tokens} visual tokens - latency {answer.seconds:.2f} s{first} - "
                           f"{answer.num_tokens} tokens")
            self._draw(entry, session, question, panel)
            yield DemoUpdate.snapshot(state, f"{entry.strategy} answered.", panels, frozenset({i}))
        state = dict(state, conversations=conversations, panels=panels)
        status = "Error: " + "; ".join(errors) if errors else "Answered by " + ", ".join(m.strategy for m in self.models) + "."
        yield DemoUpdate.snapshot(state, status, panels)

    def _image(self, image_path: str | None) -> tuple[Image.Image | None, str | None, Image.Image | None]:
        """-> the image, its content key, and its high-res version when it is an example that has one."""
        if not image_path:
            return None, None, None
        image = open_image(image_path)
        key = file_key(image_path)
        hr_path = self._high_res.get(key)
        try:
            high_res = open_image(hr_path) if hr_path is not None else None
        except ImageFileError as exc:
            logger.warning("Ignoring the example's high-res image: %s", exc)
            high_res = None
        return image, key, high_res

    def _draw(self, entry: DemoModel, session: ChatSession, question: str, panel: ModelPanel) -> None:
        """The answer's heat map (if the strategy has grids and there is an image) and its extras' bars."""
        answer = session.last
        assert answer is not None
        if session.image is None:
            panel.note = "No image: no attention map."
            return
        if not entry.has_grids:
            panel.note = (f"No attention map: {entry.strategy}'s visual tokens do not map to image positions "
                          "(it declares no visual_token_grids).")
        else:
            try:
                result = attention_to_image(entry.model, entry.processor, answer.batch,
                                            answer_tokens(answer.new_tokens, entry.processor), question)
                panel.heatmap = render_png(lambda out: draw_maps(session.image, [(entry.strategy, result)],
                                                                 entry.processor, out))
            except VisualizationError as exc:
                panel.note = f"No attention map: {exc}"
        with torch.inference_mode():
            out = entry.model(**answer.batch, output_strategy_extras=True, logits_to_keep=1)
        panel.extras_values = per_image_extras(out.strategy_extras or {})
        if panel.extras_values:
            panel.extras = render_png(lambda path: draw_extras(panel.extras_values, path))


def conversations_to_chat(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def per_image_extras(extras: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """The extras that are one vector per image, for one image: ``(1, K)`` with 1 < K <= 64 -> K floats."""
    out = {}
    for key, value in sorted(extras.items()):
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == 1 and 1 < value.shape[1] <= MAX_EXTRA_BARS:
            out[key] = [float(v) for v in value[0].float().cpu()]
    return out


def draw_extras(values: dict[str, list[float]], out: str | os.PathLike) -> Path:
    """One small bar chart per extra (x: entry 1..K, y: value) in one PNG, 400 px wide."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0, 1.9 * len(values)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(values), 1, squeeze=False)[:, 0]
    for ax, (key, vector) in zip(axes, values.items()):
        positions = range(1, len(vector) + 1)
        ax.bar(positions, vector, color="tab:blue")
        ax.set_xticks(list(positions))
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=8)
        for x, v in zip(positions, vector):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(out)
    return Path(out)


def render_png(draw: Any) -> Image.Image:
    """Call ``draw(path)`` on a temporary PNG path and return the picture, fully read."""
    with tempfile.TemporaryDirectory(prefix="vlmzoo-demo-") as tmp:
        path = Path(tmp) / "figure.png"
        draw(path)
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
