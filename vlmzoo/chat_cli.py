"""``scripts/chat.py``: a terminal chat with a saved model folder (any strategy).

Type a question and the answer streams in token by token; follow-up questions continue the same
conversation. Commands::

    /image PATH   use another image (starts a new conversation)
    /model DIR    talk to another saved model (the conversation and image are kept)
    /reset        forget the conversation, keep the image
    /help         list the commands
    /quit         leave (also /exit, or end of input)

Bad input (a missing or unreadable image, a folder that is not a model, an unknown command) prints
one ``error: ...`` line on stderr and the session goes on unchanged. Ctrl-C while an answer streams
stops that answer (the conversation is left as before the question); at the prompt it leaves.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import transformers

from .chat import ChatSession, GenerationSettings, ImageFileError, ModelFolderError, load_model_folder, open_image

USER_PROMPT = "user: "
ASSISTANT_PREFIX = "assistant: "
COMMANDS = "/image PATH, /model DIR, /reset, /help, /quit"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Chat with a saved vlmzoo model in the terminal; answers stream token by token.",
        epilog=f"Commands in the chat: {COMMANDS}.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="a saved model + processor (e.g. <run>/<stage>/final)")
    parser.add_argument("--image", metavar="PATH", help="image to talk about (default: none, a text-only conversation)")
    parser.add_argument("--template", help="conversation template other than the saved processor's")
    gen = parser.add_argument_group("generation (as transformers' generate; greedy unless --do-sample)")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, help="sampling temperature")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens with this probability")
    gen.add_argument("--repetition-penalty", type=float, help="penalty on repeated tokens (1.0 = none)")
    gen.add_argument("--seed", type=int, help="seed for sampling (reproducible answers)")
    return parser


class ChatREPL:
    """The read-answer loop over ``stdin``/``stdout`` (errors on ``stderr``)."""

    def __init__(self, session: ChatSession, model_dir: str, template: str | None,
                 stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.session, self.model_dir, self.template = session, model_dir, template
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    # ---- io ---------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        self.stdout.flush()
        self.stderr.write(f"error: {text}\n")
        self.stderr.flush()

    def read(self) -> str | None:
        """One line from the user, or ``None`` at the end of input."""
        if self.stdin is sys.stdin and self.stdout is sys.stdout and sys.stdin.isatty():
            try:
                return input(USER_PROMPT)  # line editing in a terminal
            except EOFError:
                return None
        self.stdout.write(USER_PROMPT)
        self.stdout.flush()
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def describe(self) -> str:
        s = self.session
        return f"{s.strategy} ({s.num_visual_tokens} visual tokens) from {self.model_dir}"

    # ---- loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:
                self.say("")
                return 0
            if line is None:
                self.say("")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.answer(line)

    def answer(self, question: str) -> None:
        self.stdout.write(ASSISTANT_PREFIX)
        self.stdout.flush()
        started = False
        stream = self.session.stream(question)
        try:
            for piece in stream:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                self.stdout.write(piece)
                self.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            self.say("")
            self.error("answer interrupted; the conversation is as before the question")
            return
        except (ValueError, RuntimeError) as exc:  # e.g. a prompt longer than the model takes
            self.say("")
            self.error(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            return
        self.say("")

    def command(self, line: str) -> bool:
        """Run one ``/command``; ``False`` to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(f"Commands: {COMMANDS}. Anything else is a question.")
        elif name == "/reset":
            self.session.reset()
            self.say("(new conversation)")
        elif name == "/image":
            if not arg:
                self.error("usage: /image PATH")
                return True
            try:
                image = open_image(arg)
            except ImageFileError as exc:
                self.error(str(exc))
                return True
            self.session.set_image(image)
            self.say(f"(image {arg}; new conversation)")
        elif name == "/model":
            if not arg:
                self.error("usage: /model DIR")
                return True
            try:
                model, processor = load_model_folder(arg, self.template)
            except ModelFolderError as exc:
                self.error(str(exc))
                return True
            self.session.model, self.session.processor, self.model_dir = model, processor, arg
            self.say(f"(now {self.describe()}; conversation kept)")
        else:
            self.error(f"unknown command {name} (commands: {COMMANDS})")
        return True


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Parse ``argv``, load the model folder and chat over the given streams (default: the process's)."""
    args = build_parser().parse_args(argv)
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, processor = load_model_folder(args.model, args.template)
    except ModelFolderError as exc:
        stderr.write(f"error: {exc}\n")
        return 2
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    session = ChatSession(model, processor, settings)
    repl = ChatREPL(session, args.model, args.template, stdin, stdout, stderr)
    repl.say(f"Chatting with {repl.describe()}. Commands: {COMMANDS}.")
    if args.image:
        try:
            session.set_image(open_image(args.image))
        except ImageFileError as exc:
            repl.error(f"{exc}; starting without an image (/image PATH to add one)")
    repl.say(f"Image: {args.image}" if session.image is not None else "No image: a text-only conversation.")
    return repl.run()
