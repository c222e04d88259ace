"""`pallava serve` under concurrency: 16 concurrent clients against the same requests one at a time.

    python -m benchmarks.serve_concurrency --regime tiny --json-out serve.json [--quick]

The server (the shipped settings: batches of up to 16 within a 20 ms window) runs in this process on random
weights of the regime's shapes; the clients run in their own process (`benchmarks/load_server.py --url`),
so their HTTP and JSON work does not compete with the server for the interpreter. Each request is one real
image (a data: URL) with a question and a fixed answer length. Throughput ratio = requests/s with 16
clients / requests/s with one client; p50/p99 are per-request latencies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import ROOT, load_average, write_json

CLIENTS = 16
SPEEDUP_GOAL = 4.0  # 16 clients over one at a time (benchmarks/run.py's target)
VARIED_LENGTHS = (8, 16, 32, 64)  # answer lengths in turn for `varied_lengths`
BATCHING_MODES = ("static", "continuous")  # `pallava serve --batching`, compared by `varied_lengths`


def assistant(regime_name: str):
    """Our model at the regime's shapes (random weights), with its processor, ready to serve."""
    from benchmarks.systems import REGIMES, build_pallava
    from pallava.inference import PaLlava

    system = build_pallava(REGIMES[regime_name])
    return PaLlava(system.model, system.processor)


def drive(url: str, clients: int, requests: int, max_tokens: int, lengths: Sequence[int] = ()) -> dict:
    """Run the load client in its own process against `url`; its JSON report."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="pallava-bench-serve-") as folder:
        out = Path(folder) / "load.json"
        command = [sys.executable, "-m", "benchmarks.load_server", "--url", url, "--clients", str(clients)]
        command += ["--requests", str(requests), "--max-tokens", str(max_tokens), "--json", str(out)]
        command += ["--timeout", "600", "--max-seconds", "600"]
        if lengths:
            command += ["--lengths", ",".join(map(str, lengths))]
        subprocess.run(command, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        if not out.is_file():
            raise RuntimeError(f"the load client `{' '.join(command[1:])}` wrote no report")
        return json.loads(out.read_text())


def run(
    regime: str,
    quick: bool = False,
    threads: int | None = None,
    shape: dict | None = None,
    max_batch_size: int | None = None,
) -> dict:
    """One-at-a-time then 16 concurrent clients against one server; the ratio of their throughputs."""
    from pallava.serve.app import ServerSettings, create_app
    from pallava.serve.server import BackgroundServer

    if threads is not None:
        torch.set_num_threads(threads)
    tiny = regime == "tiny"
    # Requests one at a time, requests per concurrent client, answer tokens. Answers of a chat's length (64
    # tokens; 32 at paper-proportioned shapes, where a CPU decodes a few per second). Batching saves decoding
    # steps; a prefill (the image and the prompt) is compute-bound at paper-proportioned shapes and costs as
    # much per request together as alone (measured 2.45 s alone, 2.58 s each together, 2026-12-02).
    # Tiny: 32 requests alone and 8 per client, in 3 alternating rounds: with 16 and 4 in one round the
    # concurrent run lasted under 2 s, and the ratio varied from 2.6x to 4.1x between runs on the same idle
    # machine; with one round of 32 and 8, from 3.7x to 4.6x (the host's speed drifts between the two runs).
    defaults = {
        "sequential": 32 if tiny else 2,
        "per_client": 8 if tiny else 1,
        "max_tokens": 64 if tiny else 32,
        "rounds": 3 if tiny else 1,
    }
    if quick:
        defaults = {
            "sequential": 4 if tiny else 1,
            "per_client": 1,
            "max_tokens": 16 if tiny else 4,
            "rounds": 1,
        }
    shape = {**defaults, **(shape or {})}
    # Shipped settings, but a time limit that a slow shared CPU cannot hit (the clients wait as long).
    # `max_batch_size`: another limit than the shipped one, as `pallava serve --max-batch-size` (checked).
    limit = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
    shipped = ServerSettings(model_name="pallava", max_queue=max(256, CLIENTS), timeout_s=600.0, **limit)
    # Every request sends the same image. The headline runs without the image feature cache, so each
    # request pays for its image as a request with a new image would; `resent_image` then measures the
    # shipped cache, as a chat's later turns (which send the conversation's image again) meet it.
    settings = dataclasses.replace(shipped, image_cache=0)
    result: dict = {
        "regime": regime,
        "clients": CLIENTS,
        **shape,
        "batching": settings.batching,
        "max_batch_size": settings.max_batch_size,
        "batch_window_ms": settings.batch_window_s * 1000,
        "threads": torch.get_num_threads(),
        "load_average_start": load_average(),
    }
    model = assistant(regime)  # both servers answer with the same model
    with BackgroundServer(create_app(model, settings)) as server:
        drive(server.url, 1, 1, shape["max_tokens"])  # warm-up: first calls allocate and pick kernels
        result["one_at_a_time"], result["concurrent"] = alternate(server.url, shape)
    with BackgroundServer(create_app(model, shipped)) as server:
        drive(server.url, 1, 1, shape["max_tokens"])  # warm-up, and the image's features enter the cache
        one, many = alternate(server.url, shape)
        result["resent_image"] = {
            "image_cache": shipped.image_cache,
            "one_at_a_time": one,
            "concurrent": many,
        }
    one, many = result["one_at_a_time"], result["concurrent"]
    result["errors"] = one["errors"] + many["errors"]
    if tiny:
        varied = result["varied_lengths"] = varied_lengths(model, settings, shape)
        result["errors"] += sum(varied[mode]["errors"] for mode in BATCHING_MODES)
    if one["throughput_rps"] and many["throughput_rps"]:
        result["serve_concurrency_speedup"] = round(many["throughput_rps"] / one["throughput_rps"], 3)
        result["worker"] = where_time_goes(one, many)
    result["load_average_end"] = load_average()
    return result


def alternate(url: str, shape: dict) -> tuple[dict, dict]:
    """One client, then CLIENTS clients, `shape["rounds"]` times in turn, each mode's rounds pooled."""
    rounds: dict[str, list[dict]] = {"one": [], "many": []}
    for _ in range(shape["rounds"]):
        rounds["one"].append(drive(url, 1, shape["sequential"], shape["max_tokens"]))
        rounds["many"].append(drive(url, CLIENTS, shape["per_client"], shape["max_tokens"]))
    return pooled(rounds["one"]), pooled(rounds["many"])


