"""Conversation templates as data, and the tokenisation that turns a conversation into a sample.

A :class:`ConversationTemplate` is a frozen description of a chat format (role prefixes, end
markers, system-prompt handling). :meth:`ConversationTemplate.render` turns a list of messages
``[{"role": "user" | "assistant" | "system", "content": str}]`` into an ordered list of
:class:`Segment` s, each flagged as *target* (contributes to the loss) and/or *instruction*
(inside the instruction span, by one of :data:`INSTRUCTION_SPAN_RULES`). :class:`TemplateEncoder`
tokenises them and takes labels and the instruction mask from the segment flags (never from
re-searching separators in the token stream).

Built-in templates (see :func:`available_templates`): ``plain`` (LLaVA stage-1 captioning),
``vicuna_v1`` (LLaVA-1.5), ``llama3``, ``qwen2``, ``chatml`` (ChatML without a default system
prompt, e.g. SmolLM2's with its own) and ``gemma2``. A custom format is simply another
``ConversationTemplate`` instance passed wherever a template name is accepted; nothing global is
ever mutated.

How the text is tokenised is part of the template (:attr:`ConversationTemplate.tokenization`):

* ``"whole"`` (every built-in template): the text between two images is tokenised as one string,
  as LLaVA's ``tokenizer_image_token`` and a tokenizer's own ``apply_chat_template`` do, so the ids
  are those of the reference pipelines token for token. Each token takes the flags of the
  characters it covers (its offsets; a fast tokenizer is needed). A space before an answer belongs
  to the answer's first token (SentencePiece's ``'▁A'``, byte-level BPE's ``'ĠA'``), so it is
  trained on and a generation prompt ends before it: LLaVA-1.5 trains on ``'▁ASSISTANT:', '▁A'``
  and prompts with ``... '▁ASSISTANT:'``.
* ``"segments"``: each segment is tokenised on its own and the pieces are concatenated. Labels are
  exact per segment, but ids can differ from the whole string's at segment boundaries (e.g.
  ``"ASSISTANT: "`` alone ends ``':', '▁'``).

Either way a generation prompt is a token-exact prefix of the training sample of the same
conversation; :func:`vlmzoo.data.check_supervision` verifies that, and that the labels are the
answers, on real samples.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence, get_args

from ..strategy import InstructionSpanRule
from ..utils import build_dataclass, nearest_names

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value of tokens that do not contribute to the loss."""

DEFAULT_IMAGE_TOKEN = "<image>"

SegmentKind = Literal["text", "image", "bos", "eos"]
SystemMode = Literal["turn", "fold", "drop"]
Tokenization = Literal["whole", "segments"]
Message = Mapping[str, str]
_Flags = tuple[bool, bool]  # (target, instruction) of one token

