"""What this machine's CPU computes natively. Imports nothing else from pallava, so every layer may use it."""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch


def cpu_computes_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matrix instructions (Linux: the `avx512_bf16` or `amx_bf16` flag)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no way to tell, so no
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    return False


@functools.cache
def this_cpu_computes_bf16() -> bool:
    """`cpu_computes_bf16()` of this machine, read once."""
    return cpu_computes_bf16()


def native_bf16_autocast(device: torch.device | str) -> AbstractContextManager:
    """bf16 autocast for inference-only work on `device` where it pays: a CPU that computes bf16 natively.
    Elsewhere, and where the caller already runs under CPU autocast (PLIP's bf16 training), nothing changes:
    the caller's own choice is kept, which `autocast(enabled=False)` would switch off."""
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu and this_cpu_computes_bf16() and not torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", torch.bfloat16)
    return nullcontext()
