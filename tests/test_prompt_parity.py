"""Prompt parity: vlmzoo's token ids and labels are those of the reference pipelines.

* ``vicuna_v1`` and ``plain`` against LLaVA-1.5's preprocessing, re-written below from its
  documented behaviour (``conversation.py``'s ``conv_vicuna_v1`` / ``conv_llava_plain`` strings,
  ``mm_utils.tokenizer_image_token``'s whole-string tokenisation split at ``<image>``,
  ``train.py``'s ``preprocess_multimodal`` and its round-by-round label masking in
  ``preprocess_v1`` / ``preprocess_plain``), with a Llama tokenizer;
* ``llama3``, ``qwen2`` and ``gemma2`` against ``apply_chat_template`` with each model's own chat
  template string (as shipped with Meta-Llama-3-8B-Instruct, Qwen2-7B-Instruct, gemma-2-2b-it);
* :func:`~vlmzoo.data.check_supervision` ("tokenization mismatch") accepts all of these and refuses
  deliberately broken templates, also when a data set is built.

No hub access: the Llama tokenizer is transformers' own ``LlamaTokenizer`` (SentencePiece-style
``'▁'`` Metaspace pre-tokenizer, byte fallback, BOS added) over a BPE vocabulary trained here with
``tokenizers``; the chat-template tokenizers are byte-level BPEs trained here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from vlmzoo.data import (
    IGNORE_INDEX,
    ConversationTemplate,
    LlavaDataError,
    LlavaJsonDataset,
    TemplateEncoder,
    TokenizationMismatchError,
    check_supervision,
    encode_conversation,
    get_template,
)
from vlmzoo.processing import VLMProcessor
from vlmzoo.strategy import InputSpec

N_VIS = 3
IMAGE = "<image>"
LLAVA_SYSTEM = (  # conv_vicuna_v1.system
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
    LLAVA_SYSTEM,
    "USER: What is in the picture? ASSISTANT: A cat on a mat. USER: What colour is it? ASSISTANT: It is black.",
    "Describe the image. Give a short caption. A dog runs in the park. There are 42 apples and 7 pears.",
    "How many dogs? 3 dogs. Answer with a single word. Yes. No. You are a helpful assistant. Be brief.",
    "system user assistant model",
] * 3


# ---- tokenizers ----------------------------------------------------------------------------------
def llama_tokenizer(legacy: bool) -> LlamaTokenizer:
    """A Llama tokenizer over a BPE vocabulary of CORPUS (no newline piece: '\\n' is '<0x0A>').

    ``legacy=True``: every text piece after a special token starts with '▁' (SentencePiece's own
    behaviour, which LLaVA's round arithmetic assumes); ``legacy=False``: only the first one does.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=legacy, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return tok


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non_legacy"])
def llama_tok(request) -> LlamaTokenizer:
    return llama_tokenizer(request.param)


@pytest.fixture(scope="module")
def legacy_tok() -> LlamaTokenizer:
    return llama_tokenizer(True)


def test_the_llama_tokenizer_behaves_like_llamas(legacy_tok):
    """The '▁' handling the parity tests rely on: BOS added, a dummy '▁' prefix, byte-fallback
    newlines, and a trailing space as a token of its own (the lone '▁' of "ASSISTANT: ")."""
    tokens = legacy_tok.convert_ids_to_tokens(legacy_tok("\nWhat ASSISTANT: ").input_ids)
    assert tokens[:4] == ["<s>", "▁", "<0x0A>", "What"] and tokens[-1] == "▁"
    assert legacy_tok.convert_ids_to_tokens(legacy_tok("a</s>USER").input_ids)[-2:] == ["</s>", "▁USER"]
    assert llama_tokenizer(False).convert_ids_to_tokens(llama_tokenizer(False)("a</s>USER").input_ids)[-2:] == ["</s>", "USER"]


# ---- LLaVA-1.5's preprocessing, from its documented behaviour ------------------------------------
def tokenizer_image_token(prompt: str, tok, image_id: int) -> list[int]:
    """Each piece between '<image>'s tokenised on its own (with BOS, kept only for the first
    piece), the pieces joined by the image token (here N_VIS copies, as vlmzoo expands it)."""
    pieces = [tok(piece).input_ids for piece in prompt.split(IMAGE)]
    offset = 1 if pieces[0] and pieces[0][0] == tok.bos_token_id else 0
    ids = pieces[0][:1] if offset else []
    for i, piece in enumerate(pieces):
        if i:
            ids += [image_id] * N_VIS
        ids += piece[offset:]
    return ids


def preprocess_multimodal(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A turn with the image becomes '<image>\\n' + its text stripped (the whole value stripped)."""
    out = []
    for m in messages:
        value = m["content"]
        if IMAGE in value:
            value = (IMAGE + "\n" + value.replace(IMAGE, "").strip()).strip()
        out.append({"role": m["role"], "content": value})
    return out


def vicuna_v1_prompt(messages: Sequence[dict[str, str]], generation: bool = False) -> str:
    """``conv_vicuna_v1.get_prompt()``: system + ' ', then 'ROLE: message' + sep / sep2 alternately
    (' ', '</s>'); an empty last assistant message renders 'ASSISTANT:'."""
    seps = (" ", "</s>")
    text = LLAVA_SYSTEM + seps[0]
    for i, m in enumerate(messages):
        text += ("USER" if m["role"] == "user" else "ASSISTANT") + ": " + m["content"] + seps[i % 2]
    return text + ("ASSISTANT:" if generation else "")


def vicuna_v1_labels(prompt: str, tok, image_id: int) -> tuple[list[int], list[int], bool]:
    """``preprocess_v1``: -> (input_ids, labels, mismatch). Split at '</s>' into rounds; in each,
    mask the tokens of 'USER: ... ASSISTANT: ' less 2 (its BOS and the trailing '▁'); a round
    spans its length with BOS, the BOS standing for the '</s>' the split removed."""
    ids = tokenizer_image_token(prompt, tok, image_id)
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou, tok, image_id))
        instruction_len = len(tokenizer_image_token(parts[0], tok, image_id)) - 2
        if i != 0 and not tok.legacy:  # LLaVA's correction for non-legacy tokenizers (tokenizers >= 0.14)
            round_len -= 1
            instruction_len -= 1
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    return ids, labels, cur != len(ids)


def plain_prompt_and_labels(messages: Sequence[dict[str, str]], tok, image_id: int) -> tuple[list[int], list[int]]:
    """``preprocess_plain``: '<image>' + caption + '\\n', the tokens of '<image>' masked."""
    ids = tokenizer_image_token(IMAGE + messages[1]["content"] + "\n", tok, image_id)
    n_masked = len(tokenizer_image_token(IMAGE, tok, image_id))
    return ids, [IGNORE_INDEX] * n_masked + ids[n_masked:]


# ---- records -------------------------------------------------------------------------------------
def chat(*turns: str) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


RECORDS = {
    "multi_turn": chat("<image>\nWhat is in the picture?", "A cat on a mat.", "How many dogs?", "42 dogs.", "Yes?", "No."),
    "image_first": chat("<image>\nDescribe the image.", "A dog runs in the park."),
    "image_last": chat("What colour is it?\n<image>", "It is black.", "Answer with a single word.", "Yes."),
    "image_mid": chat("How many <image> apples?", "7 pears."),
    "text_only": chat("How many dogs?", "3 dogs.", "Be brief.", "No."),
}


def image_id(tok) -> int:
    return tok.convert_tokens_to_ids(IMAGE)


# ---- vicuna_v1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("record", sorted(RECORDS))
def test_vicuna_v1_ids_and_generation_prompts_equal_llava(llama_tok, record):
    """Training ids, and the generation prompt of every answer, equal tokenizer_image_token of
    LLaVA's prompt string (the record as written: the image wherever the user put it)."""
    messages = RECORDS[record]
    enc = encode_conversation(llama_tok, "vicuna_v1", messages, num_visual_tokens=N_VIS)
    assert enc.input_ids == tokenizer_image_token(vicuna_v1_prompt(messages), llama_tok, image_id(llama_tok))
    for k in range(1, len(messages), 2):
        prompt = encode_conversation(llama_tok, "vicuna_v1", messages[:k], num_visual_tokens=N_VIS, add_generation_prompt=True)
        expected = tokenizer_image_token(vicuna_v1_prompt(messages[:k], generation=True), llama_tok, image_id(llama_tok))
        assert prompt.input_ids == expected
        assert llama_tok.convert_ids_to_tokens(prompt.input_ids)[-1] == "▁ASSISTANT:"  # not '▁ASSISTANT:', '▁'
    check_supervision(TemplateEncoder(llama_tok, "vicuna_v1", num_visual_tokens=N_VIS), messages)


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_vicuna_v1_labels_equal_llava(legacy_tok, record):
    """Labels equal preprocess_v1's round-by-round masking, token for token: LLaVA trains on
    '▁A' after '▁ASSISTANT:' and on the lone '▁' before a number ('▁', '42')."""
    messages = RECORDS[record]
    enc = encode_conversation(legacy_tok, "vicuna_v1", messages, num_visual_tokens=N_VIS)
    ids, labels, mismatch = vicuna_v1_labels(vicuna_v1_prompt(messages), legacy_tok, image_id(legacy_tok))
    assert not mismatch and enc.input_ids == ids
    assert enc.labels == labels
    trained = legacy_tok.convert_ids_to_tokens([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert trained.count("</s>") == len(messages) // 2


# ---- plain ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("record", ["image_first", "image_last", "image_mid"])
def test_plain_ids_and_labels_equal_llava(llama_tok, record):
    messages = RECORDS[record][:2]
    enc = encode_conversation(llama_tok, "plain", messages, num_visual_tokens=N_VIS)
    ids, labels = plain_prompt_and_labels(messages, llama_tok, image_id(llama_tok))
    assert (enc.input_ids, enc.labels) == (ids, labels)
    assert llama_tok.convert_ids_to_tokens(ids)[-1] == "<0x0A>"  # the caption ends with the newline, no EOS
    prompt = encode_conversation(llama_tok, "plain", messages[:1], num_visual_tokens=N_VIS, add_generation_prompt=True)
    assert prompt.input_ids == tokenizer_image_token(IMAGE, llama_tok, image_id(llama_tok))
    check_supervision(TemplateEncoder(llama_tok, "plain", num_visual_tokens=N_VIS), messages)


# ---- through a data set: LLaVA's preprocess_multimodal included -----------------------------------
def write_llava_json(path: Path, records: dict[str, list[dict[str, str]]]) -> Path:
    rows = []
    for rid, messages in records.items():
        row = {"id": rid, "conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in messages]}
        if any(IMAGE in m["content"] for m in messages):
            row["image"] = f"{rid}.png"
        rows.append(row)
    path.write_text(json.dumps(rows))
    return path


def dataset_rows(tmp_path: Path, tok, template, records) -> dict[str, dict]:
    processor = VLMProcessor(tok, InputSpec(num_visual_tokens=N_VIS), template=template)
    tmp_path.mkdir(parents=True, exist_ok=True)
    ds = LlavaJsonDataset(write_llava_json(tmp_path / "data.json", records), processor, check_images="none",
                          cache_dir=str(tmp_path / "hf"))
    return {row["id"]: row for row in ds.data}


def test_llava_json_data_equal_llava_preprocessing(tmp_path, legacy_tok):
    """A LLaVA JSON file gives LLaVA-1.5's training samples: the image moved to the front of its
    turn ('<image>\\n' + text), then vicuna_v1 (stage 2) or plain (stage 1) as LLaVA encodes them."""
    img = image_id(legacy_tok)
    rows = dataset_rows(tmp_path / "v1", legacy_tok, "vicuna_v1", RECORDS)
    for rid, messages in RECORDS.items():
        ids, labels, mismatch = vicuna_v1_labels(vicuna_v1_prompt(preprocess_multimodal(messages)), legacy_tok, img)
        assert not mismatch and (rows[rid]["input_ids"], rows[rid]["labels"]) == (ids, labels), rid
    assert rows["image_last"]["input_ids"] != encode_conversation(legacy_tok, "vicuna_v1", RECORDS["image_last"], num_visual_tokens=N_VIS).input_ids

    captions = {rid: m[:2] for rid, m in RECORDS.items() if rid.startswith("image")}
    rows = dataset_rows(tmp_path / "plain", legacy_tok, "plain", captions)
    for rid, messages in captions.items():
        assert (rows[rid]["input_ids"], rows[rid]["labels"]) == plain_prompt_and_labels(messages, legacy_tok, img), rid


# ---- the other templates vs the tokenizer's own chat template ------------------------------------
CHAT_TEMPLATES = {
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>",
    ),
    # Qwen/Qwen2-7B-Instruct
    "qwen2": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% endif %}",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with its own system prompt): the chatml template
    # with that system prompt as its default
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
        "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>",
    ),
    # google/gemma-2-2b-it
    "gemma2": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
        "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
        "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
        "role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\n'}}{% endif %}",
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
    ),
}


def chat_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style pre-tokenizer) with the model's markers and chat template."""
    template, specials, bos, eos = CHAT_TEMPLATES[name]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[*specials, IMAGE], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                   extra_special_tokens=[IMAGE], chat_template=template)


