"""Does a sample train on what its conversation says? LLaVA users know the failure as "tokenization
mismatch": the label mask drifts from the rendered conversation and the model trains on role
markers, or on nothing.

:func:`check_supervision` encodes a conversation and checks, with the tokenizer's own ``decode``:

* every label is ``-100`` or its input id;
* the trained tokens form one run per assistant message, and each run decodes to that answer and
  the template's end of turn (``assistant_end``, EOS), whitespace aside;
* the generation prompt of each answer (the conversation up to it, ``add_generation_prompt=True``)
  is a token-exact prefix of the training sample that ends where the answer's run starts: a model
  is prompted with the tokens it was trained on.

:class:`~vlmzoo.data.LlavaJsonDataset` runs it on a few records before a data set is used.
"""

from __future__ import annotations

from typing import Any, Sequence

from .templates import IGNORE_INDEX, Message, TemplateEncoder


class TokenizationMismatchError(ValueError):
    """A sample's label mask disagrees with its rendered conversation."""


def target_runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each maximal run of labels other than ``-100``."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _squeezed(text: str) -> str:
    return "".join(text.split())


def _shown(tokenizer: Any, ids: Sequence[int]) -> str:
    return repr(tokenizer.convert_ids_to_tokens(list(ids)))


def check_supervision(encoder: TemplateEncoder, messages: Sequence[Message]) -> None:
    """Raise :class:`TokenizationMismatchError` (saying what differs) if ``messages`` encoded by
    ``encoder`` train on anything but the answers and their end of turn, or if a generation
    prompt is not the training sample's prefix up to its answer (see the module docstring)."""
    tokenizer, template = encoder.tokenizer, encoder.template
    full = encoder.encode(messages)
    ids, labels = full.input_ids, full.labels
    for i, (tid, label) in enumerate(zip(ids, labels)):
        if label not in (IGNORE_INDEX, tid):
            raise TokenizationMismatchError(f"label {label} at position {i} is neither -100 nor the input id {tid}.")
    answer_at = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    runs = target_runs(labels)
    if len(runs) != len(answer_at):
        shown = "; ".join(repr(tokenizer.decode(ids[s:e], skip_special_tokens=False)) for s, e in runs)
        raise TokenizationMismatchError(
            f"{len(answer_at)} answer(s) but {len(runs)} trained span(s) under template {template.name!r}: [{shown}]."
        )
    for n, (k, (start, end)) in enumerate(zip(answer_at, runs)):
        expected_ids = tokenizer.encode(messages[k]["content"] + template.assistant_end, add_special_tokens=False)
        if template.assistant_end_eos:
            expected_ids = [*expected_ids, encoder.eos_token_id]
        got = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        expected = tokenizer.decode(expected_ids, skip_special_tokens=False)
        if _squeezed(got) != _squeezed(expected):
            raise TokenizationMismatchError(
                f"answer {n} trains on {got!r} (tokens {_shown(tokenizer, ids[start:end])}) but the conversation "
                f"says {expected!r} under template {template.name!r}."
            )
        prompt = encoder.encode(messages[:k], add_generation_prompt=True).input_ids
        if ids[: len(prompt)] != prompt or len(prompt) != start:
            cut = max(min(len(prompt), start) - 3, 0)
            raise TokenizationMismatchError(
                f"the generation prompt of answer {n} ends {_shown(tokenizer, prompt[cut:])} but training has "
                f"{_shown(tokenizer, ids[cut:start + 1])} there (the answer starts at token {start}, the prompt "
                f"has {len(prompt)} tokens) under template {template.name!r}: generation would not see what training saw."
            )
