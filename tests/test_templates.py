"""Conversation templates: exact rendering, label masks, instruction masks, truncation, generation prompts.

Expectations are computed independently of the encoder: the full text is written out by hand for
each template, and the target tokens are decoded and compared with the answers + end markers.
"""

from __future__ import annotations

import dataclasses

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlmzoo.data import (
    IGNORE_INDEX,
    ConversationTemplate,
    ImageTruncationError,
    TemplateEncoder,
    available_templates,
    encode_conversation,
    get_template,
)
from vlmzoo.data.templates import VICUNA_SYSTEM

SPECIAL_TOKENS = [
    "<unk>", "<pad>", "<s>", "</s>", "<image>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<bos>", "<start_of_turn>", "<end_of_turn>",
]
CORPUS = [
    VICUNA_SYSTEM, "USER ASSISTANT: system user assistant model",
    "You are a helpful assistant. Be brief.",
    "What is in the picture? A cat on a mat. What colour is it? It is black.",
    "Describe the image. Give a short caption. A dog runs in the park. Hello there, how are you?",
    "one two three four five six seven eight nine ten\nline",
]
N_VIS = 4


def build_word_tokenizer(auto_bos: bool = False, special_tokens: list[str] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer: words, punctuation and single whitespace characters are tokens.

    ``decode`` (without skipping special tokens) reproduces the text exactly. With ``auto_bos`` it
    prepends ``<s>`` whenever special tokens are added, like Llama tokenizers.
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=special_tokens))
    if auto_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_word_tokenizer()


Q1, A1, Q2, A2 = "What is in the picture?", "A cat on a mat.", "What colour is it?", "It is black."
IMG = "<image>" * N_VIS
CONV = [
    {"role": "user", "content": "<image>\n" + Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]

# template -> (messages, full expected text, end-of-answer marker, expected generation header)
CASES = {
    "vicuna_v1": (
        CONV,
        f"<s>{VICUNA_SYSTEM} USER: {IMG}\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>",
        "</s>",
        "ASSISTANT:",  # LLaVA-1.5's generation prompt: the space goes with the answer's first token
    ),
    "llama3": (
        [{"role": "system", "content": "Be brief."}, *CONV],
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{IMG}\n{Q1}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A2}<|eot_id|>",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen2": (
        CONV,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMG}\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
        f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n{A2}<|im_end|>\n",
        "<|im_end|>",
        "<|im_start|>assistant\n",
    ),
    "gemma2": (
        [{"role": "system", "content": "Be brief."}, *CONV],
        f"<bos><start_of_turn>user\nBe brief.\n\n{IMG}\n{Q1}<end_of_turn>\n<start_of_turn>model\n{A1}<end_of_turn>\n"
        f"<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n{A2}<end_of_turn>\n",
        "<end_of_turn>",
        "<start_of_turn>model\n",
    ),
}
# Text trained on before each answer: whole-string tokenisation gives the space after "ASSISTANT:"
# to the answer (this tokenizer makes it a token of its own), as LLaVA-1.5's masking does.
LEAD = {"vicuna_v1": " "}


def target_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive non-ignored labels."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_multi_turn_labels_token_by_token(tok, name):
    messages, full_text, end, _ = CASES[name]
    enc = encode_conversation(tok, name, messages, image_token="<image>", num_visual_tokens=N_VIS)
    assert decode(tok, enc.input_ids) == full_text
    assert len(enc.labels) == len(enc.input_ids) == len(enc.instruction_mask)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == N_VIS and enc.num_images == 1
    for i, (tid, label) in enumerate(zip(enc.input_ids, enc.labels)):
        assert label in (IGNORE_INDEX, tid), f"position {i}: label {label} is neither -100 nor the input id {tid}"
        if tid == image_id:
            assert label == IGNORE_INDEX
    # Exactly the two answers and their end markers are trained on, nothing else.
    lead = LEAD.get(name, "")
    assert [decode(tok, run) for run in target_runs(enc.labels)] == [lead + A1 + end, lead + A2 + end]
    # The instruction mask covers exactly the first user text (no role markers, images or answers).
    masked = [t for t, m in zip(enc.input_ids, enc.instruction_mask) if m]
    assert decode(tok, masked) == "\n" + Q1
    positions = [i for i, m in enumerate(enc.instruction_mask) if m]
    assert positions == list(range(positions[0], positions[-1] + 1))
    # The text encoder's instruction is the question being answered: the last user turn.
    assert enc.query_text == Q2
    assert not enc.truncated


def test_plain_template_drops_user_text(tok):
    messages = [{"role": "user", "content": "Describe the image.\n<image>"}, {"role": "assistant", "content": "A dog runs in the park."}]
    enc = encode_conversation(tok, "plain", messages, num_visual_tokens=N_VIS)
    # LLaVA's plain conversation: "<image>" + caption + "\n", the caption and newline trained on.
    assert decode(tok, enc.input_ids) == f"<s>{IMG}A dog runs in the park.\n"
    assert [decode(tok, r) for r in target_runs(enc.labels)] == ["A dog runs in the park.\n"]
    assert not any(enc.instruction_mask)
    with pytest.raises(ValueError, match="exactly one user message"):
        encode_conversation(tok, "plain", CONV, num_visual_tokens=N_VIS)


