"""A word-level tokenizer for the tiny world, saved as a transformers fast tokenizer.

Built offline with ``tokenizers`` (``WordLevel`` model, ``Whitespace`` pre-tokenizer: words
and runs of punctuation become tokens, case is kept) from the world's own phrases plus the
``vicuna_v1`` role names and LLaVA's v0 system prompt (the world's runs use ``vicuna_v1`` without
a system prompt; LLaVA-1.5's, which says "user", is not covered). The decoder re-attaches
``.``, ``,``, ``?`` to the previous word, so the world's text (written as "red circle at b3,
blue square at a1.") round-trips exactly; template text such as "USER:" decodes as "USER :".
Whitespace (including the newline after ``<image>``) is not a token.

Two saved flavours share one vocabulary:

* ``llm``: prepends ``<s>`` (like a Llama tokenizer); used with the tiny LLM.
* ``clip``: ``<s> ... </s>`` - CLIP's text tower pools at the first ``</s>``.
"""

from __future__ import annotations

import os
from typing import Iterable, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE)

#: LLaVA's v0 system prompt and vicuna_v1's role names (kept in the vocabulary).
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLES: tuple[str, str] = ("USER", "ASSISTANT")


def vicuna_prompt(turns: list[tuple[str, str | None]], system: str | None = VICUNA_SYSTEM) -> str:
    """LLaVA vicuna_v1 text: ``"{system} USER: q ASSISTANT: a</s>USER: ..."``.

    ``turns`` are (human, gpt) pairs; a ``None`` answer ends the text with ``"ASSISTANT:"``
    (a generation prompt).
    """
    text = f"{system} " if system else ""
    for human, gpt in turns:
        text += f"{ROLES[0]}: {human} {ROLES[1]}:"
        if gpt is not None:
            text += f" {gpt}{EOS}"
    return text


def template_texts() -> list[str]:
    """Text of the conversation templates (their words join the vocabulary)."""
    return [VICUNA_SYSTEM, f"{ROLES[0]}: {ROLES[1]}:"]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Whitespace()


def collect_vocabulary(texts: Iterable[str]) -> list[str]:
    """Sorted distinct words of ``texts`` (as split by the tokenizer's own pre-tokenizer)."""
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    words.difference_update(SPECIAL_TOKENS)
    return sorted(words)


def build_backend(words: list[str], flavour: Literal["llm", "clip"]) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    single = f"{BOS} $A" if flavour == "llm" else f"{BOS} $A {EOS}"
    pair = f"{BOS} $A $B" if flavour == "llm" else f"{BOS} $A {EOS} $B {EOS}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer(texts: Iterable[str], flavour: Literal["llm", "clip"] = "llm",
                    model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the words of ``texts`` plus the template words."""
    words = collect_vocabulary(list(texts) + template_texts())
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(words, flavour),
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[IMAGE],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
    )


def save_tokenizers(texts: Iterable[str], llm_dir: str, clip_dir: str | None = None,
                    clip_max_length: int = 77) -> PreTrainedTokenizerFast:
    """Build and ``save_pretrained`` the LLM tokenizer (and the CLIP flavour if asked)."""
    texts = list(texts)
    tok = build_tokenizer(texts, "llm")
    os.makedirs(llm_dir, exist_ok=True)
    tok.save_pretrained(llm_dir)
    if clip_dir is not None:
        clip_tok = build_tokenizer(texts, "clip", model_max_length=clip_max_length)
        if clip_tok.get_vocab() != tok.get_vocab():
            raise RuntimeError("CLIP and LLM tokenizers ended up with different vocabularies.")
        clip_tok.save_pretrained(clip_dir)
    return tok