INSTRUCTION_SPAN_RULES: tuple[str, ...] = get_args(InstructionSpanRule)
"""Which tokens the instruction mask marks (``vlmzoo.StrategyNeeds.instruction_span_rule``):

* ``"first_user_text"``: the text of the first user message (no marker, no image, no system prompt);
* ``"before_reply_role"``: every text token before the role name of the first assistant header:
  BOS, the template's markers, a system prompt, the first user turn, and the header's leading
  special markers (those of ``required_tokens``; Gemma-2: ``<start_of_turn>`` of
  ``<start_of_turn>model``). Never an image token. With a header that is empty (``plain``): every
  text token before the first answer. TA-LLaVA's reference marks this span (on Gemma-2: every
  token before the first ``model`` token)."""


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation.

    Attributes:
        kind: ``"text"`` (tokenised), ``"image"`` (one image: ``num_visual_tokens`` image tokens),
            ``"bos"`` / ``"eos"`` (the tokenizer's BOS / EOS id).
        text: the text of a ``"text"`` segment.
        target: the segment's tokens are trained on (labels = ids); otherwise labels are -100.
        instruction: the segment is inside the instruction span (see :data:`INSTRUCTION_SPAN_RULES`).
    """

    kind: SegmentKind
    text: str = ""
    target: bool = False
    instruction: bool = False


@dataclass(frozen=True)
class ConversationTemplate:
    """A chat format, described by strings.

    A conversation renders as::

        [BOS] begin [system] (user_prefix USER user_suffix assistant_prefix ANSWER end assistant_suffix)*

    where ``end`` is ``assistant_end`` and/or the tokenizer's EOS (``assistant_end_eos``); ANSWER and
    ``end`` are the targets. With ``add_generation_prompt`` the rendering stops after the last
    ``assistant_prefix`` (under ``"whole"`` tokenisation without its trailing spaces, which belong
    to the answer's first token).

    Attributes:
        name: template name.
        tokenizer_bos: start with the tokenizer's BOS id (skipped if the tokenizer has none).
        begin: literal text at the very start (after the tokenizer BOS, if any), e.g. ``"<bos>"``.
        default_system: system prompt used when the conversation has none (``None`` = no system).
        system_mode: ``"turn"``: render ``system_format``; ``"fold"``: prepend the system text plus
            ``system_fold_separator`` to the first user message (its tokens are not instruction);
            ``"drop"``: ignore any system message.
        system_format: system text with a ``{content}`` placeholder (``"turn"`` mode).
        system_fold_separator: separator after a folded system prompt.
        user_prefix, user_suffix: text around each user message.
        assistant_prefix: text before each assistant message; also the generation prompt.
        assistant_end: literal end-of-turn marker, trained on (e.g. ``"<|eot_id|>"``).
        assistant_end_eos: end each assistant turn with the tokenizer's EOS id, trained on.
        assistant_suffix: untrained text after the end marker (e.g. ``"\\n"``).
        drop_user_text: keep only the images of user messages in the tokens (LLaVA's ``plain``
            format); :attr:`EncodedConversation.query_text` still carries their text.
        single_turn: exactly one user message (and one assistant answer) per conversation.
        required_tokens: literal markers that must each be a single token of the tokenizer.
        tokenization: ``"whole"``: tokenise the text between images as one string (the reference
            pipelines' ids; labels from token offsets, needs a fast tokenizer); ``"segments"``:
            tokenise each segment on its own. See the module docstring.
    """

    name: str
    tokenizer_bos: bool = False
    begin: str = ""
    default_system: str | None = None
    system_mode: SystemMode = "turn"
    system_format: str = "{content}"
    system_fold_separator: str = "\n\n"
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_end: str = ""
    assistant_end_eos: bool = False
    assistant_suffix: str = ""
    drop_user_text: bool = False
    single_turn: bool = False
    required_tokens: tuple[str, ...] = field(default=())
    tokenization: Tokenization = "whole"

    def __post_init__(self) -> None:
        if self.tokenization not in ("whole", "segments"):
            raise ValueError(f"tokenization of template {self.name!r} must be 'whole' or 'segments', got {self.tokenization!r}.")
        if self.system_mode not in ("turn", "fold", "drop"):
            raise ValueError(f"system_mode must be 'turn', 'fold' or 'drop', got {self.system_mode!r}.")
        if self.system_mode == "turn" and "{content}" not in self.system_format:
            raise ValueError(f"system_format of template {self.name!r} needs a '{{content}}' placeholder.")
        if not (self.assistant_end or self.assistant_end_eos):
            raise ValueError(f"Template {self.name!r} needs an end of assistant turn (assistant_end or assistant_end_eos).")

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ConversationTemplate":
        return build_dataclass(cls, dict(values), where="conversation template")

    # ---- rendering ---------------------------------------------------------------------------
    def render(
        self,
        messages: Sequence[Message],
        image_token: str = DEFAULT_IMAGE_TOKEN,
        add_generation_prompt: bool = False,
        instruction_rule: InstructionSpanRule = "first_user_text",
        continue_final_message: bool = False,
    ) -> list[Segment]:
        """Messages -> ordered segments (empty text segments are dropped).

        ``image_token`` occurrences in user messages become ``"image"`` segments; in any other
        message they are an error. ``instruction_rule`` (one of :data:`INSTRUCTION_SPAN_RULES`)
        decides which segments are flagged ``instruction``. Raises ``ValueError`` for malformed
        conversations (roles not alternating user/assistant, system not first, generation prompt
        after an answer, ...) and for an unknown rule.
        ``continue_final_message``: the last (assistant) message without its end of turn, as
        ``apply_chat_template(continue_final_message=True)`` renders it: a training sample's
        tokens up to the end of that answer.
        """
        if instruction_rule not in INSTRUCTION_SPAN_RULES:
            raise ValueError(f"instruction_rule must be one of {INSTRUCTION_SPAN_RULES}, got {instruction_rule!r}.")
        system, turns = _split_roles(messages, self.name)
        if self.single_turn and not (
            [m["role"] for m in turns] in (["user", "assistant"], ["user"])
            and (add_generation_prompt or len(turns) == 2)
        ):
            raise ValueError(
                f"Template {self.name!r} takes exactly one user message followed by one assistant message "
                f"(or a single user message with add_generation_prompt=True); got roles {[m['role'] for m in turns]}."
            )
        if add_generation_prompt and turns[-1]["role"] != "user":
            raise ValueError("add_generation_prompt=True needs a conversation that ends with a user message.")
        if continue_final_message and (add_generation_prompt or turns[-1]["role"] != "assistant"):
            raise ValueError("continue_final_message=True needs a conversation that ends with an assistant message "
                             "(and no add_generation_prompt).")
        for m in [*turns, *([{"role": "system", "content": system}] if system else [])]:
            if m["role"] != "user" and image_token in m["content"]:
                raise ValueError(f"Found {image_token!r} in a {m['role']} message; images belong in user messages.")

        segs: list[Segment] = []
        if self.tokenizer_bos:
            segs.append(Segment("bos"))
        segs.append(Segment("text", self.begin))
        if system is None:
            system = self.default_system
        fold = None
        if system is not None and self.system_mode == "turn":
            segs.append(Segment("text", self.system_format.replace("{content}", system)))
        elif system is not None and self.system_mode == "fold":
            fold = system + self.system_fold_separator

        first_user = True
        reply_at: int | None = None  # index of the first assistant header
        for i, message in enumerate(turns):
            content = message["content"]
            if message["role"] == "user":
                segs.append(Segment("text", self.user_prefix))
                if fold is not None and first_user:
                    segs.append(Segment("text", fold))
                segs.extend(self._user_content(content, image_token, instruction=first_user))
                segs.append(Segment("text", self.user_suffix))
                first_user = False
            else:
                reply_at = len(segs) if reply_at is None else reply_at
                segs.append(Segment("text", self.assistant_prefix))
                segs.append(Segment("text", content, target=True))
                if continue_final_message and i == len(turns) - 1:
                    break
                segs.append(Segment("text", self.assistant_end, target=True))
                if self.assistant_end_eos:
                    segs.append(Segment("eos", target=True))
                segs.append(Segment("text", self.assistant_suffix))
        if add_generation_prompt:
            reply_at = len(segs) if reply_at is None else reply_at
            # Under whole-string tokenisation the spaces after the header are the answer's first
            # token's ('▁A'): the prompt ends before them (LLaVA-1.5: "... ASSISTANT:").
            header = self.assistant_prefix.rstrip(" ") if self.tokenization == "whole" else self.assistant_prefix
            segs.append(Segment("text", header))
        if instruction_rule == "before_reply_role":
            segs = self._before_reply_role(segs, reply_at)
        return [s for s in segs if s.kind != "text" or s.text]

    def _before_reply_role(self, segs: list[Segment], reply_at: int | None) -> list[Segment]:
        """Flag every non-image segment before the first assistant header ``segs[reply_at]`` as
        instruction, and split the header after its leading special markers (flagged too). The
        split falls after a single-token marker, so it does not change the header's tokens."""
        if reply_at is None:  # no answer and no generation prompt: the whole conversation is prompt
            reply_at = len(segs)
        out = [dataclasses.replace(s, instruction=s.kind != "image") for s in segs[:reply_at]]
        if reply_at < len(segs):
            header = segs[reply_at].text
            opening = _leading_markers(header, self.required_tokens)
            out += [Segment("text", opening, instruction=True), Segment("text", header[len(opening):])]
            out += segs[reply_at + 1 :]
        return out

    def _user_content(self, content: str, image_token: str, instruction: bool) -> list[Segment]:
        pieces = content.split(image_token)
        out: list[Segment] = []
        for i, piece in enumerate(pieces):
            if i > 0:
                out.append(Segment("image"))
            if not self.drop_user_text:
                out.append(Segment("text", piece, instruction=instruction))
        return out


def _leading_markers(text: str, markers: Sequence[str]) -> str:
    """The longest start of ``text`` made of whole ``markers`` (e.g. ``"<start_of_turn>"`` of
    ``"<start_of_turn>model\n"``); ``""`` if it starts with none."""
    by_length = sorted((m for m in markers if m), key=len, reverse=True)
    end = 0
    while True:
        found = next((m for m in by_length if text.startswith(m, end)), None)
        if found is None:
            return text[:end]
        end += len(found)


def _split_roles(messages: Sequence[Message], template: str) -> tuple[str | None, list[Message]]:
    """-> (system text or None, user/assistant messages); validates roles and their order."""
    if not messages:
        raise ValueError("Empty conversation: expected at least one user message.")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"Message {i} must be a dict with string 'role' and 'content', got {m!r}.")
        if m["role"] not in ("user", "assistant", "system"):
            raise ValueError(f"Message {i} has unknown role {m['role']!r}; expected 'user', 'assistant' or 'system'.")
    system = None
    turns = list(messages)
    if turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "first" if i == 0 else f"{i + (system is not None)}th (0-based)"
            raise ValueError(
                f"Template {template!r}: the {where} message has role {m['role']!r} but {expected!r} was expected "
                "(an optional system message first, then user and assistant messages alternating, starting with user)."
            )
    if not turns:
        raise ValueError("Conversation has no user message.")
    return system, turns


# ---- built-in templates --------------------------------------------------------------------------

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA-1.5's ``conv_vicuna_v1`` system prompt (LLaVA-1.0's ``v0`` says "human" instead of "user")."""

_BUILTIN: Mapping[str, ConversationTemplate] = MappingProxyType(
    {
        t.name: t
        for t in (
            # LLaVA's ``conv_llava_plain``: "<image>" + caption + "\n", the caption and newline trained on.
            ConversationTemplate(
                name="plain",
                tokenizer_bos=True,
                system_mode="drop",
                assistant_end="\n",
                drop_user_text=True,
                single_turn=True,
            ),
            # LLaVA-1.5's ``conv_vicuna_v1``: "{system} USER: {q} ASSISTANT: {a}</s>USER: ...".
            ConversationTemplate(
                name="vicuna_v1",
                tokenizer_bos=True,
                default_system=VICUNA_SYSTEM,
                system_format="{content} ",
                user_prefix="USER: ",
                user_suffix=" ",
                assistant_prefix="ASSISTANT: ",
                assistant_end_eos=True,
            ),
            ConversationTemplate(
                name="llama3",
                begin="<|begin_of_text|>",
                system_format="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
                user_suffix="<|eot_id|>",
                assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
                assistant_end="<|eot_id|>",
                required_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            ),
            ConversationTemplate(
                name="qwen2",
                default_system="You are a helpful assistant.",
                system_format="<|im_start|>system\n{content}<|im_end|>\n",
                user_prefix="<|im_start|>user\n",
                user_suffix="<|im_end|>\n",
                assistant_prefix="<|im_start|>assistant\n",
                assistant_end="<|im_end|>",
                assistant_suffix="\n",
                required_tokens=("<|im_start|>", "<|im_end|>"),
            ),
            # ChatML with no default system prompt (qwen2 is ChatML with Qwen's). SmolLM2-Instruct's
            # chat template is this with its own system prompt: {base: chatml, default_system: ...}.
            ConversationTemplate(
                name="chatml",
                system_format="<|im_start|>system\n{content}<|im_end|>\n",
                user_prefix="<|im_start|>user\n",
                user_suffix="<|im_end|>\n",
                assistant_prefix="<|im_start|>assistant\n",
                assistant_end="<|im_end|>",
                assistant_suffix="\n",
                required_tokens=("<|im_start|>", "<|im_end|>"),
            ),
            ConversationTemplate(
                name="gemma2",
                begin="<bos>",
                system_mode="fold",
                user_prefix="<start_of_turn>user\n",
                user_suffix="<end_of_turn>\n",
                assistant_prefix="<start_of_turn>model\n",
                assistant_end="<end_of_turn>",
                assistant_suffix="\n",
                required_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
            ),
        )
    }
)


def available_templates() -> list[str]:
    """Sorted names of the built-in templates."""
    return sorted(_BUILTIN)


def get_template(name: str | Mapping[str, Any] | ConversationTemplate) -> ConversationTemplate:
    """A built-in template by name; a mapping ``{"base": NAME, FIELD: VALUE, ...}`` is that built-in
    template with some fields replaced (e.g. ``{"base": "vicuna_v1", "default_system": None}``, named
    ``vicuna_v1+custom`` unless it sets ``name``); a :class:`ConversationTemplate` is returned unchanged."""
    if isinstance(name, ConversationTemplate):
        return name
    if isinstance(name, Mapping):
        spec = dict(name)
        if "base" not in spec:
            raise KeyError(f"A template mapping needs a 'base' template name; got keys {sorted(spec)}.")
        base = get_template(spec.pop("base"))
        return ConversationTemplate.from_dict({**base.to_dict(), "name": f"{base.name}+custom", **spec})
    if name not in _BUILTIN:
        near = nearest_names(str(name), _BUILTIN)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise KeyError(
            f"Unknown conversation template {name!r}.{hint} Known templates: {', '.join(available_templates())} "
            "(or pass a ConversationTemplate instance)."
        )
    return _BUILTIN[name]


# ---- tokenisation --------------------------------------------------------------------------------


class ImageTruncationError(ValueError):
    """Truncating a sample to ``max_length`` would cut into (or drop) image tokens."""


@dataclass
class EncodedConversation:
    """One tokenised conversation (all lists have the same length T).

    Attributes:
        input_ids: token ids; each image is ``num_visual_tokens`` copies of the image token id.
        labels: ``input_ids`` at target tokens, ``IGNORE_INDEX`` (-100) elsewhere.
        instruction_mask: True at the instruction span's tokens (the encoder's ``instruction_rule``).
        truncated: the sample was cut to ``max_length``.
        num_images: image placeholders in the sample.
        query_text: the *last* user message's text (image placeholders removed, stripped):
            the question being answered (in a generation prompt, the turn being answered), which
            text encoders of instruction-guided strategies read. Templates that drop user text
            from ``input_ids`` (``plain``) still give it here.
    """

    input_ids: list[int]
    labels: list[int]
    instruction_mask: list[bool]
    truncated: bool = False
    num_images: int = 0
    query_text: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def _single_token_id(tokenizer: Any, token: str, what: str) -> int:
    """Id of ``token`` if the tokenizer keeps it as one (special/added) token; else a clear error."""
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if tid is None or (unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None)) or encoded != [tid]:
        raise ValueError(
            f"{what} {token!r} is not a single token of the tokenizer (it encodes to {encoded}). "
            f"Add it, e.g. tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}}), "
            "and resize the model's embeddings."
        )
    return tid


class TemplateEncoder:
    """Tokenises conversations with one tokenizer and template (validated once, reusable).

    Args:
        tokenizer: any Hugging Face tokenizer (a fast one for ``"whole"`` tokenisation).
        template: a template name or instance.
        image_token: the placeholder in message text, which must also be a single token.
        num_visual_tokens: image tokens per image placeholder.
        instruction_rule: which tokens ``instruction_mask`` marks (:data:`INSTRUCTION_SPAN_RULES`).
        visual_tokens_first: put every image's tokens at the start of the sequence (before BOS), in
            image order, and drop the placeholders from the text (the text around them joins).
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str | ConversationTemplate,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        num_visual_tokens: int = 1,
        instruction_rule: InstructionSpanRule = "first_user_text",
        visual_tokens_first: bool = False,
    ) -> None:
        if num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}.")
        if instruction_rule not in INSTRUCTION_SPAN_RULES:
            raise ValueError(f"instruction_rule must be one of {INSTRUCTION_SPAN_RULES}, got {instruction_rule!r}.")
        self.instruction_rule = instruction_rule
        self.visual_tokens_first = bool(visual_tokens_first)
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.image_token = image_token
        self.num_visual_tokens = int(num_visual_tokens)
        self.image_token_id = _single_token_id(tokenizer, image_token, "Image token")
        for tok in self.template.required_tokens:
            _single_token_id(tokenizer, tok, f"Template {self.template.name!r} marker")
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.template.assistant_end_eos and self.eos_token_id is None:
            raise ValueError(f"Template {self.template.name!r} ends answers with EOS, but the tokenizer has no eos_token.")
        name = self.template.name
        if self.template.tokenization == "whole":
            if not getattr(tokenizer, "is_fast", False):
                raise ValueError(
                    f"Template {name!r} tokenises whole strings, which needs token offsets: load a fast tokenizer "
                    f"(use_fast=True), or use {{'base': {name!r}, 'tokenization': 'segments'}}."
                )
            if self.template.assistant_end_eos:  # written as text into the string, the tokenizer must keep it
                _single_token_id(tokenizer, tokenizer.eos_token, f"The EOS token ending template {name!r}'s answers")
        if not self.template.assistant_end_eos and not tokenizer.encode(self.template.assistant_end, add_special_tokens=False):
            logger.warning(
                "Template %r ends answers with %r, which this tokenizer encodes to no token: answers get no "
                "end-of-turn token (end them with EOS: {'base': %r, 'assistant_end': '', 'assistant_end_eos': True}).",
                name, self.template.assistant_end, name,
            )

    def _query_text(self, messages: Sequence[Message]) -> str:
        """The last user message's text, image placeholders removed and stripped. Also under a
        template that drops user text from the LLM's input (``plain``): the text encoder still
        reads the instruction that came with the image."""
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users:
            return ""
        return "".join(users[-1].split(self.image_token)).strip()

    def encode(
        self,
        messages: Sequence[Message],
        max_length: int | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
    ) -> EncodedConversation:
        """Tokenise one conversation; see :func:`encode_conversation` (``continue_final_message``:
        see :meth:`ConversationTemplate.render`)."""
        segments = self.template.render(messages, self.image_token, add_generation_prompt,
                                        instruction_rule=self.instruction_rule,
                                        continue_final_message=continue_final_message)
        if self.visual_tokens_first:
            segments = [s for s in segments if s.kind == "image"] + [s for s in segments if s.kind != "image"]
        if self.template.tokenization == "whole":
            ids, flags, image_spans = self._tokenize_whole(segments)
        else:
            ids, flags, image_spans = self._tokenize_segments(_merge_text(segments))
        labels = [tid if target else IGNORE_INDEX for tid, (target, _) in zip(ids, flags)]
        instr = [instruction for _, instruction in flags]

        query_text = self._query_text(messages)
        truncated = False
        if max_length is not None and len(ids) > max_length:
            if add_generation_prompt:
                raise ValueError(f"Generation prompt is {len(ids)} tokens long, more than max_length={max_length}.")
            for k, (start, end) in enumerate(image_spans):
                if end > max_length:
                    raise ImageTruncationError(
                        f"Truncating a {len(ids)}-token sample to max_length={max_length} would cut into image "
                        f"{k} (its {self.num_visual_tokens} image tokens are at positions {start}..{end - 1}). "
                        "Raise max_length or shorten the conversation."
                    )
            ids, labels, instr = ids[:max_length], labels[:max_length], instr[:max_length]
            truncated = True
        return EncodedConversation(ids, labels, instr, truncated, len(image_spans), query_text)

    def _special_piece(self, seg: Segment, ids: list[int], image_spans: list[tuple[int, int]]) -> list[int]:
        """Ids of an ``image`` / ``bos`` / ``eos`` segment placed at ``len(ids)`` (records image spans)."""
        if seg.kind == "image":
            image_spans.append((len(ids), len(ids) + self.num_visual_tokens))
            return [self.image_token_id] * self.num_visual_tokens
        if seg.kind == "bos":
            return [] if self.bos_token_id is None else [self.bos_token_id]
        return [self.eos_token_id]

    def _tokenize_segments(self, segments: list[Segment]) -> tuple[list[int], list[_Flags], list[tuple[int, int]]]:
        """Each text segment tokenised on its own -> (ids, (target, instruction) per id, image spans)."""
        texts = [s.text for s in segments if s.kind == "text"]
        text_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        ids: list[int] = []
        flags: list[_Flags] = []
        image_spans: list[tuple[int, int]] = []
        for seg in segments:
            piece = list(next(text_ids)) if seg.kind == "text" else self._special_piece(seg, ids, image_spans)
            ids.extend(piece)
            flags.extend([(seg.target, seg.instruction)] * len(piece))
        return ids, flags, image_spans

    def _tokenize_whole(self, segments: list[Segment]) -> tuple[list[int], list[_Flags], list[tuple[int, int]]]:
        """The text between images (EOS written as its token text) tokenised as one string, as
        LLaVA's ``tokenizer_image_token`` does; each token takes the flags of its characters."""
        # Each unit: an image / BOS segment, or a string's parts [(text, target, instruction), ...].
        units: list[Segment | list[tuple[str, bool, bool]]] = []
        for seg in segments:
            if seg.kind in ("image", "bos"):
                units.append(seg)
                continue
            if not units or isinstance(units[-1], Segment):
                units.append([])
            text = seg.text if seg.kind == "text" else self.tokenizer.eos_token
            units[-1].append((text, seg.target, seg.instruction))  # type: ignore[union-attr]
        strings = ["".join(t for t, _, _ in u) for u in units if not isinstance(u, Segment)]
        batch = self.tokenizer(strings, add_special_tokens=False, return_offsets_mapping=True) if strings else None
        encodings = iter(batch.encodings if batch is not None else ())
        ids: list[int] = []
        flags: list[_Flags] = []
        image_spans: list[tuple[int, int]] = []
        for unit in units:
            if isinstance(unit, Segment):
                piece = self._special_piece(unit, ids, image_spans)
                ids.extend(piece)
                flags.extend([(unit.target, unit.instruction)] * len(piece))
            else:
                enc = next(encodings)
                ids.extend(enc.ids)
                flags.extend(_token_flags(unit, enc.offsets))
        return ids, flags, image_spans