@pytest.mark.parametrize("content", ["Describe the image.\n<image>", "<image>\nDescribe the image.", "Describe <image> the image."])
def test_plain_template_query_text_is_the_human_turn(tok, content):
    """Stage 1 (``plain``): the LLM never sees the user's text, but the text encoder's instruction is
    still that turn's text with the image placeholder removed (and stripped), wherever it sits."""
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "A dog runs in the park."}]
    enc = encode_conversation(tok, "plain", messages, num_visual_tokens=N_VIS)
    assert enc.query_text == content.replace("<image>", "").strip()
    assert "Describe" not in decode(tok, enc.input_ids)  # the LLM's tokens still drop it
    image_only = [{"role": "user", "content": "<image>\n"}, {"role": "assistant", "content": "A dog."}]
    assert encode_conversation(tok, "plain", image_only, num_visual_tokens=N_VIS).query_text == ""


@pytest.mark.parametrize("name", sorted(CASES))
def test_generation_prompt_is_prefix_of_training_sample(tok, name):
    messages, _, _, header = CASES[name]
    full = encode_conversation(tok, name, messages, num_visual_tokens=N_VIS)
    prompt = encode_conversation(tok, name, messages[:-1], num_visual_tokens=N_VIS, add_generation_prompt=True)
    assert decode(tok, prompt.input_ids).endswith(header)
    n = len(prompt.input_ids)
    assert full.input_ids[:n] == prompt.input_ids  # token-exact prefix: generation sees what training saw
    assert full.labels[n - 1] == IGNORE_INDEX and full.labels[n] != IGNORE_INDEX  # the answer starts right after
    with pytest.raises(ValueError, match="ends with a user message"):
        encode_conversation(tok, name, messages, num_visual_tokens=N_VIS, add_generation_prompt=True)


def test_truncation_flag_and_image_protection(tok):
    full = encode_conversation(tok, "vicuna_v1", CONV, num_visual_tokens=N_VIS)
    cut = encode_conversation(tok, "vicuna_v1", CONV, num_visual_tokens=N_VIS, max_length=len(full) - 3)
    assert cut.truncated and len(cut) == len(full) - 3
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    exact = encode_conversation(tok, "vicuna_v1", CONV, num_visual_tokens=N_VIS, max_length=len(full))
    assert not exact.truncated and exact.input_ids == full.input_ids
    image_end = max(i for i, t in enumerate(full.input_ids) if t == tok.convert_tokens_to_ids("<image>"))
    with pytest.raises(ImageTruncationError, match=f"max_length={image_end}"):
        encode_conversation(tok, "vicuna_v1", CONV, num_visual_tokens=N_VIS, max_length=image_end)


def test_auto_bos_tokenizer_gets_exactly_one_bos():
    tok = build_word_tokenizer(auto_bos=True)
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id  # the tokenizer would add BOS by itself
    enc = encode_conversation(tok, "vicuna_v1", CONV, num_visual_tokens=N_VIS)
    assert enc.input_ids.count(tok.bos_token_id) == 1 and enc.input_ids[0] == tok.bos_token_id
    # A template without a tokenizer BOS gets none.
    enc = encode_conversation(tok, "qwen2", CONV, num_visual_tokens=N_VIS)
    assert tok.bos_token_id not in enc.input_ids


def test_multiple_images_and_text_only(tok):
    messages = [{"role": "user", "content": "<image> one <image> two"}, {"role": "assistant", "content": "three"}]
    enc = encode_conversation(tok, "qwen2", messages, num_visual_tokens=N_VIS)
    assert enc.num_images == 2 and enc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 2 * N_VIS
    assert decode(tok, [t for t, m in zip(enc.input_ids, enc.instruction_mask) if m]) == " one  two"
    text_only = encode_conversation(tok, "qwen2", [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "one"}])
    assert text_only.num_images == 0 and "<image>" not in decode(tok, text_only.input_ids)


