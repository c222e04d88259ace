"""Batched generation for concurrent requests: one worker thread owns the model.

Requests wait in a queue. With `batching="continuous"` (the default) the worker runs one batch whose rows
join and leave between decoding steps (`ContinuousBatch`): a request joins at the next step, a finished,
cancelled or timed-out one leaves at once, and rows with different generation options and streaming rows
share the batch. With `batching="static"` the worker takes the oldest request plus those with the same
options, answers them with one batched `generate`, and every one waits for the longest; streaming requests
run alone. Either way answers are identical to answering each request alone (greedy; left padding).

When the worker is idle, the oldest request waits a short window (default 20 ms) for others to start with
it, but only while other requests are being admitted (`expect` / `unexpect`, around their checks and image
decoding): a lone request starts at once. Each request carries a deadline that bounds its wait in the queue
and its generation time.

Memory is bounded: a job's images arrive already tiled (at most `1 + max_tiles` crops each, never the
decoded image), their pixels count against `max_queued_pixels` until the job is answered, and a job whose
client left is dropped from the queue or from the running batch (a static batch stops once every client of
the batch has left). On a CPU the decoding steps' thread count is measured per batch size (`DecodeThreads`).
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from pallava.allocator import release_memory
from pallava.inference import Completion, PaLlava
from pallava.models.image_features import ImageFeatureCache
from pallava.processing.image import TiledImage
from pallava.processing.processor import CROP_FEATURES
from pallava.serve.continuous import ContinuousBatch
from pallava.serve.decode_threads import DecodeThreads
from pallava.serve.jobs import (
    EngineUnavailable,
    GenerationOptions,
    GenerationTimeout,
    Job,
    JobCancelled,
    TextPieces,
    time_limit_error,
)

__all__ = [
    "BATCHING",
    "BatchingEngine",
    "DecodeThreads",
    "EngineUnavailable",
    "GenerationOptions",
    "GenerationTimeout",
    "Job",
    "JobCancelled",
    "pretiled",
    "time_limit_error",
]

BATCHING = ("continuous", "static")

log = logging.getLogger(__name__)


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


class _BatchWatch(BaseStreamer):
    """Sees every generation step of a static batch: aborts once all the batch's clients left, streams a
    streaming job's text (`TextPieces`), and lets `DecodeThreads` time the decoding steps."""

    def __init__(self, jobs: list[Job], tokenizer, threads: DecodeThreads | None = None):
        self.jobs, self.threads, self.prompt_seen = jobs, threads, False
        self.text = TextPieces(jobs[0].on_text, tokenizer) if jobs[0].streaming else None

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


