"""Peak memory of one system alone: build it, answer one 1024x768 image, decode a few tokens at batch 8.

Run in its own process (`run.py` does so for every system), so that the reading is this system's only:
resident memory (RSS) on a CPU, allocated device memory on a GPU.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import current_rss_mb, peak_rss_mb, write_json
from benchmarks.images import image_cases
from benchmarks.latency import HEADLINE, decode, first_token
from benchmarks.systems import REGIMES, SYSTEMS, build_one


def run(regime_name: str, system_key: str, threads: int | None = None, new_tokens: int = 2) -> dict:
    regime = REGIMES[regime_name]
    if threads is not None:
        torch.set_num_threads(threads)
    image = image_cases()[HEADLINE].images[0]
    before = current_rss_mb()
    system = build_one(system_key, regime)
    loaded = current_rss_mb()
    with torch.inference_mode():
        output = first_token(system, image)
        decode(system, output, 8, new_tokens)()
    # The kernel's high-water mark (ru_maxrss) is synced lazily from per-CPU RSS counters, so it can read a
    # fraction of a MiB below a VmRSS sample taken earlier: the peak is at least every reading taken.
    peak = max(peak_rss_mb(), before, loaded, current_rss_mb())
    result = {
        "regime": regime.name,
        "system": system_key,
        "image": HEADLINE,
        "threads": torch.get_num_threads(),
        "rss_before_build_mb": round(before, 1),
        "rss_after_build_mb": round(loaded, 1),
        "peak_rss_mb": round(peak, 1),
    }
    if regime.device == "cuda":
        result["peak_device_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), required=True)
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    write_json(args.json_out, run(args.regime, args.system, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