def _token_flags(parts: Sequence[tuple[str, bool, bool]], offsets: Sequence[tuple[int, int]]) -> list[_Flags]:
    """(target, instruction) of each token of the string ``"".join(texts of parts)``, from its
    character ``offsets``: a token is target / instruction if any character it covers is. Spaces
    right before a target belong to it (SentencePiece's ``'▁A'``, byte-level BPE's ``'ĠA'``; a
    token of such spaces alone, e.g. the ``'▁'`` before ``'4'``, is target too), as LLaVA's
    masking trains on them. A token without characters (an inserted prefix) takes the flags of
    the character at its position."""
    target: list[bool] = []
    instruction: list[bool] = []
    part_starts: list[int] = []
    for text, is_target, is_instruction in parts:
        part_starts.append(len(target))
        target.extend([is_target] * len(text))
        instruction.extend([is_instruction] * len(text))
    text = "".join(t for t, _, _ in parts)
    n = len(text)
    lead = [False] * n  # spaces just before a target run
    for start, (_, is_target, _) in zip(part_starts, parts):
        j = start - 1
        while is_target and j >= 0 and text[j] == " " and not target[j]:
            lead[j] = True
            j -= 1
    out: list[_Flags] = []
    for start, end in offsets:
        if end <= start:  # no characters (e.g. an inserted '▁'): the character at its position
            start = min(start, n - 1)
            end = start + 1
        start, end = max(start, 0), min(end, n)
        is_target = True in target[start:end] or (end > start and all(lead[start:end]))
        out.append((is_target, True in instruction[start:end]))
    return out


