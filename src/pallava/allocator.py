"""The C heap under torch's CPU tensors: keep freed blocks for reuse, give them back on request.

torch allocates CPU tensors with `malloc`. glibc serves blocks over its mmap threshold (128 KiB at first,
raised as blocks are freed, at most 32 MiB) with fresh pages from the kernel, and hands the heap's free top
back once it exceeds the trim threshold. A forward pass allocates and frees the same large activations again
and again, so each new tensor's pages fault in and are zeroed by the kernel: the paper-proportioned first
token (1024x768 image, `benchmarks.latency.first_token` in a script) took 45,000-49,000 page faults and
1.25-1.46 s in some processes, and with the thresholds below none and 0.95-1.14 s (docs/benchmarks.md). This
is what jemalloc or tcmalloc, preloaded as PyTorch's CPU performance guide suggests, also give; set on import
here because a Python package cannot preload an allocator.

The freed memory then stays in the process until it ends or `release_memory` trims it (the server does
after each burst of requests). A setting already in the environment (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, an `LD_PRELOAD`ed allocator) or `PALLAVA_MALLOC=system` keeps
glibc's own behaviour. Elsewhere than glibc nothing changes. Imports nothing else from pallava.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: bigger blocks (weights, long caches) still come from mmap
TRIM_THRESHOLD = 2**30  # free heap top kept before it is handed back
TOP_PAD = 64 * 2**20  # extra heap taken per growth, so a growing pass does not grow it page by page
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


@functools.cache
def libc():
    """glibc, or None where the C library is another (nothing to tune or trim)."""
    try:
        library = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return library if hasattr(library, "mallopt") and hasattr(library, "malloc_trim") else None


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Apply the thresholds above unless the environment chose otherwise; whether they were applied."""
    environ = os.environ if environ is None else environ
    if environ.get("PALLAVA_MALLOC", "").lower() == "system" or any(name in environ for name in ENVIRONMENT):
        return False
    library = libc()
    if library is None:
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(library.mallopt(parameter, value) == 1 for parameter, value in settings)


def release_memory() -> None:
    """Return freed heap memory to the operating system (`malloc_trim`); a no-op elsewhere than glibc."""
    library = libc()
    if library is not None:
        library.malloc_trim(0)
