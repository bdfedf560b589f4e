"""Talk to a saved model: a conversation about one image (or none), answers streamed token by token.

:class:`ChatSession` keeps the conversation as plain ``{"role", "content"}`` turns. The image, when
there is one, sits first in the first user turn (LLaVA-1.5's layout, as the evaluator prompts:
``"<image>\\n" + question``); a new image starts a new conversation, as the models are trained on
one image per conversation. Each question is answered from the whole conversation, rendered by the
processor's template with the generation prompt added (:func:`vlmzoo.evaluation.generation_batch`),
with ``model.generate`` (greedy unless :class:`GenerationSettings` ask for sampling) running in a
thread and feeding transformers' ``TextIteratorStreamer``. The answer kept in the conversation is
decoded from the generated ids exactly as :func:`vlmzoo.evaluation.generate_texts` decodes them
(special tokens skipped, then stripped), so a greedy answer equals the evaluator's.

``scripts/chat.py`` is the terminal front end (:mod:`vlmzoo.chat_cli`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .configuration import VLMConfig
from .data.checks import open_rgb_image
from .data.templates import DEFAULT_IMAGE_TOKEN
from .evaluation import generation_batch, load_for_eval
from .processing import PROCESSOR_CONFIG_NAME

Messages = list[dict[str, str]]


class ModelFolderError(ValueError):
    """A path that is not a saved vlmzoo model folder (model + processor); the message names it."""


class ImageFileError(ValueError):
    """An image path that is missing or cannot be read as an image; the message names it."""


# ---- inputs -----------------------------------------------------------------------------------------
def load_model_folder(path: str | os.PathLike, template: str | None = None, dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> tuple[Any, Any]:
    """A saved model (eval mode) + its processor, as :func:`vlmzoo.evaluation.load_for_eval` loads them.

    Anything that is not such a folder (missing, a file, another model's checkpoint, no processor)
    is a :class:`ModelFolderError` of one line naming the path.
    """
    folder = Path(path)
    if not folder.is_dir():
        reason = "no such folder" if not folder.exists() else "not a folder"
        raise ModelFolderError(f"{path}: {reason} (give a saved model, e.g. <run>/<stage>/final)")
    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{path}: unreadable config.json ({exc})") from None
    if model_type != VLMConfig.model_type:
        found = "no config.json" if model_type is None else f"its config.json is a {model_type!r} model"
        raise ModelFolderError(f"{path}: not a saved vlmzoo model ({found}; give e.g. <run>/<stage>/final)")
    if not (folder / PROCESSOR_CONFIG_NAME).is_file():
        raise ModelFolderError(f"{path}: no {PROCESSOR_CONFIG_NAME}; the model was saved without its processor")
    try:
        return load_for_eval(folder, template, dtype, device)
    except Exception as exc:  # a damaged checkpoint, an unknown strategy, ...: one line, the folder named
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFolderError(f"{path}: cannot load the model ({first})") from exc


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` as RGB; a missing or unreadable file is an :class:`ImageFileError` naming it."""
    if not os.path.exists(path):
        raise ImageFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageFileError(f"{path}: is a folder, not an image file")
    try:
        return open_rgb_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageFileError(f"{path}: not a readable image ({exc})") from None


# ---- generation ---------------------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    """``model.generate`` options; greedy by default. The sampling fields apply only with ``do_sample``.

    Attributes:
        max_new_tokens: longest answer in tokens.
        do_sample: sample instead of greedy decoding.
        temperature / top_k / top_p / repetition_penalty: as in ``transformers.GenerationConfig``
            (``None``: the model's generation config decides).
        seed: seeds torch before each sampled answer (reproducible sampling).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            for key in ("temperature", "top_k", "top_p"):
                if getattr(self, key) is not None:
                    kwargs[key] = getattr(self, key)
        return kwargs


@dataclass
class Answer:
    """One answered question.

    Attributes:
        text: the decoded answer (special tokens skipped, stripped), as kept in the conversation.
        new_tokens: ``(A,)`` the generated ids (end-of-sequence token included when generated).
        batch: the one-sample prompt batch it was generated from (:func:`vlmzoo.evaluation.generation_batch`).
        seconds: wall time of the generation (prefill + decoding).
        first_token_seconds: wall time until the first new token.
    """

    text: str
    new_tokens: torch.Tensor
    batch: dict[str, torch.Tensor]
    seconds: float
    first_token_seconds: float | None

    @property
    def num_tokens(self) -> int:
        return int(self.new_tokens.numel())


class _TokenStreamer(TextIteratorStreamer):
    """``TextIteratorStreamer`` that hands out text after every generated token and records when the first came.

    transformers' streamer holds text back until a word ends (a space); a word-level tokenizer may
    decode without spaces, so this one emits each token's text at once, waiting only while the
    decoded text ends in an incomplete character (U+FFFD, a byte-level BPE token cut mid-character).
    """

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:  # the first call carries the prompt
            self.next_tokens_are_prompt = False
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return
        piece, self.print_len = text[self.print_len:], len(text)
        if piece:
            self.on_finalized_text(piece)


class _StopFlag(StoppingCriteria):
    """Ends generation once :attr:`event` is set (the reader went away, or Ctrl-C)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# ---- the session ----------------------------------------------------------------------------------------
@dataclass
class ChatSession:
    """One conversation with one model.

    Attributes:
        model / processor: a loaded model folder (:func:`load_model_folder`).
        settings: generation options (greedy by default).
        image: the conversation's image (RGB), or ``None`` for a text-only conversation.
        high_res_image: the same picture at a higher resolution, for a strategy with high-res crops
            (else they come from ``image`` upsampled); ignored by the others.
        messages: the turns so far, user and assistant alternating, without image placeholders.
        last: the latest :class:`Answer` (``None`` before the first, or after :meth:`reset`).
    """

    model: Any
    processor: Any
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    image: Image.Image | None = None
    high_res_image: Image.Image | None = None
    messages: Messages = field(default_factory=list)
    last: Answer | None = None

    @property
    def strategy(self) -> str:
        return str(self.model.config.strategy)

    @property
    def num_visual_tokens(self) -> int:
        return int(self.model.strategy.num_visual_tokens)

    def reset(self) -> None:
        """Forget the conversation; keep the image."""
        self.messages = []
        self.last = None

    def set_image(self, image: Image.Image | None, high_res_image: Image.Image | None = None) -> None:
        """A new image (``None``: none) starts a new conversation."""
        self.image = None if image is None else image.convert("RGB")
        self.high_res_image = None if high_res_image is None else high_res_image.convert("RGB")
        self.reset()

    def prompt_messages(self, question: str) -> Messages:
        """The conversation plus ``question`` as the model sees it: the image placeholder first in the first turn."""
        question = question.replace(DEFAULT_IMAGE_TOKEN, " ").strip()
        messages = [dict(m) for m in self.messages] + [{"role": "user", "content": question}]
        if self.image is not None:
            messages[0]["content"] = f"{DEFAULT_IMAGE_TOKEN}\n{messages[0]['content']}"
        return messages

    def prompt_batch(self, question: str) -> dict[str, torch.Tensor]:
        """``question``'s one-sample generation batch (``input_ids (1, P)``, ``pixel_values (N, 3, H, W)`` ...)."""
        images = [[self.image]] if self.image is not None else [[]]
        high_res = [[self.high_res_image]] if self.image is not None and self.high_res_image is not None else None
        return generation_batch(self.model, self.processor, [self.prompt_messages(question)], images, high_res)

    def stream(self, question: str) -> Iterator[str]:
        """Answer ``question``, yielding the decoded text piece by piece as it is generated.

        When the generator is exhausted, the question and the answer are in :attr:`messages` and the
        answer in :attr:`last`. If the caller stops early (``close()``, an exception such as Ctrl-C),
        generation is stopped and the conversation is left as it was.
        """
        if not question.replace(DEFAULT_IMAGE_TOKEN, " ").strip():
            raise ValueError("empty question")
        batch = self.prompt_batch(question)
        tokenizer = self.processor.tokenizer
        streamer, stop = _TokenStreamer(tokenizer), _StopFlag()
        kwargs = dict(self.settings.generate_kwargs(), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([stop]))
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["ids"] = self.model.generate(**batch, **kwargs)
            except BaseException as exc:  # handed to the reader; the stream must still end
                result["error"] = exc
                streamer.end()

        self.model.eval()
        if self.settings.do_sample and self.settings.seed is not None:
            torch.manual_seed(self.settings.seed)
        start = time.perf_counter()
        thread = threading.Thread(target=run, name="vlmzoo-chat-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.event.set()  # no-op once generation has ended; stops it when the reader leaves early
            thread.join()
        if "error" in result:
            raise result["error"]
        seconds = time.perf_counter() - start
        new_tokens = result["ids"][0, batch["input_ids"].shape[1]:].cpu()
        text = self.processor.batch_decode(new_tokens[None], skip_special_tokens=True)[0].strip()
        first = None if streamer.first_token_time is None else streamer.first_token_time - start
        self.last = Answer(text=text, new_tokens=new_tokens, batch=batch, seconds=seconds, first_token_seconds=first)
        self.messages += [{"role": "user", "content": question.replace(DEFAULT_IMAGE_TOKEN, " ").strip()},
                          {"role": "assistant", "content": text}]

    def ask(self, question: str) -> Answer:
        """Answer ``question`` without streaming (see :meth:`stream`)."""
        for _ in self.stream(question):
            pass
        assert self.last is not None
        return self.last
