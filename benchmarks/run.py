"""Run every benchmark and write `benchmarks/results/latest.json` and `docs/benchmarks.md`.

    python benchmarks/run.py            # full: tiny + paper-proportioned (+ paper when a GPU is present)
    python benchmarks/run.py --quick    # a few minutes: fewer rounds, the headline image, peer (a) only
    python benchmarks/run.py --regimes paper --out benchmarks/results/paper-gpu.json   # on a GPU machine
    python benchmarks/run.py --only busy-machine slide-map serve   # some sections, merged into latest.json

A CPU run includes the stored GPU result (`benchmarks/results/paper-gpu.json`, with its own machine facts)
as its `paper` regime, so one report shows all three regimes.

Model sections run in their own process (peak memory per system, no cross-talk); ratios come from systems
timed in alternation inside one process. Nothing here asserts a time: the targets are reported, met or not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import preprocess  # noqa: E402  (before torch: the package sets OpenMP's wait policy)

# isort: split
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ROOT,
    choose_threads,
    command_line,
    load_average,
    machine_info,
    run_worker,
    write_json,
)
from benchmarks.report import render, summarise  # noqa: E402
from benchmarks.systems import SYSTEMS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "latest.json"
SECTIONS = ("preprocessing", "latency", "memory", "training", "busy-machine", "slide-map", "serve")
SERVE_REGIMES = ("tiny", "paper-proportioned")  # the server section's shapes (CPU)
GPU_RESULTS = ROOT / "benchmarks" / "results" / "paper-gpu.json"
REGIME_NAMES = ("tiny", "paper-proportioned", "paper")
DOCS = ROOT / "docs" / "benchmarks.md"


def plan(quick: bool, gpu: bool, only: list[str] | None = None) -> dict[str, dict]:
    """What runs per regime: the latency section always; memory readings and training as the mode allows."""
    regimes = {
        "tiny": {"memory": [] if quick else ["pallava", "llava_next_matched", "llava_1_5"], "training": True},
        "paper-proportioned": {"memory": [] if quick else list(SYSTEMS), "training": not quick},
    }
    if gpu:
        regimes["paper"] = {
            "memory": [] if quick else ["pallava", "llava_next_matched"],
            "training": not quick,
        }
    if only is not None:
        missing = [name for name in only if name not in regimes]
        if missing:
            raise SystemExit(f"regime {', '.join(missing)} cannot run here: the paper regime needs a GPU")
        regimes = {name: regimes[name] for name in only}
    return regimes


def stored_gpu_result(path: Path = GPU_RESULTS) -> dict | None:
    """The `paper` regime from a GPU run's results file, with that run's machine and command."""
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    regime = stored.get("regimes", {}).get("paper")
    if not regime or "not_run" in regime:
        return None
    return {
        **regime,
        "machine": stored["machine"],
        "command": stored["command"],
        "started": stored["started"],
        "notes": stored.get("notes", []),
    }


def run_section(name: str, module: str, args: list[str], errors: list[str]) -> dict:
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        return run_worker(module, args)
    except RuntimeError as error:
        errors.append(f"{name}: {error}")
        return {"error": str(error)}


def _still_current(previous: dict, measured: list[str]) -> list[dict]:
    """Earlier merged commands, each listing only the sections this command does not measure again (a
    command whose sections are all re-measured no longer describes any number on the page)."""
    kept = []
    for entry in previous.get("merged", []):
        sections = [name for name in entry["sections"] if name not in measured]
        if sections:
            kept.append({**entry, "sections": sections})
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="pallava benchmarks against LLaVA-NeXT and LLaVA-1.5, as ratios"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and sections (a few minutes)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the faster of 1 and all cores)")
    parser.add_argument(
        "--regimes", nargs="+", choices=REGIME_NAMES, help="only these regimes (default: all that can run)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        help="run only these sections and merge them into --out (the other sections keep their numbers)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help=f"Markdown report (default {DOCS.relative_to(ROOT)})"
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    started = time.time()
    gpu = torch.cuda.is_available()
    regimes = plan(args.quick, gpu, args.regimes)
    thread_info = choose_threads(args.threads, torch.bfloat16)
    worker = ["--threads", str(thread_info["threads"])] + (["--quick"] if args.quick else [])
    wanted = set(args.only or SECTIONS)
    command = command_line("run.py", argv or sys.argv[1:])
    results: dict = {
        "command": command,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": machine_info(),
        "threads": thread_info,
        "regimes": {},
        "preprocessing": {},
    }
    if args.only and args.out.is_file():  # merge: what did not run keeps its numbers, and says so
        previous = json.loads(args.out.read_text())
        results = {
            **previous,
            "merged": [*_still_current(previous, args.only), {**results, "sections": args.only}],
        }
    errors: list[str] = []
    if "preprocessing" in wanted:
        cpu_tilings = ["paper-proportioned"] if args.quick else ["tiny", "paper-proportioned"]
        # the paper regime tiles exactly as paper-proportioned does
        for regime in [r for r in cpu_tilings if r in regimes]:
            print(f"== preprocessing ({regime} tiling)", file=sys.stderr, flush=True)
            results["preprocessing"][regime] = preprocess.run(
                regime, quick=args.quick, threads=thread_info["threads"]
            )
    for regime, sections in regimes.items():
        entry = results["regimes"].setdefault(regime, {})
        entry.pop("not_run", None)
        if "latency" in wanted:
            entry["latency"] = run_section(
                f"latency ({regime})", "latency", ["--regime", regime, *worker], errors
            )
        if "memory" in wanted:
            entry["memory"] = {
                key: run_section(
                    f"memory ({regime}, {key})",
                    "memory",
                    ["--regime", regime, "--system", key, "--threads", str(thread_info["threads"])],
                    errors,
                )
                for key in sections["memory"]
            }
        if sections["training"] and "training" in wanted:
            entry["training"] = run_section(
                f"training ({regime})", "training", ["--regime", regime, *worker], errors
            )
    quick = ["--quick"] if args.quick else []
    if "busy-machine" in wanted:
        results["busy_machine"] = run_section("training on a busy machine", "busy_machine", quick, errors)
    if "slide-map" in wanted:
        results["slide_map"] = run_section("slide map", "slide_map", [*worker], errors)
    if "serve" in wanted:
        results["serve"] = {
            regime: run_section(
                f"serve ({regime})", "serve_concurrency", ["--regime", regime, *worker], errors
            )
            for regime in SERVE_REGIMES
            if args.regimes is None or regime in args.regimes
        }
    if {"latency", "memory", "training"} & wanted and "paper" not in regimes and args.regimes is None:
        results["regimes"]["paper"] = stored_gpu_result() or {
            "not_run": "no GPU on this machine: the paper shapes (Llama-3-8B, bf16) need one; run "
            "`python benchmarks/run.py --regimes paper --out benchmarks/results/paper-gpu.json` on a GPU"
        }
    if args.only and results.get("merged"):
        results["merged"][-1].update(duration_s=round(time.time() - started, 1), errors=errors)
    else:
        results["duration_s"] = round(time.time() - started, 1)
        results["load_average_end"] = load_average()
        results["errors"] = errors
    results.update(summarise(results))
    write_json(args.out, results)
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(render(results))
    print(f"wrote {args.out} and {args.docs} in {time.time() - started:.0f} s", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