# Gemma-2's chat template refuses a system message (vlmzoo folds it into the first user turn).
# vlmzoo template (name or spec) of each chat template above.
OUR_TEMPLATE = {"llama3": "llama3", "qwen2": "qwen2", "gemma2": "gemma2",
                "chatml": {"base": "chatml", "default_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"}}


@pytest.mark.parametrize("name, system", [("llama3", None), ("llama3", "Be brief."), ("qwen2", None),
                                          ("qwen2", "Be brief."), ("chatml", None), ("chatml", "Be brief."),
                                          ("gemma2", None)])
@pytest.mark.parametrize("record", ["multi_turn", "image_last", "text_only"])
def test_chat_templates_agree_with_the_tokenizers_own(name, system, record):
    """Ids (one image token per image, as the chat template writes it) and generation prompts
    equal ``apply_chat_template``'s."""
    tok = chat_tokenizer(name)
    ours = OUR_TEMPLATE[name]
    messages = ([{"role": "system", "content": system}] if system else []) + RECORDS[record]
    enc = encode_conversation(tok, ours, messages)
    assert enc.input_ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    first_answer = 2 if system else 1
    for k in range(first_answer, len(messages), 2):
        prompt = encode_conversation(tok, ours, messages[:k], add_generation_prompt=True)
        assert prompt.input_ids == tok.apply_chat_template(messages[:k], tokenize=True, return_dict=False, add_generation_prompt=True)
    check_supervision(TemplateEncoder(tok, ours), messages)


