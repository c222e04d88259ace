"""What the generation engine is handed and answers with: `Job`, its `GenerationOptions`, the ways a job can
fail, and `TextPieces` (a streaming job's text as it is generated). Shared by the static batches of
`engine` and the running batch of `continuous`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import TextStreamer

from pallava.inference import Completion
from pallava.processing.image import TiledImage
from pallava.processing.processor import Turn


class GenerationTimeout(Exception):
    """A request did not finish within its time limit."""


class EngineUnavailable(Exception):
    """The queue is full or the engine is shutting down."""


class JobCancelled(Exception):
    """The client went away; generation for it stops."""


@dataclass(frozen=True)
class GenerationOptions:
    """How one answer is generated (static batching groups only requests whose options are equal)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(eq=False)
class Job:
    """One request. `on_done` receives a `Completion` or an exception; `on_text` (streaming) each new piece.

    The time limit counts from `started` (when the request arrived), so it covers the checks, image
    decoding and tokenising before the job was queued.
    """

    conversation: list[Turn]
    images: list[TiledImage]
    options: GenerationOptions
    timeout_s: float
    on_done: Callable[[Completion | BaseException], None]
    on_text: Callable[[str], None] | None = None
    started: float = field(default_factory=time.monotonic)  # when the request was read
    cancelled: bool = False
    settled: bool = False

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s

    @property
    def streaming(self) -> bool:
        return self.on_text is not None

    @property
    def pixels(self) -> int:
        """Pixels its images hold while it waits (crops x channels' worth, counted once per pixel)."""
        return sum(image.pixel_values[:, 0].numel() for image in self.images)

    def timed_out(self) -> GenerationTimeout:
        return time_limit_error(self.timeout_s)


def time_limit_error(timeout_s: float) -> GenerationTimeout:
    return GenerationTimeout(f"the request did not finish within the time limit of {timeout_s:g} s")


class TextPieces(TextStreamer):
    """A streaming job's text, emitted as tokens arrive; the pieces join to exactly the plain answer (which is
    stripped): leading whitespace is dropped and trailing whitespace is held back until more text follows.

    `skip_prompt`: the first `put` is the prompt (as `generate` sends it) and is not emitted.
    """

    def __init__(self, emit: Callable[[str], None], tokenizer, skip_prompt: bool = True):
        super().__init__(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
        self.emit, self.begun, self.held = emit, False, ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text = self.held + text
        if not self.begun:
            text = text.lstrip()
        body = text.rstrip()
        self.held = "" if stream_end else text[len(body) :]
        if body:
            self.begun = True
            self.emit(body)
