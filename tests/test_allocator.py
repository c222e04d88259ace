"""CPU tensors' freed memory is kept for reuse (pallava/allocator.py): no page faults on a repeated pass."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pallava import allocator

pytestmark = pytest.mark.skipif(allocator.libc() is None, reason="glibc's malloc only")

# Four 12 MiB tensors allocated and freed together, ten times: the shape of a forward pass's activations.
PASSES = textwrap.dedent(
    """
    import resource, pallava, torch
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        blocks = [torch.empty(3 * 2**20).fill_(1.0) for _ in range(4)]
        del blocks
    before = faults()
    for _ in range(10):
        blocks = [torch.empty(3 * 2**20).fill_(1.0) for _ in range(4)]
        del blocks
    print(faults() - before)
    """
)
PAGES = 10 * 4 * (12 * 2**20 // 4096)  # pages the ten passes write


def page_faults(**environ: str) -> int:
    env = {name: value for name, value in os.environ.items() if name not in allocator.ENVIRONMENT}
    env.pop("PALLAVA_MALLOC", None)
    result = subprocess.run(
        [sys.executable, "-c", PASSES], env={**env, **environ}, capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[-1])


def test_repeated_passes_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    assert page_faults() < PAGES // 100
    # glibc's own setting hands the freed blocks back and faults them in again: what the module avoids.
    # Its mmap threshold starts at 128 KiB and then moves with the process's heap history: left alone, one
    # run in four here took no faults at all (and a fresh-clone CI run failed on it); pinned at its starting
    # value, every run faults.
    assert page_faults(PALLAVA_MALLOC="system", MALLOC_MMAP_THRESHOLD_=str(128 * 2**10)) > PAGES // 2


def test_the_environment_keeps_its_own_allocator_settings():
    assert allocator.keep_freed_memory({}) is True
    assert allocator.keep_freed_memory({"PALLAVA_MALLOC": "system"}) is False
    assert allocator.keep_freed_memory({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is False
    assert allocator.keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"}) is False
