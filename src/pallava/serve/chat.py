"""Terminal chat about one image: a one-shot answer, or a multi-turn session with streamed tokens."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

from PIL import Image

from pallava.inference import PaLlava
from pallava.processing.processor import Turn
from pallava.processing.tokenizer import IMAGE

HELP = "Ask about the image. Commands: /reset starts a new conversation, /help shows this, /quit leaves."


class ChatSession:
    """A conversation about one image; the image is attached to the first user turn."""

    def __init__(self, assistant: PaLlava, image: Image.Image, **options):
        self.assistant, self.image, self.options = assistant, image, options
        self.history: list[Turn] = []

    def reset(self) -> None:
        self.history = []

    def ask(self, question: str) -> Iterator[str]:
        """Yield the answer piece by piece; the turn joins the history once the answer is complete."""
        if IMAGE in question:
            raise ValueError(f"the text {IMAGE!r} is reserved for the image; rephrase the question")
        content = question if self.history else f"{IMAGE}\n{question}"
        conversation = [*self.history, {"role": "user", "content": content}]
        pieces = []
        for piece in self.assistant.stream(conversation, [self.image], **self.options):
            pieces.append(piece)
            yield piece
        self.history = [*conversation, {"role": "assistant", "content": "".join(pieces).strip()}]


def interactive_chat(
    assistant: PaLlava, image: Image.Image, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, **options
) -> int:
    """Read questions until /quit or end of input; print each answer as it is generated."""
    terminal = stdin is sys.stdin and stdin.isatty()
    if terminal:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    session = ChatSession(assistant, image, **options)
    cols, rows = assistant.tile_grid(image)
    print(f"Image {image.width}x{image.height} px, {cols}x{rows} tiles. {HELP}", file=stdout, flush=True)
    while True:
        line = _read_line("you> ", terminal, stdin, stdout)
        if line is None:  # end of input
            print(file=stdout)
            return 0
        question = line.strip()
        if not question:
            continue
        if question in ("/quit", "/exit"):
            return 0
        if question == "/reset":
            session.reset()
            print("(new conversation)", file=stdout, flush=True)
            continue
        if question.startswith("/"):
            print(HELP, file=stdout, flush=True)
            continue
        print("assistant> ", end="", file=stdout, flush=True)
        try:
            for piece in session.ask(question):
                print(piece, end="", file=stdout, flush=True)
        except ValueError as error:  # e.g. the conversation outgrew the context: keep the session alive
            print(f"\nerror: {error} (type /reset to start over)", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)


def _read_line(prompt: str, terminal: bool, stdin: TextIO, stdout: TextIO) -> str | None:
    if terminal:
        try:
            return input(prompt)
        except EOFError:
            return None
    print(prompt, end="", file=stdout, flush=True)
    return stdin.readline() or None