class BatchingEngine:
    """A worker thread that answers queued `Job`s in batches of up to `max_batch_size`.

    `batching`: "continuous" (jobs join and leave the running batch between decoding steps) or "static"
    (one `generate` per batch of jobs with equal options; streaming jobs alone).

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
        batching: str = "continuous",
    ):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
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
        self.batching = batching
        continuous = batching == "continuous"
        self._batch = ContinuousBatch(self.assistant, self.decode_threads) if continuous else None
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
        # The worker's time at the model (seconds): whatever else it spends is waiting for requests. In
        # continuous batching split into prefill (joining) and decoding steps, with the rows each step served.
        self.model_s = self.prefill_s = self.decode_s = 0.0
        self.decode_steps = self.decode_rows = 0

    # --- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._closed = False
        loop = self._loop_static if self._batch is None else self._loop_continuous
        self._thread = threading.Thread(target=loop, name="pallava-generation", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, fail what is still queued, and wait for the running batch to finish."""
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
        """The client left: drop the job if it waits. A running job leaves the continuous batch at the next
        step; a static batch stops once all its clients left."""
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
    def stats(self) -> dict[str, float]:
        """Counts so far. `batches`: groups of jobs started together (one `generate`, or one prefill joining
        the continuous batch); `largest_batch`: the most jobs generated together; `model_s`: the worker's
        seconds at the model (the rest of its time it waited for requests), in continuous batching also
        split into `prefill_s` and `decode_s` over `decode_steps` steps that served `decode_rows` rows."""
        with self._cond:
            return {
                "queued": len(self._pending),
                "running": len(self._running),
                "completed": self.completed,
                "cancelled": self.cancelled,
                "batches": self.batches,
                "largest_batch": self.largest_batch,
                "model_s": round(self.model_s, 4),
                "prefill_s": round(self.prefill_s, 4),
                "decode_s": round(self.decode_s, 4),
                "decode_steps": self.decode_steps,
                "decode_rows": self.decode_rows,
                "image_pixels_held": self._held_pixels,
                "image_cache_hits": self.image_cache.hits if self.image_cache else 0,
                "image_cache_misses": self.image_cache.misses if self.image_cache else 0,
            }

    # --- worker: static batches ----------------------------------------------------------------------
    def _loop_static(self) -> None:
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
            started = time.perf_counter()
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running = []
                    self.model_s += time.perf_counter() - started

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

    def _in_time(self, jobs: list[Job], now: float) -> list[Job]:
        """`jobs` whose time limit has not passed; the others are answered with the timeout."""
        live = []
        for job in jobs:
            if now >= job.deadline:
                self._settle(job, job.timed_out())
            else:
                live.append(job)
        return live

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = self._in_time(batch, now)
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

    # --- worker: continuous batching -----------------------------------------------------------------
    def _loop_continuous(self) -> None:
        batch = self._batch
        while True:
            with self._cond:
                idle = not self._pending and not batch.rows
            if idle:
                release_memory()  # hand what the last burst freed back to the system
            with self._cond:
                while not self._pending and not batch.rows and not self._closed:
                    self._cond.wait()
                if self._closed and not batch.rows:
                    return
                joining = self._take_joining(len(batch))
                self._running = [*batch.jobs, *joining]
            started = time.perf_counter()
            try:
                self._join(batch, joining)
                joined = time.perf_counter()
                self._settle_finished(batch)  # a first token may end an answer, and joining takes time
                rows = len(batch)
                if rows:
                    stepped = time.perf_counter()
                    batch.step()
                    decoded = time.perf_counter()
                    self._settle_finished(batch)
                with self._cond:
                    self.model_s += time.perf_counter() - started
                    self.prefill_s += joined - started
                    if rows:
                        self.decode_s += decoded - stepped
                        self.decode_steps += 1
                        self.decode_rows += rows
            except Exception as error:  # reported to each running client; the worker keeps serving
                log.exception("generation failed")
                self._settle_all([*batch.clear(), *joining], error)  # those already settled are skipped
                self._settle_finished(batch)

    def _take_joining(self, running: int) -> list[Job]:
        """Under the lock: queued jobs for the batch's free rows. An idle worker first waits up to the window
        for requests being admitted, so that they start together; a running batch takes what is queued."""
        if self._closed:
            return []
        room = self.max_batch_size - running
        end = time.monotonic() + self.window_s
        while not running and len(self._pending) < room and self._admitting and not self._closed:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return [self._pending.popleft() for _ in range(min(room, len(self._pending)))]

    def _join(self, batch: ContinuousBatch, jobs: list[Job]) -> None:
        # `cancelled` is set from the clients' threads: read once per job, so that one cancelled between
        # two reads is neither left unsettled nor joined.
        wanted = []
        for job in jobs:
            if job.cancelled:  # its client left after it was taken from the queue
                self._settle(job, JobCancelled("the client disconnected"))
            else:
                wanted.append(job)
        live = self._in_time(wanted, time.monotonic())
        if not live:
            return
        try:
            batch.join(live)
        except Exception as error:
            if len(live) > 1:  # one request's bad input must not fail the others: each joins on its own
                for job in live:
                    self._join(batch, [job])
                return
            if not isinstance(error, ValueError):
                log.exception("generation failed")
            self._settle_all(live, error)
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))

    def _settle_finished(self, batch: ContinuousBatch) -> None:
        finished = batch.finish(time.monotonic())
        if not batch.rows and self.decode_threads is not None:
            self.decode_threads.done()  # every thread back for the next prefill
        with self._cond:
            self._running = batch.jobs
        for job, result in finished:
            self._settle(job, result)

    def _settle_all(self, jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            self._settle(job, error)

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