def _merge_text(segments: list[Segment]) -> list[Segment]:
    """Join consecutive text segments with equal flags (fewer tokenisation boundaries)."""
    out: list[Segment] = []
    for seg in segments:
        prev = out[-1] if out else None
        if (
            prev is not None
            and seg.kind == prev.kind == "text"
            and (seg.target, seg.instruction) == (prev.target, prev.instruction)
        ):
            out[-1] = dataclasses.replace(prev, text=prev.text + seg.text)
        else:
            out.append(seg)
    return out


def encode_conversation(
    tokenizer: Any,
    template: str | ConversationTemplate,
    messages: Sequence[Message],
    image_token: str = DEFAULT_IMAGE_TOKEN,
    num_visual_tokens: int = 1,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
    instruction_rule: InstructionSpanRule = "first_user_text",
    visual_tokens_first: bool = False,
) -> EncodedConversation:
    """Tokenise a conversation into ``input_ids``, ``labels`` and ``instruction_mask``.

    ``template.render(messages)`` is tokenised with ``add_special_tokens=False`` (BOS/EOS only
    where the template places them): the text between images as one string, or each segment on its
    own (the template's ``tokenization``); each ``image_token`` in a user message becomes
    ``num_visual_tokens`` copies of its id.
    With ``max_length`` the sample is cut at the end and ``truncated`` is set; a cut that would
    reach image tokens raises :class:`ImageTruncationError` instead. With
    ``add_generation_prompt=True`` the encoding ends with the assistant header; it is then a
    token-exact prefix of the same conversation encoded with its answer.

    ``instruction_rule`` and ``visual_tokens_first`` are :class:`TemplateEncoder`'s.
    For many conversations build one :class:`TemplateEncoder` (validates the tokenizer once).
    """
    encoder = TemplateEncoder(tokenizer, template, image_token, num_visual_tokens, instruction_rule, visual_tokens_first)
    return encoder.encode(messages, max_length=max_length, add_generation_prompt=add_generation_prompt)
