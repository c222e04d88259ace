"""`ThreadGovernor`: torch's intra-op thread count chosen from measured step times, for the trainers
(`pallava.train.threads`) and the server's decoding steps (`pallava.serve.engine`).

Imports nothing else from pallava, so every layer may use it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch


class ThreadGovernor:
    """Chooses torch's intra-op thread count from the training steps' own times, and checks it again.

    On an idle machine several threads that spin while they wait are fastest; when another job takes a
    core, a thread waiting for its descheduled partner wastes the step and one thread is fastest. No
    setting fixed in advance is right for both, so the governor measures: a probe runs `probe_steps` steps
    at each candidate count and keeps the one with the lowest median. It probes again after
    `recheck_every` steps, or as soon as the median of the last `probe_steps` steps is `slower` times the
    kept count's probe time (a job started beside the training).
    """

    def __init__(
        self,
        candidates: Sequence[int],
        probe_steps: int = 3,
        recheck_every: int = 100,
        slower: float = 1.5,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        self.candidates = list(dict.fromkeys(candidates))
        if not self.candidates or min(self.candidates) < 1:
            raise ValueError(f"ThreadGovernor: candidates must be thread counts >= 1, got {candidates}")
        if probe_steps < 1 or recheck_every < 1 or slower <= 1:
            raise ValueError("ThreadGovernor: probe_steps and recheck_every >= 1, slower > 1")
        self.probe_steps, self.recheck_every, self.slower = probe_steps, recheck_every, slower
        self._set_threads = set_threads
        self.choices: list[tuple[int, int]] = []  # (steps seen, threads kept) after each probe
        self._steps = 0
        self._start_probe()

    @property
    def threads(self) -> int:
        return self._threads

    def _use(self, threads: int) -> None:
        self._threads = threads
        self._set_threads(threads)

    def _start_probe(self) -> None:
        self._probe: dict[int, list[float]] = {count: [] for count in self.candidates}
        self._recent: list[float] = []
        self._use(self.candidates[0])

    def step_done(self, seconds: float) -> None:
        """Report one step's wall time (at the current `threads`); may change the thread count."""
        self._steps += 1
        if self._probe:
            times = self._probe[self._threads]
            times.append(seconds)
            if len(times) < self.probe_steps:
                return
            waiting = [count for count, t in self._probe.items() if not t]
            if waiting:
                self._use(waiting[0])
                return
            medians = {count: statistics.median(t) for count, t in self._probe.items()}
            best = min(medians, key=medians.__getitem__)
            self._reference, self._kept_at = medians[best], self._steps
            self._probe = {}
            self.choices.append((self._steps, best))
            self._use(best)
            return
        if len(self.candidates) == 1:
            return
        self._recent = (
            [*self._recent[-(self.probe_steps - 1) :], seconds] if self.probe_steps > 1 else [seconds]
        )
        slowed = (
            len(self._recent) == self.probe_steps
            and statistics.median(self._recent) > self.slower * self._reference
        )
        if slowed or self._steps - self._kept_at >= self.recheck_every:
            self._start_probe()
