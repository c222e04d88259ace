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
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import ROOT, load_average, write_json

CLIENTS = 16
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
    # tokens; 32 at paper-proportioned shapes, where a CPU decodes a few per second): the prompt's prefill is
    # compute-bound and gains nothing from batching, decoding does.
    defaults = {
        "sequential": 16 if tiny else 2,
        "per_client": 4 if tiny else 1,
        "max_tokens": 64 if tiny else 32,
    }
    if quick:
        defaults = {"sequential": 4 if tiny else 1, "per_client": 1, "max_tokens": 16 if tiny else 4}
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
        result["one_at_a_time"] = drive(server.url, 1, shape["sequential"], shape["max_tokens"])
        result["concurrent"] = drive(server.url, CLIENTS, shape["per_client"], shape["max_tokens"])
    with BackgroundServer(create_app(model, shipped)) as server:
        drive(server.url, 1, 1, shape["max_tokens"])  # warm-up, and the image's features enter the cache
        result["resent_image"] = {
            "image_cache": shipped.image_cache,
            "one_at_a_time": drive(server.url, 1, shape["sequential"], shape["max_tokens"]),
            "concurrent": drive(server.url, CLIENTS, shape["per_client"], shape["max_tokens"]),
        }
    one, many = result["one_at_a_time"], result["concurrent"]
    result["errors"] = one["errors"] + many["errors"]
    if tiny:
        varied = result["varied_lengths"] = varied_lengths(model, settings, shape)
        result["errors"] += sum(varied[mode]["errors"] for mode in BATCHING_MODES)
    if one["throughput_rps"] and many["throughput_rps"]:
        result["serve_concurrency_speedup"] = round(many["throughput_rps"] / one["throughput_rps"], 3)
    result["load_average_end"] = load_average()
    return result


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
