"""The chat session (vlmzoo/chat.py) and the terminal chat (scripts/chat.py, vlmzoo/chat_cli.py).

Models are tiny, saved with their processors (word-level tokenizer, qwen2 template) and loaded back
from their folders as a user's are; large random weights make answers several tokens long and
dependent on the input. Every answer is checked against ``model.generate`` on the same conversation,
built here by hand with the processor.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_templates import build_word_tokenizer
from tiny import TINY_LLMS, tiny_clip_vision_spec
from vlmzoo import VLMConfig, VLMForConditionalGeneration
from vlmzoo.chat import (
    ChatSession,
    GenerationSettings,
    ImageFileError,
    ModelFolderError,
    load_model_folder,
    open_image,
)
from vlmzoo.chat_cli import main as chat_main
from vlmzoo.processing import VLMProcessor

REPO = Path(__file__).resolve().parent.parent
MAX_NEW = 6
Q1, Q2, Q3 = "What colour is it?", "What is in the picture?", "Describe the image."
# igva reads the instruction (its allocator weights the tower's layers per question and returns the
# weights as extras); ta_llava's learned prefix has no image-grid tokens.
STRATEGIES = {
    "llava": {},
    "igva": dict(strategy_config={"instruction_source": "llm_embeddings", "num_groups": 3, "allocator_heads": 4,
                                  "allocator_ffn_size": 48}),
    "ta_llava": dict(strategy_config={"num_prefix_tokens": 4, "period": 2}),
}


def build(strategy: str, seed: int = 0) -> tuple[VLMForConditionalGeneration, VLMProcessor]:
    tok = build_word_tokenizer()
    llm = {**TINY_LLMS["llama"], "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "num_hidden_layers": 3}
    config = VLMConfig(text_config=llm, vision_config=tiny_clip_vision_spec(), strategy=strategy,
                       image_token_id=tok.convert_tokens_to_ids("<image>"), **STRATEGIES[strategy])
    torch.manual_seed(seed)
    model = VLMForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights: peaked attention, answers that depend on the input
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("vision_tower."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, VLMProcessor.for_model(model, tok, template="qwen2")


def save_models_and_images(root: Path, strategies: tuple[str, ...] = ("llava", "igva")) -> dict[str, Path]:
    """strategy -> saved model folder; "image", "image2" -> PNGs; "bad_image" -> a text file named .png."""
    out = {}
    for strategy in strategies:
        model, processor = build(strategy)
        out[strategy] = root / strategy
        model.save_pretrained(out[strategy])
        processor.save_pretrained(out[strategy])
    for name, seed, size in (("image", 0, (32, 48)), ("image2", 1, (40, 40))):
        out[name] = root / f"{name}.png"
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(out[name])
    out["bad_image"] = root / "notes.png"
    out["bad_image"].write_text("this is not a picture\n")
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_models_and_images(tmp_path_factory.mktemp("chat"))


class Reference:
    """``model.generate`` on conversations built by hand, per saved folder (loaded with from_pretrained)."""

    def __init__(self) -> None:
        self._loaded: dict[Path, tuple] = {}

    def __call__(self, folder: Path, turns: list[str], image: Path | None, max_new_tokens: int = MAX_NEW,
                 **generate_kwargs) -> list[str]:
        """Greedy (unless told otherwise) answers to ``turns`` asked one after another, each seeing the previous answers."""
        if folder not in self._loaded:
            self._loaded[folder] = (VLMForConditionalGeneration.from_pretrained(folder).eval(),
                                    VLMProcessor.from_pretrained(folder))
        model, processor = self._loaded[folder]
        picture = Image.open(image).convert("RGB") if image is not None else None
        messages, answers = [], []
        for turn in turns:
            content = f"<image>\n{turn}" if picture is not None and not messages else turn
            messages.append({"role": "user", "content": content})
            batch = processor(messages, images=picture, add_generation_prompt=True)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                          eos_token_id=processor.tokenizer.eos_token_id)
            kwargs.update(generate_kwargs)
            with torch.no_grad():
                out = model.generate(**batch, **kwargs)
            answer = processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            answers.append(answer)
            messages.append({"role": "assistant", "content": answer})
        return answers


@pytest.fixture(scope="module")
def reference():
    return Reference()


def run_chat(argv: list[str], lines: list[str]) -> tuple[int, str, str]:
    """``scripts/chat.py`` in this process, fed ``lines`` on stdin -> (exit code, stdout, stderr)."""
    stdin, stdout, stderr = io.StringIO("".join(f"{line}\n" for line in lines)), io.StringIO(), io.StringIO()
    code = chat_main(argv, stdin=stdin, stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def answers_in(transcript: str) -> list[str]:
    """The assistant's answers in a chat transcript, in order (stripped, line ends normalised)."""
    text = transcript.replace("\r\n", "\n")
    return [a.strip() for a in re.findall(r"assistant: (.*?)\n(?=user: |$)", text, flags=re.S)]


