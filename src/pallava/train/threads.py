"""CPU thread settings of a training process, applied in one place by every trainer.

On a CPU each of torch's intra-op threads waits at the end of every parallel region for the others. When
another process takes a core, one of them is descheduled and the rest spin until it runs again: on two
cores, PLIP training ran 5x slower with two threads than with one next to one busy process. The recipes'
`cpu_threads` sets the count (the shipped tiny recipes: 1); `null` keeps torch's default (all cores, or
`OMP_NUM_THREADS`). OpenMP's own wait policy (`OMP_WAIT_POLICY=PASSIVE`, `GOMP_SPINCOUNT`) is read when
torch loads, so it can only be set in the environment before the process starts; see docs/training.md.
"""

from __future__ import annotations

import os

import torch

WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def apply_cpu_threads(threads: int | None, device: torch.device | str = "cpu") -> dict[str, object]:
    """Give torch `threads` intra-op threads when training on the CPU; returns what is in force.

    `None` leaves torch's default. On a GPU nothing changes (the CPU only feeds the device).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"cpu_threads must be at least 1 (or null for torch's default), got {threads}")
    if torch.device(device).type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    return {
        "threads": torch.get_num_threads(),
        **{name: os.environ[name] for name in WAIT_POLICY_VARIABLES if name in os.environ},
    }