@pytest.mark.parametrize("name", ["vicuna_v1", "plain", "llama3", "qwen2", "gemma2"])
def test_a_continued_answer_is_the_sample_up_to_its_end_of_turn(legacy_tok, name):
    """``continue_final_message`` (as in ``apply_chat_template``): the training sample without the
    answer's end of turn, and the generation prompt's continuation ('▁', '42', ... under vicuna_v1)."""
    tok = legacy_tok if name in ("vicuna_v1", "plain") else chat_tokenizer(name)
    messages = RECORDS["image_mid"]
    sample = encode_conversation(tok, name, messages, num_visual_tokens=N_VIS)
    continued = TemplateEncoder(tok, name, num_visual_tokens=N_VIS).encode(messages, continue_final_message=True)
    prompt = encode_conversation(tok, name, messages[:1], num_visual_tokens=N_VIS, add_generation_prompt=True)
    end = {"vicuna_v1": ["</s>"], "plain": ["<0x0A>"], "llama3": ["<|eot_id|>"], "qwen2": ["<|im_end|>", "Ċ"],
           "gemma2": ["<end_of_turn>", "Ċ"]}[name]
    assert tok.convert_ids_to_tokens(sample.input_ids[len(continued):]) == end
    assert continued.input_ids == sample.input_ids[: len(continued)]
    answer = continued.input_ids[len(prompt):]
    assert continued.input_ids[: len(prompt)] == prompt.input_ids
    assert tok.decode(answer).strip() == "7 pears."
    if name != "plain":  # (plain refuses a lone user message anyway)
        with pytest.raises(ValueError, match="continue_final_message=True needs a conversation that ends with an assistant"):
            TemplateEncoder(tok, name, num_visual_tokens=N_VIS).encode(messages[:1], continue_final_message=True)