# ---- the session ---------------------------------------------------------------------------------------
def test_answers_stream_token_by_token_and_equal_generate(saved, reference):
    model, processor = load_model_folder(saved["llava"])
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=MAX_NEW), image=open_image(saved["image"]))
    pieces = list(session.stream(Q1))
    expected = reference(saved["llava"], [Q1], saved["image"])
    assert session.last.text == expected[0] and "".join(pieces).strip() == expected[0]
    assert len(expected[0]) > 0 and len(pieces) >= 2  # streamed in several pieces, not at the end
    assert session.last.num_tokens == MAX_NEW or session.last.new_tokens[-1] == processor.tokenizer.eos_token_id
    assert session.messages == [{"role": "user", "content": Q1}, {"role": "assistant", "content": expected[0]}]
    assert session.last.seconds > 0 and 0 < session.last.first_token_seconds <= session.last.seconds

    follow_up = session.ask(Q2).text  # same conversation
    assert follow_up == reference(saved["llava"], [Q1, Q2], saved["image"])[1]


def test_a_stopped_answer_leaves_the_conversation_as_it_was(saved):
    model, processor = load_model_folder(saved["llava"])
    session = ChatSession(model, processor, GenerationSettings(max_new_tokens=MAX_NEW), image=open_image(saved["image"]))
    session.ask(Q1)
    before = [dict(m) for m in session.messages]
    stream = session.stream(Q2)
    next(stream)
    stream.close()  # what Ctrl-C or a closed browser tab does
    assert session.messages == before


def test_generation_settings_map_to_generate_kwargs():
    assert GenerationSettings().generate_kwargs() == {"max_new_tokens": 256, "do_sample": False}
    greedy = GenerationSettings(temperature=0.5, top_k=3).generate_kwargs()
    assert "temperature" not in greedy and "top_k" not in greedy  # sampling fields only apply when sampling
    sampled = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    assert sampled.generate_kwargs() == {"max_new_tokens": 4, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                         "repetition_penalty": 1.1}


