"""CPU thread settings of a training process, applied in one place by every trainer.

On a CPU each of torch's intra-op threads waits at the end of every parallel region for the others. When
another process takes a core, one of them is descheduled and the rest wait until it runs again: on two
cores, PLIP training ran 3x slower with two spinning threads than idle, next to one busy process, while one
thread barely slowed. The recipes' `cpu_threads` sets the count: a number fixes it, `auto` lets a
`ThreadGovernor` choose between all cores and one thread from the steps' own times (the shipped tiny
recipes), `null` keeps torch's default (all cores, or `OMP_NUM_THREADS`). OpenMP's own wait policy
(`OMP_WAIT_POLICY`, `GOMP_SPINCOUNT`) is read when torch loads, so it is chosen before, in
`pallava/__init__.py` (training commands spin, the rest sleep); see docs/training.md.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence

import torch

WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
AUTO = "auto"  # cpu_threads: the ThreadGovernor chooses


def check_cpu_threads(threads: int | str | None, source: str = "cpu_threads") -> None:
    """A recipe's `cpu_threads`: a count of at least 1, `auto` (a `ThreadGovernor`) or None."""
    if threads is None or threads == AUTO:
        return
    if isinstance(threads, str) or threads < 1:
        raise ValueError(
            f"{source}: cpu_threads must be at least 1, 'auto' or null (torch's default), got {threads!r}"
        )


def apply_cpu_threads(threads: int | str | None, device: torch.device | str = "cpu") -> dict[str, object]:
    """Give torch `threads` intra-op threads when training on the CPU; returns what is in force.

    `None` leaves torch's default, `auto` leaves the count to `thread_governor`. On a GPU nothing changes
    (the CPU only feeds the device).
    """
    check_cpu_threads(threads)
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and isinstance(threads, int):
        torch.set_num_threads(threads)
    return {
        "threads": AUTO if on_cpu and threads == AUTO else torch.get_num_threads(),
        **{name: os.environ[name] for name in WAIT_POLICY_VARIABLES if name in os.environ},
    }


def thread_governor(
    threads: int | str | None, device: torch.device | str = "cpu", processes: int = 1
) -> ThreadGovernor | None:
    """The governor of a CPU run with `cpu_threads: auto` (candidates: this process's share of the cores,
    and one thread); None for any other setting or device, or when the share is one thread anyway."""
    if threads != AUTO or torch.device(device).type != "cpu":
        return None
    share = max(1, (os.cpu_count() or 1) // max(1, processes))
    return ThreadGovernor([share, 1]) if share > 1 else None


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
