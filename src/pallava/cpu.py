"""What this machine's CPU computes natively. Imports nothing else from pallava, so every layer may use it."""

from __future__ import annotations

import functools
from pathlib import Path


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
