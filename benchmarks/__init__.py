"""Benchmarks of pallava against its peers (transformers' LLaVA-NeXT and LLaVA-1.5), measured in one run.

Entry point: `python benchmarks/run.py [--quick]` (or `make bench`). Each section is a module with a
`run(...)` function returning a JSON-ready dict; `run.py` calls them (model sections in their own
subprocess, so that peak memory does not mix) and writes `results/latest.json` and `docs/benchmarks.md`.
"""

import pallava  # noqa: E402, F401  (first: sets pallava's OpenMP wait policy before torch loads)