# ---- the tokenization-mismatch check -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainsOnTheHeader(ConversationTemplate):
    """Broken: the assistant header is trained on as if it were part of the answer."""

    def render(self, messages, *args, **kwargs):
        return [dataclasses.replace(s, target=True) if s.text == self.assistant_prefix else s
                for s in super().render(messages, *args, **kwargs)]


@dataclasses.dataclass(frozen=True)
class PromptsWithTheSpace(ConversationTemplate):
    """Broken the way the issue reports: the generation prompt keeps the space after 'ASSISTANT:'
    ('▁ASSISTANT:', '▁') while training, tokenising the whole string, has '▁ASSISTANT:', '▁A'."""

    def render(self, messages, image_token=IMAGE, add_generation_prompt=False, **options):
        segments = super().render(messages, image_token, add_generation_prompt, **options)
        if add_generation_prompt:
            segments[-1] = dataclasses.replace(segments[-1], text=self.assistant_prefix)
        return segments


def broken(cls: type[ConversationTemplate]) -> ConversationTemplate:
    return cls(**{**get_template("vicuna_v1").to_dict(), "name": cls.__name__})


def test_check_refuses_broken_templates(legacy_tok):
    messages = RECORDS["multi_turn"]
    with pytest.raises(TokenizationMismatchError, match=r"answer 0 trains on 'ASSISTANT: A cat on a mat\.</s>'"):
        check_supervision(TemplateEncoder(legacy_tok, broken(TrainsOnTheHeader), num_visual_tokens=N_VIS), messages)
    with pytest.raises(TokenizationMismatchError, match=r"generation prompt of answer 0 ends .*'▁ASSISTANT:', '▁'\] but training has .*'▁ASSISTANT:', '▁A'\]"):
        check_supervision(TemplateEncoder(legacy_tok, broken(PromptsWithTheSpace), num_visual_tokens=N_VIS), messages)
    # Segment-by-segment tokenisation is consistent in itself (its prompt is a prefix of its samples).
    segments = TemplateEncoder(legacy_tok, {"base": "vicuna_v1", "tokenization": "segments"}, num_visual_tokens=N_VIS)
    check_supervision(segments, messages)


