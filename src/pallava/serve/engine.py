"""Batched generation for concurrent requests: one worker thread owns the model.

Requests wait in a queue; the worker takes the oldest, waits a short window (default 20 ms) for others
with the same generation options, and answers them together with one batched `generate` (left padding
keeps every answer identical to answering it alone). The window is only waited while other requests are
being admitted (`expect` / `unexpect`, around their checks and image decoding): a lone request starts at
once. Streaming requests run one at a time through the same worker, so the model is never used by two
threads at once. Each request carries a deadline that bounds its wait in the queue and its generation
time.

Memory is bounded: a job's images arrive already tiled (at most `1 + max_tiles` crops each, never the
decoded image), their pixels count against `max_queued_pixels` until the job is answered, and a job whose
client left is dropped from the queue, or stops its batch's generation once every client of the batch
has left.

On a CPU the decoding steps of small models are bound by overhead, not arithmetic: each step's small matrix
products pay for waking torch's other threads, and one thread can be faster than all cores (the tiny model,
batches of 8 in the worker thread: 64 tokens in 0.19 s with one thread, 0.23-0.25 s with two). `DecodeThreads`
measures it per batch size and keeps the faster count for decoding; the prompt's prefill and the vision tower
always get all threads.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from pallava.allocator import release_memory
from pallava.inference import Completion, PaLlava
from pallava.processing.image import TiledImage
from pallava.processing.processor import CROP_FEATURES, Turn
from pallava.serve.image_features import ImageFeatureCache
from pallava.threads import ThreadGovernor

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


class _PretiledImages:
    """The worker's image processor: images were tiled at admission, so a batch only stacks them; with a
    `cache`, it gives their crop features instead of their pixels, from the cache where it can."""

    def __init__(self, image_processor, cache: ImageFeatureCache | None = None):
        self._inner, self.cache = image_processor, cache

    def __call__(self, images: Sequence[TiledImage]) -> dict:
        stacked = self._inner.stack(images)
        if self.cache is None:
            return stacked
        return {CROP_FEATURES: self.cache.crop_features(images, stacked), "tile_mask": stacked["tile_mask"]}

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def pretiled(assistant: PaLlava, cache: ImageFeatureCache | None = None) -> PaLlava:
    """The same model and processor, taking images already cut by `processor.image_processor.tile`."""
    processor = copy.copy(assistant.processor)
    processor.image_processor = _PretiledImages(assistant.processor.image_processor, cache)
    return PaLlava(assistant.model, processor)


class DecodeThreads:
    """Torch's intra-op threads for the decoding steps, chosen per batch size by a `ThreadGovernor` from the
    steps' own times (all threads against one); prefill runs with all threads.

    Call `prefill(batch_size)` before the prompt is encoded, `step()` after each generated token and
    `done()` at the end. `set_threads` and `clock` are torch's setter and the wall clock (tests replace them).
    """

    def __init__(
        self,
        threads: int,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if threads < 1:
            raise ValueError(f"DecodeThreads: threads must be at least 1, got {threads}")
        self.threads, self._set_threads, self._clock = threads, set_threads, clock
        self.governors: dict[int, ThreadGovernor] = {}
        self._governor: ThreadGovernor | None = None
        self._last: float | None = None

    def prefill(self, batch_size: int) -> None:
        self._set_threads(self.threads)
        if self.threads > 1 and batch_size not in self.governors:
            # Built with a no-op setter: the governor's choice applies from the first decoding step on.
            self.governors[batch_size] = ThreadGovernor([self.threads, 1], set_threads=lambda _: None)
        self._governor, self._last = self.governors.get(batch_size), None

    def step(self) -> None:
        """A token was generated: time the step just finished and set the count for the next one."""
        if self._governor is None:
            return
        now = self._clock()
        if self._last is not None:
            self._governor.step_done(now - self._last)
        self._last = now  # the first token ends the prefill, which is not timed
        self._set_threads(self._governor.threads)

    def done(self) -> None:
        self._governor = None
        self._set_threads(self.threads)


class _BatchWatch(BaseStreamer):
    """Sees every generation step: aborts once all the batch's clients left, streams a streaming job's
    text, and lets `DecodeThreads` time the decoding steps.

    The streamed pieces join to exactly the plain answer (which is stripped): leading whitespace is dropped
    and trailing whitespace is held back until more text follows it.
    """

    def __init__(self, jobs: list[Job], tokenizer, threads: DecodeThreads | None = None):
        self.jobs, self.threads, self.prompt_seen = jobs, threads, False
        self.text = _TextPieces(jobs[0].on_text, tokenizer) if jobs[0].streaming else None

    def put(self, value) -> None:
        if all(job.cancelled for job in self.jobs):
            raise JobCancelled("the client disconnected")
        if self.threads is not None:
            if self.prompt_seen:
                self.threads.step()
            else:
                self.threads.prefill(len(self.jobs))
        self.prompt_seen = True
        if self.text is not None:
            self.text.put(value)

    def end(self) -> None:
        if self.text is not None:
            self.text.end()


class _TextPieces(TextStreamer):
    def __init__(self, emit: Callable[[str], None], tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
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


class BatchingEngine:
    """A worker thread that answers queued `Job`s in batches of up to `max_batch_size`.

    A job is refused (`EngineUnavailable`) when `max_queue` jobs wait, or when its image pixels would take the
    pixels held by waiting and running jobs over `max_queued_pixels` (a job alone is always taken).
    `generation_threads`: "auto" lets `DecodeThreads` choose the decoding steps' thread count on a CPU; None
    leaves torch's setting for everything. `image_cache`: how many images' vision features to keep for
    requests that send them again (a chat's later turns; `ImageFeatureCache`), 0 for none.
    """

    def __init__(
        self,
        assistant: PaLlava,
        max_batch_size: int = 8,
        window_s: float = 0.02,
        max_queue: int = 256,
        max_queued_pixels: int | None = None,
        generation_threads: str | None = "auto",
        image_cache: int = 0,
    ):
        if max_batch_size < 1 or max_queue < 1 or window_s < 0 or image_cache < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, window_s and image_cache >= 0")
        if generation_threads not in ("auto", None):
            raise ValueError(f"generation_threads must be 'auto' or None, got {generation_threads!r}")
        on_cpu = assistant.model.device.type == "cpu"
        self.decode_threads = (
            DecodeThreads(torch.get_num_threads()) if generation_threads and on_cpu else None
        )
        self.image_cache = ImageFeatureCache(assistant.model, image_cache) if image_cache else None
        self.assistant = pretiled(assistant, self.image_cache)
        self.max_batch_size, self.window_s, self.max_queue = max_batch_size, window_s, max_queue
        self.max_queued_pixels = max_queued_pixels
        self._pending: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._held_pixels = 0
        self._admitting = 0  # requests between `expect` and `unexpect`: a forming batch waits for them
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = self.completed = self.cancelled = self.largest_batch = 0

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
            self._settle(job, EngineUnavailable("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed or self._thread is None:
                raise EngineUnavailable("the generation engine is not running")
            if len(self._pending) >= self.max_queue:
                raise EngineUnavailable(f"the server is busy ({self.max_queue} requests queued); retry later")
            budget = self.max_queued_pixels
            if budget is not None and self._held_pixels and self._held_pixels + job.pixels > budget:
                raise EngineUnavailable(
                    f"the server is busy (queued images hold {self._held_pixels:,} of {budget:,} pixels); "
                    "retry later"
                )
            self._held_pixels += job.pixels
            self._pending.append(job)
            self._cond.notify_all()

    def expect(self) -> None:
        """A request is on its way (being checked, its images decoded): a batch being formed waits for it,
        up to the window."""
        with self._cond:
            self._admitting += 1

    def unexpect(self) -> None:
        """That request was submitted or failed. Nobody is woken: a forming batch sees the submitted job
        (`submit` wakes it) or, after a failure, waits out its window."""
        with self._cond:
            self._admitting -= 1

    def cancel(self, job: Job) -> None:
        """The client left: drop the job if it waits; a running batch stops once all its clients left."""
        with self._cond:
            if job.settled or job.cancelled:
                return
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._held_pixels -= job.pixels
                job.settled = True
                self.cancelled += 1

    @property
    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "queued": len(self._pending),
                "running": len(self._running),
                "completed": self.completed,
                "cancelled": self.cancelled,
                "batches": self.batches,
                "largest_batch": self.largest_batch,
                "image_pixels_held": self._held_pixels,
                "image_cache_hits": self.image_cache.hits if self.image_cache else 0,
                "image_cache_misses": self.image_cache.misses if self.image_cache else 0,
            }

    # --- worker -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                burst_over = not self._pending
            if burst_over:
                release_memory()  # hand what the last burst freed back to the system
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._running = self._take_batch()
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running = []

    def _take_batch(self) -> list[Job]:
        """Under the lock: the oldest job plus compatible ones that arrive within the window, which closes
        early once no other request is being admitted."""
        first = self._pending[0]
        if first.streaming:
            return [self._pending.popleft()]
        end = time.monotonic() + self.window_s
        while True:
            batch = [j for j in self._pending if not j.streaming and j.options == first.options]
            remaining = end - time.monotonic()
            if len(batch) >= self.max_batch_size or remaining <= 0 or self._closed or not self._admitting:
                break
            self._cond.wait(remaining)
            if first not in self._pending:  # cancelled while the window was open
                return []
        batch = batch[: self.max_batch_size]
        taken = set(map(id, batch))
        self._pending = collections.deque(j for j in self._pending if id(j) not in taken)
        return batch

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if now >= job.deadline:
                self._settle(job, job.timed_out())
            else:
                live.append(job)
        if not live:
            return
        options = live[0].options
        watch = _BatchWatch(live, self.assistant.processor.tokenizer, self.decode_threads)
        try:
            completions = self.assistant.complete(
                [job.conversation for job in live],
                [job.images for job in live],
                max_new_tokens=options.max_new_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                max_time=min(job.deadline for job in live) - now,
                streamer=watch,
            )
        except Exception as error:  # reported to each client; the worker keeps serving
            if not isinstance(error, (JobCancelled, ValueError)):
                log.exception("generation failed")
            for job in live:
                self._settle(job, error)
            return
        finally:
            if self.decode_threads is not None:
                self.decode_threads.done()
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(live))
        for job, completion in zip(live, completions, strict=True):
            self._settle(job, job.timed_out() if completion.finish_reason == "time" else completion)

    def _settle(self, job: Job, result: Completion | BaseException) -> None:
        with self._cond:
            if job.settled:
                return
            job.settled = True
            self._held_pixels -= job.pixels
            if job.cancelled:
                self.cancelled += 1
            elif isinstance(result, Completion):
                self.completed += 1
        try:
            job.on_done(result)
        except Exception:  # a closed event loop must not take the worker down
            log.exception("could not deliver a result")
