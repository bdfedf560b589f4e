"""lmms-eval model plugin: ``lmms-eval --model vlmzoo --model_args pretrained=DIR --tasks ...``.

``DIR`` is a folder written by ``model.save_pretrained`` + ``processor.save_pretrained`` (any
strategy). lmms-eval 0.7.3 finds the class through the ``lmms_eval.models`` entry-point group
(declared in ``pyproject.toml``): the entry point is :data:`LMMS_EVAL_MANIFEST`, a
``ModelManifest`` naming :class:`VLMZooLMM` as the "simple" (non chat-template) implementation.

How requests become model inputs (the same path as :mod:`vlmzoo.evaluation`):

* the task's context string is the text of one user turn; the doc's images (``doc_to_visual``,
  PIL images, zero or more) get one ``<image>`` placeholder each in front of it, unless the context
  already holds exactly that many placeholders; the processor's conversation template wraps it and
  adds the assistant header (the generation prompt);
* ``generate_until``: left-padded batches through :func:`vlmzoo.evaluation.generate_texts`
  (``model.generate``, KV cache, greedy unless the task asks for ``do_sample`` with a temperature
  > 0), stopped and cut at the first of the task's ``until`` strings;
* ``loglikelihood``: the continuation is scored as the assistant's answer: the tokens a training
  sample with that answer holds after the generation prompt, its end of turn left off (leading
  whitespace, lmms-eval's target delimiter, dropped: the template puts its own separator); one
  forward pass over prompt + continuation (with the images) gives the summed log-probability of
  its tokens and whether each is the arg-max.

This module imports lmms_eval at top level; ``import vlmzoo`` never imports this module.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .evaluation import generate_texts, image_first_messages, load_for_eval

logger = logging.getLogger(__name__)

MODEL_NAME = "vlmzoo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class VLMZooLMM(lmms):
    """A saved vlmzoo model + processor behind lmms-eval's ``lmms`` interface (one process).

    Args:
        pretrained: folder holding the model and its processor.
        device: torch device, e.g. ``"cpu"`` or ``"cuda:0"``.
        batch_size: requests per forward / generate call.
        max_new_tokens: generation budget when a task's ``generation_kwargs`` name none.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"float64"`` (exact comparisons).
        template: conversation template to use instead of the saved processor's.
        max_batch_size: accepted for lmms-eval's command line, unused.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = "cpu",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        dtype: str = "float32",
        template: str | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"vlmzoo lmms-eval model: unknown model_args {sorted(unknown)}; "
                            "known: pretrained, device, batch_size, max_new_tokens, dtype, template.")
        if str(batch_size).startswith("auto"):
            raise ValueError("vlmzoo lmms-eval model: batch_size='auto' is not supported; give a number.")
        if dtype not in DTYPES:
            raise ValueError(f"vlmzoo lmms-eval model: dtype={dtype!r}; choose one of {', '.join(DTYPES)}.")
        self._device = torch.device(device or "cpu")
        self.batch_size_per_gpu = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self._model, self._processor = load_for_eval(pretrained, template, DTYPES[dtype], self._device)

    # ---- properties lmms-eval reads ---------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ---- docs and prompts -------------------------------------------------------------------------
    def _images(self, doc_to_visual: Callable | None, doc_id: Any, task: str, split: str) -> list[Image.Image]:
        """The doc's visuals as RGB PIL images (zero or more); anything else is an error naming the doc."""
        if doc_to_visual is None:
            return []
        try:
            doc = self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError) as exc:
            raise KeyError(f"vlmzoo: no doc {doc_id!r} in split {split!r} of task {task!r} (model.task_dict).") from exc
        visuals = doc_to_visual(doc)
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        bad = [type(v).__name__ for v in visuals if not isinstance(v, Image.Image)]
        if bad:
            raise TypeError(f"vlmzoo reads images only (PIL); doc {doc_id!r} of task {task!r} gave {', '.join(bad)} "
                            "(video and audio tasks are not supported).")
        return [v.convert("RGB") for v in visuals]

    def _messages(self, context: str, num_images: int, doc_id: Any, task: str) -> list[dict[str, str]]:
        """One user turn: an ``<image>`` per image in front of ``context`` (or the context's own placeholders)."""
        token = self._processor.image_token
        found = context.count(token)
        if found and found != num_images:
            raise ValueError(f"vlmzoo: the context of doc {doc_id!r} of task {task!r} holds {found} {token!r} "
                             f"placeholder(s) but the doc has {num_images} image(s).")
        content = context if found else (token + "\n") * num_images + context
        return image_first_messages([{"role": "user", "content": content}], num_images, token)

    # ---- generate_until ---------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        """Each request's ``args`` = ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` -> its answer.

        Requests with equal generation settings are batched (``batch_size``) with left padding:
        ``input_ids`` ``(B, T)``, ``pixel_values`` ``(N, 3, H, W)`` for the N images of the batch.
        """
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        settings: dict[tuple, dict[str, Any]] = {}
        for i, req in enumerate(requests):
            key, setting = self._generation_setting(req.args[1])
            groups[key].append(i)
            settings[key] = setting
        for key, indices in groups.items():
            setting = settings[key]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                conversations, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    imgs = self._images(doc_to_visual, doc_id, task, split)
                    conversations.append(self._messages(context, len(imgs), doc_id, task))
                    images.append(imgs)
                texts = self._generate(conversations, images, setting)
                for i, text in zip(chunk, texts):
                    results[i] = cut_at_stops(text, setting["until"])
        return results  # type: ignore[return-value]

    def _generation_setting(self, gen_kwargs: dict[str, Any] | None) -> tuple[tuple, dict[str, Any]]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}.")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        setting = {
            "until": [u for u in until if u],
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "sample": sample,
            "temperature": temperature if sample else None,
            "top_p": float(gen_kwargs["top_p"]) if sample and gen_kwargs.get("top_p") is not None else None,
        }
        key = (tuple(setting["until"]), setting["max_new_tokens"], setting["num_beams"], sample, setting["temperature"], setting["top_p"])
        return key, setting

    def _generate(self, conversations: list, images: list, setting: dict[str, Any]) -> list[str]:
        kwargs: dict[str, Any] = {"num_beams": setting["num_beams"]}
        if setting["sample"]:
            kwargs.update(do_sample=True, temperature=setting["temperature"])
            if setting["top_p"] is not None:
                kwargs["top_p"] = setting["top_p"]
        if setting["until"] and setting["num_beams"] == 1:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopAtStrings(self.tokenizer, setting["until"])])
        return generate_texts(self._model, self._processor, conversations, images,
                              max_new_tokens=setting["max_new_tokens"], **kwargs)

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        task = requests[0].task_name if requests else "?"
        raise NotImplementedError(f"vlmzoo answers single-round tasks (generate_until, loglikelihood); task {task!r} is multi-round.")

    # ---- loglikelihood ----------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """Each request -> ``(sum of log p(continuation token), continuation is the greedy one)``.

        ``args`` is ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``,
        or ``(context, continuation)`` without images (lmms-eval's unconditional choices). Batches
        are right-padded: ``input_ids`` ``(B, T)`` = prompt + continuation, logits ``(B, T, V)``.
        """
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            features, spans = [], []
            for req in chunk:
                feature, span = self._scoring_feature(req.args)
                features.append(feature)
                spans.append(span)
            batch = self._processor.pad(features, padding_side="right", return_labels=False)
            batch = {k: v.to(self._device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(self._model.vision_dtype)
            logits = self._model(**batch).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, (prompt_len, cont_len) in enumerate(spans):
                if cont_len == 0:
                    results.append((0.0, True))
                    continue
                targets = batch["input_ids"][row, prompt_len : prompt_len + cont_len]
                # Position t predicts token t + 1.
                scores = logprobs[row, prompt_len - 1 : prompt_len + cont_len - 1]
                total = scores.gather(-1, targets.unsqueeze(-1)).sum().item()
                greedy = bool((scores.argmax(-1) == targets).all())
                results.append((float(total), greedy))
        return results

    def _scoring_feature(self, args: tuple) -> tuple[dict[str, Any], tuple[int, int]]:
        """One request -> the processor's per-sample feature for prompt + continuation, and (prompt, continuation) lengths."""
        if len(args) == 2:
            (context, continuation), doc_to_visual, doc_id, task, split = args, None, None, "?", None
        elif len(args) == 6:
            context, continuation, doc_to_visual, doc_id, task, split = args
        else:
            raise ValueError(f"vlmzoo: unexpected loglikelihood request arguments ({len(args)} items).")
        if callable(continuation):
            continuation = continuation(self.task_dict[task][split][doc_id])
        if not isinstance(continuation, str):
            raise TypeError(f"vlmzoo: the continuation of doc {doc_id!r} of task {task!r} is a "
                            f"{type(continuation).__name__}, not a string.")
        images = self._images(doc_to_visual, doc_id, task, split)
        messages = self._messages(context, len(images), doc_id, task)
        enc = self._processor.encode(messages, add_generation_prompt=True)
        cont_ids: list[int] = []
        if continuation.strip():
            answered = [*messages, {"role": "assistant", "content": continuation.lstrip()}]
            sample = self._processor.encoder.encode(answered, continue_final_message=True).input_ids
            if sample[: len(enc.input_ids)] != list(enc.input_ids):
                raise ValueError(f"vlmzoo: template {self._processor.template.name!r} prompts doc {doc_id!r} of task "
                                 f"{task!r} with tokens that its samples with an answer do not start with.")
            cont_ids = sample[len(enc.input_ids):]
        feature = {
            "input_ids": list(enc.input_ids) + cont_ids,
            "labels": [],
            "instruction_mask": list(enc.instruction_mask) + [False] * len(cont_ids),
            "query_text": enc.query_text,
            "pixel_values": self._processor.preprocess_images(images),
        }
        return feature, (len(enc.input_ids), len(cont_ids))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any of ``stops``."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


class StopAtStrings(StoppingCriteria):
    """Stops a row once its generated text contains one of ``stops`` (the text is cut afterwards).

    Decodes the generated part of each row at every step, so it works for any tokenizer whatever
    the token boundaries around the stop string.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        """``input_ids`` ``(B, T_prompt + t)`` -> ``(B,)`` True where a stop string was generated."""
        if self.prompt_len is None:  # the first call comes after one new token
            self.prompt_len = input_ids.shape[1] - 1
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool, device=input_ids.device)


#: Entry point ``vlmzoo`` of the ``lmms_eval.models`` group (pyproject.toml).
LMMS_EVAL_MANIFEST = ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VLMZooLMM")
