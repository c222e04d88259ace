"""Data-parallel training on one machine's CPU cores: `accelerate launch` of a `pallava` training command.

The tiny models' matrices are too small for several threads per process to pay, while data-parallel
processes (gloo) do, almost linearly; a global batch is the same whatever the number of processes when
the per-process batch is divided by it (`train.data`).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ACCELERATE_CPU = Path(__file__).resolve().parents[3] / "configs" / "accelerate" / "cpu-2proc.yaml"


def default_processes() -> int:
    """Training processes for this machine: one per usable core, 1, 2 or 4 (divisors of the recipes' global
    batches); 1 where a GPU is visible, which the single process then trains on."""
    import torch

    if torch.cuda.is_available():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(n for n in (1, 2, 4) if n <= cores)


def free_port() -> int:
    """A free TCP port for the processes' rendezvous (several runs may share a machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(args: list[str], processes: int) -> list[str]:
    """The command line running `pallava ARGS` as `processes` CPU processes under `accelerate launch`."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CPU),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        "-m",
        "pallava.cli",
        *args,
    ]