def test_load_model_folder_refuses_what_is_not_a_model(saved, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    llm_only = tmp_path / "llm"  # e.g. the tiny world's LLM folder: a checkpoint, but not a vlmzoo model
    llm_only.mkdir()
    (llm_only / "config.json").write_text(json.dumps({"model_type": "llama"}))
    no_processor = tmp_path / "no_processor"
    build("llava")[0].save_pretrained(no_processor)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases = {tmp_path / "missing": "no such folder", saved["image"]: "not a folder", empty: "no config.json",
             llm_only: "'llama' model", no_processor: "saved without its processor", broken: "unreadable config.json"}
    for path, reason in cases.items():
        with pytest.raises(ModelFolderError) as info:
            load_model_folder(path)
        assert str(info.value).startswith(f"{path}: ") and reason in str(info.value) and "\n" not in str(info.value)


def test_open_image_names_the_bad_file(saved, tmp_path):
    assert open_image(saved["image"]).size == (48, 32)
    for path, reason in ((tmp_path / "nope.png", "no such file"), (saved["bad_image"], "not a readable image"),
                         (tmp_path, "is a folder")):
        with pytest.raises(ImageFileError, match=re.escape(f"{path}: {reason}")):
            open_image(path)


# ---- the terminal chat ---------------------------------------------------------------------------------
def test_cli_text_only_conversation_through_piped_stdin(saved, reference):
    """``python scripts/chat.py`` as a process, no image: two turns on piped stdin, then end of input."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "scripts/chat.py", "--model", str(saved["igva"]), "--max-new-tokens", str(MAX_NEW)],
                          input=f"{Q1}\n{Q2}\n", capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Chatting with igva (16 visual tokens)" in proc.stdout and "text-only" in proc.stdout
    assert answers_in(proc.stdout) == reference(saved["igva"], [Q1, Q2], None)
    assert "error" not in proc.stderr.lower() and "Traceback" not in proc.stderr


def read_until(fd: int, pattern: str, timeout: float = 120.0) -> str:
    """Read the pseudo-terminal until ``pattern`` (a regex) matches what was read since the call."""
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
            if re.search(pattern, text, flags=re.S):
                return text
    raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal showed:\n{out.decode(errors='replace')}")


def test_cli_in_a_terminal_asks_follows_up_switches_image_resets_and_quits(saved, reference):
    """``python scripts/chat.py --image ...`` in a pseudo-terminal, typed at like a person would."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TERM": "dumb",
           "DS_ACCELERATOR": "cpu"}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "scripts/chat.py", "--model", str(saved["llava"]), "--image", str(saved["image"]),
                             "--max-new-tokens", str(MAX_NEW)], stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env)
    os.close(slave)
    try:
        screen = read_until(master, r"user: $")
        assert f"Image: {saved['image']}" in screen

        def ask(line: str) -> str:
            os.write(master, f"{line}\n".encode())
            return read_until(master, r"assistant: .*\n.*user: $")

        first, follow_up = answers_in(ask(Q1))[-1], answers_in(ask(Q2))[-1]
        assert [first, follow_up] == reference(saved["llava"], [Q1, Q2], saved["image"])

        os.write(master, f"/image {saved['image2']}\n".encode())
        assert "new conversation" in read_until(master, r"new conversation.*user: $")
        assert answers_in(ask(Q1))[-1] == reference(saved["llava"], [Q1], saved["image2"])[0]

        os.write(master, b"/reset\n")
        read_until(master, r"\(new conversation\).*user: $")
        assert answers_in(ask(Q3))[-1] == reference(saved["llava"], [Q3], saved["image2"])[0]  # image kept, history gone

        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_cli_missing_image_is_one_line_and_the_conversation_goes_on(saved, reference, tmp_path):
    missing = tmp_path / "nope.png"
    code, out, err = run_chat(["--model", str(saved["llava"]), "--image", str(saved["image"]), "--max-new-tokens", str(MAX_NEW)],
                              [Q1, f"/image {missing}", Q2, "/quit"])
    assert code == 0
    assert err == f"error: {missing}: no such file\n"
    # Nothing lost: the follow-up still sees the first image and the first turn.
    assert answers_in(out) == reference(saved["llava"], [Q1, Q2], saved["image"])


def test_cli_unreadable_image_is_one_line_and_the_conversation_goes_on(saved, reference, tmp_path):
    code, out, err = run_chat(["--model", str(saved["llava"]), "--image", str(saved["image"]), "--max-new-tokens", str(MAX_NEW)],
                              [Q1, f"/image {saved['bad_image']}", f"/image {tmp_path}", "/image", Q2])
    assert code == 0  # end of input leaves normally
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert lines[0].startswith(f"error: {saved['bad_image']}: not a readable image")
    assert lines[1] == f"error: {tmp_path}: is a folder, not an image file" and lines[2] == "error: usage: /image PATH"
    assert answers_in(out) == reference(saved["llava"], [Q1, Q2], saved["image"])


