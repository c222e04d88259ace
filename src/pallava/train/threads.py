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
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pallava.threads import ThreadGovernor

WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
__all__ = [
    "AUTO",
    "ThreadGovernor",
    "apply_cpu_threads",
    "check_cpu_threads",
    "encoding_threads",
    "thread_governor",
]
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


def _core_share(processes: int) -> int:
    """One process's share of the machine's cores (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def thread_governor(
    threads: int | str | None, device: torch.device | str = "cpu", processes: int = 1
) -> ThreadGovernor | None:
    """The governor of a CPU run with `cpu_threads: auto` (candidates: this process's share of the cores,
    and one thread); None for any other setting or device, or when the share is one thread anyway."""
    if threads != AUTO or torch.device(device).type != "cpu":
        return None
    share = _core_share(processes)
    return ThreadGovernor([share, 1]) if share > 1 else None


@contextmanager
def encoding_threads(device: torch.device | str = "cpu", processes: int = 1) -> Iterator[int]:
    """This process's share of the cores for a stretch of large-matrix work (encoding images before the
    steps), then the thread count in force before: a recipe's `cpu_threads: 1` is chosen for small steps
    and would leave a core idle while the tower encodes. On a GPU nothing changes."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        yield before
        return
    share = _core_share(processes)
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        torch.set_num_threads(before)