def test_a_data_set_with_a_broken_template_is_refused_naming_the_record(tmp_path, legacy_tok):
    records = {"cap-0": RECORDS["image_first"], "conv-1": RECORDS["multi_turn"]}
    with pytest.raises(LlavaDataError, match=r"data\.json: record 'cap-0' \(#0\): tokenization mismatch: answer 0 trains on"):
        dataset_rows(tmp_path / "a", legacy_tok, broken(TrainsOnTheHeader), records)
    # Also under on_error="skip": the template is at fault, not the record.
    processor = VLMProcessor(legacy_tok, InputSpec(num_visual_tokens=N_VIS), template=broken(PromptsWithTheSpace))
    with pytest.raises(LlavaDataError, match=r"record 'cap-0' \(#0\): tokenization mismatch: the generation prompt"):
        LlavaJsonDataset(write_llava_json(tmp_path / "b.json", records), processor, check_images="none",
                         on_error="skip", cache_dir=str(tmp_path / "hf"))
    ds = LlavaJsonDataset(write_llava_json(tmp_path / "c.json", records), processor, check_images="none",
                          check_samples=0, cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 2  # the check can be switched off


# ---- clear errors --------------------------------------------------------------------------------
class _NoOffsets:
    """A tokenizer that cannot report token offsets (a slow tokenizer)."""

    is_fast = False

    def __init__(self, tok) -> None:
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)


def test_whole_string_tokenisation_needs_a_fast_tokenizer(legacy_tok):
    with pytest.raises(ValueError, match=r"'vicuna_v1' tokenises whole strings.*'tokenization': 'segments'"):
        TemplateEncoder(_NoOffsets(legacy_tok), "vicuna_v1")
    enc = TemplateEncoder(_NoOffsets(legacy_tok), {"base": "vicuna_v1", "tokenization": "segments"}).encode(RECORDS["text_only"])
    assert enc.input_ids[0] == legacy_tok.bos_token_id
    with pytest.raises(ValueError, match="tokenization of template 'x' must be 'whole' or 'segments'"):
        ConversationTemplate(name="x", assistant_end_eos=True, tokenization="words")


def test_an_end_of_turn_without_tokens_is_reported(caplog):
    """A tokenizer without whitespace tokens loses plain's newline: say so, and how to end with EOS."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, IMAGE: 3, "a": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  extra_special_tokens=[IMAGE])
    with caplog.at_level(logging.WARNING, logger="vlmzoo.data.templates"):
        TemplateEncoder(tok, "plain")
    assert "ends answers with '\\n', which this tokenizer encodes to no token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlmzoo.data.templates"):
        enc = TemplateEncoder(tok, {"base": "plain", "assistant_end": "", "assistant_end_eos": True})
    assert not caplog.text
    assert enc.encode(chat(IMAGE, "a")).input_ids == [1, 3, 4, 2]