def test_errors_are_clear(tok):
    with pytest.raises(KeyError, match="Known templates: chatml, gemma2, llama3, plain, qwen2, vicuna_v1"):
        get_template("vicuna")
    assert available_templates() == ["chatml", "gemma2", "llama3", "plain", "qwen2", "vicuna_v1"]
    with pytest.raises(ValueError, match="images belong in user messages"):
        encode_conversation(tok, "qwen2", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}])
    with pytest.raises(ValueError, match="'user' was expected"):
        encode_conversation(tok, "qwen2", [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="unknown role 'gpt'"):
        encode_conversation(tok, "qwen2", [{"role": "gpt", "content": "hi"}])
    no_chatml = build_word_tokenizer(special_tokens=[t for t in SPECIAL_TOKENS if t != "<|im_start|>"])
    with pytest.raises(ValueError, match=r"'<\|im_start\|>' is not a single token"):
        TemplateEncoder(no_chatml, "qwen2", num_visual_tokens=N_VIS)
    with pytest.raises(ValueError, match="Image token '<img>' is not a single token"):
        TemplateEncoder(tok, "qwen2", image_token="<img>")


def test_custom_template_instance_round_trips(tok):
    custom = ConversationTemplate(name="mine", user_prefix="user: ", user_suffix="\n", assistant_prefix="assistant: ", assistant_end_eos=True)
    assert ConversationTemplate.from_dict(custom.to_dict()) == custom
    enc = encode_conversation(tok, custom, CONV[:2], num_visual_tokens=N_VIS)
    assert decode(tok, enc.input_ids) == f"user: {IMG}\n{Q1}\nassistant: {A1}</s>"
    assert [decode(tok, r) for r in target_runs(enc.labels)] == [" " + A1 + "</s>"]  # whole-string: the space leads the answer
    by_segment = dataclasses.replace(custom, tokenization="segments")
    enc = encode_conversation(tok, by_segment, CONV[:2], num_visual_tokens=N_VIS)
    assert decode(tok, enc.input_ids) == f"user: {IMG}\n{Q1}\nassistant: {A1}</s>"
    assert [decode(tok, r) for r in target_runs(enc.labels)] == [A1 + "</s>"]


def test_template_spec_replaces_fields_of_a_builtin():
    from vlmzoo.data.templates import get_template

    base = get_template("vicuna_v1")
    spec = get_template({"base": "vicuna_v1", "default_system": None})
    assert spec.default_system is None and base.default_system
    assert spec.name == "vicuna_v1+custom"
    assert {k: v for k, v in spec.to_dict().items() if k not in ("name", "default_system")} == {
        k: v for k, v in base.to_dict().items() if k not in ("name", "default_system")}
    segments = spec.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert base.default_system not in "".join(getattr(s, "text", "") for s in segments)
    with pytest.raises(KeyError, match="base"):
        get_template({"default_system": None})
    with pytest.raises(Exception, match="default_sytem"):
        get_template({"base": "vicuna_v1", "default_sytem": None})


# What "before_reply_role" marks, written out per template: the text before the first answer's
# role name (the header's leading special markers included), with the image left out.
BEFORE_REPLY_ROLE = {
    "vicuna_v1": f"<s>{VICUNA_SYSTEM} USER: \n{Q1} ",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              f"<|start_header_id|>user<|end_header_id|>\n\n\n{Q1}<|eot_id|><|start_header_id|>",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
             f"<|im_start|>user\n\n{Q1}<|im_end|>\n<|im_start|>",
    "gemma2": f"<bos><start_of_turn>user\nBe brief.\n\n\n{Q1}<end_of_turn>\n<start_of_turn>",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_before_reply_role_marks_the_prompt_through_the_headers_opening_marker(tok, name):
    messages, full_text, _, _ = CASES[name]
    image_id = tok.convert_tokens_to_ids("<image>")
    for first in (False, True):
        enc = encode_conversation(tok, name, messages, num_visual_tokens=N_VIS, instruction_rule="before_reply_role",
                                  visual_tokens_first=first)
        plain = encode_conversation(tok, name, messages, num_visual_tokens=N_VIS)
        masked = [t for t, m in zip(enc.input_ids, enc.instruction_mask) if m]
        assert decode(tok, masked) == BEFORE_REPLY_ROLE[name]
        positions = [i for i, m in enumerate(enc.instruction_mask) if m]
        text_positions = [i for i, t in enumerate(enc.input_ids) if t != image_id]
        assert positions == text_positions[: len(positions)]  # one run of text, from the first text token
        assert enc.labels.count(IGNORE_INDEX) == plain.labels.count(IGNORE_INDEX)  # same targets
        if first:  # the image opens the sequence; the text around its placeholder joins
            assert enc.input_ids[:N_VIS] == [image_id] * N_VIS
            assert decode(tok, enc.input_ids[N_VIS:]) == full_text.replace(IMG, "")
        else:
            assert enc.input_ids == plain.input_ids
    prompt = encode_conversation(tok, name, messages[:-3], num_visual_tokens=N_VIS, add_generation_prompt=True,
                                 instruction_rule="before_reply_role")
    assert decode(tok, [t for t, m in zip(prompt.input_ids, prompt.instruction_mask) if m]) == BEFORE_REPLY_ROLE[name]


def test_before_reply_role_with_the_plain_template_marks_bos(tok):
    messages = [{"role": "user", "content": "Describe the image.\n<image>"}, {"role": "assistant", "content": "A dog runs in the park."}]
    enc = encode_conversation(tok, "plain", messages, num_visual_tokens=N_VIS, instruction_rule="before_reply_role")
    assert [t for t, m in zip(enc.input_ids, enc.instruction_mask) if m] == [tok.bos_token_id]
    with pytest.raises(ValueError, match="instruction_rule must be one of"):
        encode_conversation(tok, "plain", messages, instruction_rule="everything")