def pooled(runs: list[dict]) -> dict:
    """Rounds of the load client as one run: requests, errors, wall time and the worker's time summed,
    throughput over the total; latency percentiles (not additive) from the round of median throughput."""
    if len(runs) == 1:
        return {**runs[0], "rounds": 1}
    from benchmarks.load_server import WORKER_KEYS, worker_summary

    requests, wall = sum(run["requests"] for run in runs), sum(run["wall_s"] for run in runs)
    middle = sorted(runs, key=lambda run: run["throughput_rps"] or 0)[len(runs) // 2]
    batches = sum(run["requests"] / run["mean_batch_size"] for run in runs if run["mean_batch_size"])
    out = {
        **middle,
        "rounds": len(runs),
        "requests": requests,
        "errors": sum(run["errors"] for run in runs),
        "first_errors": [error for run in runs for error in run["first_errors"]][:3],
        "wall_s": round(wall, 3),
        "throughput_rps": round(requests / wall, 3) if wall > 0 else None,
        "mean_batch_size": round(requests / batches, 2) if batches else None,
        "largest_batch": max(run["largest_batch"] or 0 for run in runs),
    }
    if all("worker" in run for run in runs):
        totals = {key: sum(run["worker"][key] for run in runs) for key in WORKER_KEYS}
        out["worker"] = worker_summary(totals, wall)
    return out


def where_time_goes(one: dict, many: dict) -> dict | None:
    """The speed-up split in two factors that multiply to it: requests per second of the generation worker's
    model time (what batching saves in model work) and the worker's busy share of the wall time (what it
    lost waiting for requests: their HTTP, JSON and image work, and the clients', on the same cores)."""
    if "worker" not in one or "worker" not in many:
        return None
    worker_one, worker_many = one["worker"], many["worker"]
    if not (worker_one["model_s"] and worker_many["model_s"] and worker_one["busy_share"]):
        return None
    model_rps = {
        name: run["requests"] / run["worker"]["model_s"] for name, run in (("one", one), ("many", many))
    }
    split = {
        "model_work_speedup": round(model_rps["many"] / model_rps["one"], 3),
        "busy_share_ratio": round(worker_many["busy_share"] / worker_one["busy_share"], 3),
    }
    if worker_one["decode_steps"] and worker_many["decode_steps"]:  # continuous batching
        prefill = [worker_one["prefill_s"] / one["requests"], worker_many["prefill_s"] / many["requests"]]
        step = [worker["decode_s"] / worker["decode_steps"] for worker in (worker_one, worker_many)]
        split.update(
            prefill_per_request_s=[round(value, 4) for value in prefill],
            decode_step_s=[round(value, 4) for value in step],
            answer_tokens_for_goal=answer_tokens_for(SPEEDUP_GOAL, prefill, step),
        )
    return split


def answer_tokens_for(goal: float, prefill: Sequence[float], step: Sequence[float]) -> int | None:
    """The answer length at which a worker that never waits reaches `goal`x with CLIENTS clients, from the
    measured per-request prefill and per-step decoding times (alone, and with CLIENTS rows): CLIENTS answers
    of n tokens alone cost CLIENTS * (p1 + n * d1), together CLIENTS * pN + n * dN. None: no length does."""
    (prefill_one, prefill_many), (step_one, step_many) = prefill, step
    gain_per_token = CLIENTS * step_one - goal * step_many
    if gain_per_token <= 0:
        return None
    return max(1, math.ceil(CLIENTS * (goal * prefill_many - prefill_one) / gain_per_token))


def varied_lengths(model, settings, shape: dict) -> dict:
    """Answers of 8, 16, 32 and 64 tokens in turn, with each batching mode: a static batch waits for its
    longest answer, a continuous one lets a finished answer's row go to the next request."""
    from pallava.serve.app import create_app
    from pallava.serve.server import BackgroundServer

    out = {"lengths": list(VARIED_LENGTHS)}
    for batching in BATCHING_MODES:
        with BackgroundServer(create_app(model, dataclasses.replace(settings, batching=batching))) as server:
            drive(server.url, 1, 1, shape["max_tokens"])
            one = drive(server.url, 1, shape["sequential"], 0, VARIED_LENGTHS)
            many = drive(server.url, CLIENTS, shape["per_client"], 0, VARIED_LENGTHS)
        out[batching] = {
            "one_at_a_time_rps": one["throughput_rps"],
            "concurrent_rps": many["throughput_rps"],
            "latency_p50_s": many["latency_p50_s"],
            "latency_p99_s": many["latency_p99_s"],
            "errors": one["errors"] + many["errors"],
            "speedup": round(many["throughput_rps"] / one["throughput_rps"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=("tiny", "paper-proportioned"), required=True)
    parser.add_argument("--json-out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-batch-size", type=int, help="default: the server's shipped setting")
    args = parser.parse_args(argv)
    result = run(args.regime, quick=args.quick, threads=args.threads, max_batch_size=args.max_batch_size)
    write_json(args.json_out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
