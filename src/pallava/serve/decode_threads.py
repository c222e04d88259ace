"""`DecodeThreads`: torch's intra-op thread count for the server's decoding steps, measured per batch size.

On a CPU the decoding steps of small models are bound by overhead, not arithmetic: each step's small matrix
products pay for waking torch's other threads, and one thread can be faster than all cores (the tiny model,
batches of 8 in the worker thread: 64 tokens in 0.19 s with one thread, 0.23-0.25 s with two). The prompt's
prefill and the vision tower always get all threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pallava.threads import ThreadGovernor


class DecodeThreads:
    """Torch's intra-op threads for the decoding steps, chosen per batch size by a `ThreadGovernor` from the
    steps' own times (all threads against one); prefill runs with all threads.

    A static batch calls `prefill(batch_size)` before the prompt is encoded, `step()` after each generated
    token and `done()` at the end. The continuous batch, whose size changes between steps, brackets each
    decoding step with `step_begins(batch_size)` / `step_ends()` and calls `done()` before each prefill.
    `set_threads` and `clock` are torch's setter and the wall clock (tests replace them).
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

    def _governor_for(self, batch_size: int) -> ThreadGovernor | None:
        if self.threads > 1 and batch_size not in self.governors:
            # Built with a no-op setter: the governor's choice applies from the next decoding step on.
            self.governors[batch_size] = ThreadGovernor([self.threads, 1], set_threads=lambda _: None)
        return self.governors.get(batch_size)

    def prefill(self, batch_size: int) -> None:
        self._set_threads(self.threads)
        self._governor, self._last = self._governor_for(batch_size), None

    def step(self) -> None:
        """A token was generated: time the step just finished and set the count for the next one."""
        if self._governor is None:
            return
        now = self._clock()
        if self._last is not None:
            self._governor.step_done(now - self._last)
        self._last = now  # the first token ends the prefill, which is not timed
        self._set_threads(self._governor.threads)

    def step_begins(self, batch_size: int) -> None:
        """A decoding step of `batch_size` rows starts: the count its batch size's governor chose."""
        self._governor = self._governor_for(batch_size)
        if self._governor is not None:
            self._set_threads(self._governor.threads)
            self._last = self._clock()

    def step_ends(self) -> None:
        """That step's tokens are chosen: its time goes to its batch size's governor."""
        if self._governor is not None and self._last is not None:
            self._governor.step_done(self._clock() - self._last)
        self._governor, self._last = None, None

    def done(self) -> None:
        self._governor = None
        self._set_threads(self.threads)
