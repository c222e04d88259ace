"""Batched generation for concurrent requests: one worker thread owns the model.

Requests wait in a queue; the worker takes the oldest, waits a short window (default 20 ms) for others
with the same generation options, and answers them together with one batched `generate` (left padding
keeps every answer identical to answering it alone). Streaming requests run one at a time through the
same worker, so the model is never used by two threads at once. Each request carries a deadline that
bounds its wait in the queue and its generation time.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image
from transformers import TextStreamer

from pallava.inference import Completion, PaLlava
from pallava.processing.processor import Turn

log = logging.getLogger(__name__)


class GenerationTimeout(Exception):
    """A request did not finish within its time limit."""


class EngineUnavailable(Exception):
    """The queue is full or the engine is shutting down."""


class JobCancelled(Exception):
    """The client went away; generation for it stops."""


@dataclass(frozen=True)
class GenerationOptions:
    """Options that must be equal for requests to share a batch."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(eq=False)
class Job:
    """One request. `on_done` receives a `Completion` or an exception; `on_text` (streaming) each new
    piece."""

    conversation: list[Turn]
    images: list[Image.Image]
    options: GenerationOptions
    timeout_s: float
    on_done: Callable[[Completion | BaseException], None]
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    @property
    def streaming(self) -> bool:
        return self.on_text is not None

    def cancel(self) -> None:
        self.cancelled = True

    def timed_out(self) -> GenerationTimeout:
        return GenerationTimeout(f"generation did not finish within the time limit of {self.timeout_s:g} s")


class _JobStreamer(TextStreamer):
    """Hands decoded text to a streaming job as words complete; aborts generation if the client left."""

    def __init__(self, tokenizer, job: Job):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job

    def put(self, value) -> None:
        if self.job.cancelled:
            raise JobCancelled("the client disconnected")
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text and self.job.on_text is not None:
            self.job.on_text(text)


class BatchingEngine:
    """A worker thread that answers queued `Job`s in batches of up to `max_batch_size`."""

    def __init__(
        self, assistant: PaLlava, max_batch_size: int = 8, window_s: float = 0.02, max_queue: int = 256
    ):
        if max_batch_size < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and window_s >= 0")
        self.assistant = assistant
        self.max_batch_size, self.window_s, self.max_queue = max_batch_size, window_s, max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = self.completed = self.largest_batch = 0

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pallava-generation", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, fail what is still queued, and wait for the running batch."""
        with self._cond:
            self._closed = True
            left, self._pending = list(self._pending), collections.deque()
            self._cond.notify_all()
        for job in left:
            _settle(job, EngineUnavailable("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed or self._thread is None:
                raise EngineUnavailable("the generation engine is not running")
            if len(self._pending) >= self.max_queue:
                raise EngineUnavailable(f"the server is busy ({self.max_queue} requests queued); retry later")
            self._pending.append(job)
            self._cond.notify_all()

    @property
    def stats(self) -> dict[str, int]:
        with self._cond:
            queued = len(self._pending)
        return {
            "queued": queued,
            "completed": self.completed,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
        }

    # --- worker -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take_batch()
            self._run(batch)

    def _take_batch(self) -> list[Job]:
        """Under the lock: the oldest job plus compatible ones that arrive within the window."""
        first = self._pending[0]
        if first.streaming:
            return [self._pending.popleft()]
        end = time.monotonic() + self.window_s
        while True:
            batch = [j for j in self._pending if not j.streaming and j.options == first.options]
            remaining = end - time.monotonic()
            if len(batch) >= self.max_batch_size or remaining <= 0 or self._closed:
                break
            self._cond.wait(remaining)
        batch = batch[: self.max_batch_size]
        taken = set(map(id, batch))
        self._pending = collections.deque(j for j in self._pending if id(j) not in taken)
        return batch

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if job.cancelled:
                continue
            if now >= job.deadline:
                _settle(job, job.timed_out())
            else:
                live.append(job)
        if not live:
            return
        options = live[0].options
        streamer = _JobStreamer(self.assistant.processor.tokenizer, live[0]) if live[0].streaming else None
        try:
            completions = self.assistant.complete(
                [job.conversation for job in live],
                [job.images for job in live],
                max_new_tokens=options.max_new_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                max_time=min(job.deadline for job in live) - now,
                streamer=streamer,
            )
        except Exception as error:  # reported to each client; the worker keeps serving
            if not isinstance(error, (JobCancelled, ValueError)):
                log.exception("generation failed")
            for job in live:
                _settle(job, error)
            return
        self.batches += 1
        self.completed += len(live)
        self.largest_batch = max(self.largest_batch, len(live))
        for job, completion in zip(live, completions, strict=True):
            _settle(job, job.timed_out() if completion.finish_reason == "time" else completion)


def _settle(job: Job, result: Completion | BaseException) -> None:
    try:
        job.on_done(result)
    except Exception:  # a closed event loop must not take the worker down
        log.exception("could not deliver a result")