def test_cli_bad_image_at_start_goes_on_without_one(saved, reference):
    code, out, err = run_chat(["--model", str(saved["llava"]), "--image", str(saved["bad_image"]), "--max-new-tokens",
                               str(MAX_NEW)], [Q1])
    assert code == 0 and len(err.splitlines()) == 1 and "not a readable image" in err and "text-only" in out
    assert answers_in(out) == reference(saved["llava"], [Q1], None)


def test_cli_folder_that_is_not_a_model_is_one_line_and_the_session_goes_on(saved, reference, tmp_path):
    not_a_model = tmp_path / "outputs"
    not_a_model.mkdir()
    code, out, err = run_chat(["--model", str(saved["llava"]), "--image", str(saved["image"]), "--max-new-tokens", str(MAX_NEW)],
                              [Q1, f"/model {not_a_model}", f"/model {tmp_path / 'missing'}", Q2])
    assert code == 0
    assert err.splitlines() == [
        f"error: {not_a_model}: not a saved vlmzoo model (no config.json; give e.g. <run>/<stage>/final)",
        f"error: {tmp_path / 'missing'}: no such folder (give a saved model, e.g. <run>/<stage>/final)",
    ]
    assert answers_in(out) == reference(saved["llava"], [Q1, Q2], saved["image"])

    # At start there is no session to go on with: one line and exit code 2, no traceback.
    code, out, err = run_chat(["--model", str(not_a_model)], [Q1])
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {not_a_model}: not a saved vlmzoo model")


def test_cli_model_switch_keeps_the_conversation(saved, reference):
    code, out, err = run_chat(["--model", str(saved["llava"]), "--image", str(saved["image"]), "--max-new-tokens", str(MAX_NEW)],
                              [Q1, f"/model {saved['igva']}", Q2])
    assert code == 0 and err == "" and "now igva (16 visual tokens)" in out
    first, second = answers_in(out)
    assert first == reference(saved["llava"], [Q1], saved["image"])[0]
    # igva continues the conversation llava started: generate on [Q1, llava's answer, Q2].
    model, processor = load_model_folder(saved["igva"])
    messages = [{"role": "user", "content": f"<image>\n{Q1}"}, {"role": "assistant", "content": first},
                {"role": "user", "content": Q2}]
    batch = processor(messages, images=Image.open(saved["image"]).convert("RGB"), add_generation_prompt=True)
    out_ids = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)
    assert second == processor.decode(out_ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_cli_unknown_command_and_empty_lines(saved, reference):
    code, out, err = run_chat(["--model", str(saved["llava"]), "--max-new-tokens", str(MAX_NEW)], ["", "/frobnicate", "  ", Q1, "/help"])
    assert code == 0 and err.startswith("error: unknown command /frobnicate (commands: /image PATH") and err.count("\n") == 1
    assert answers_in(out) == reference(saved["llava"], [Q1], None)
    assert out.count("Commands: /image PATH") == 2  # the banner and /help


def test_cli_sampling_flags_reach_generate(saved, reference):
    argv = ["--model", str(saved["llava"]), "--image", str(saved["image"]), "--max-new-tokens", str(MAX_NEW),
            "--do-sample", "--temperature", "1.5", "--top-k", "20", "--seed", "3"]
    code, out, _ = run_chat(argv, [Q1])
    assert code == 0
    reference(saved["llava"], [Q1], saved["image"])  # loaded before seeding (loading draws random numbers)
    torch.manual_seed(3)
    sampled = reference(saved["llava"], [Q1], saved["image"], do_sample=True, temperature=1.5, top_k=20)
    assert answers_in(out) == sampled
    assert run_chat(argv, [Q1])[1] == out  # the seed makes it reproducible
