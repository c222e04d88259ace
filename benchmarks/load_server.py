"""Load test for `pallava serve`: N concurrent clients x M chat requests; p50/p95/p99 latency, throughput,
errors.

    python benchmarks/load_server.py --clients 8 --requests 4                 # starts a tiny server itself
    python benchmarks/load_server.py --model DIR --clients 8 --requests 4     # a model folder, own server
    python benchmarks/load_server.py --url http://127.0.0.1:8000 --api-key K  # a running server

Each request carries one real image (a data: URL) and a question. The run is bounded: every client stops
issuing requests after `--max-seconds`, and each request times out after `--timeout`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import httpx

DEFAULT_IMAGE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "samples" / "pathology" / "stardist_histo.jpg"
)
WORKER_KEYS = ("model_s", "prefill_s", "decode_s", "decode_steps", "decode_rows")
QUESTIONS = ("What tissue is shown?", "Is this malignant?", "Describe the nuclei.", "Which stain is used?")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_load(
    url: str,
    clients: int = 8,
    requests: int = 4,
    max_tokens: int = 16,
    api_key: str | None = None,
    image: Path | None = None,
    max_seconds: float = 300.0,
    timeout: float = 120.0,
    lengths: Sequence[int] = (),
) -> dict:
    """Drive the server at `url` and return the measured numbers. `lengths`: answer lengths that requests
    take in turn (each client starting at its own place) instead of `max_tokens` for all."""
    from pallava.serve.images import to_data_url

    image = image or DEFAULT_IMAGE
    data_url = to_data_url(image)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds
    before = httpx.get(f"{url}/health", timeout=timeout).json()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
            for number in range(requests):
                if time.monotonic() > stop_at:
                    return
                body = {
                    "model": "pallava",
                    "max_tokens": lengths[(index + number) % len(lengths)] if lengths else max_tokens,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": data_url}},
                                {"type": "text", "text": QUESTIONS[(index + number) % len(QUESTIONS)]},
                            ],
                        }
                    ],
                }
                start = time.perf_counter()
                try:
                    response = http.post("/v1/chat/completions", json=body)
                    problem = (
                        None
                        if response.status_code == 200
                        else f"HTTP {response.status_code}: {response.text[:200]}"
                    )
                except httpx.HTTPError as error:
                    problem = repr(error)
                with lock:
                    if problem is None:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors.append(problem)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/health", timeout=timeout).json()
    batches = after.get("batches", 0) - before.get("batches", 0)
    # The generation worker's time at the model during this run (servers that report it): the rest it waited.
    worker = {key: after[key] - before[key] for key in WORKER_KEYS if key in after and key in before}
    return {
        "clients": clients,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "first_errors": errors[:3],
        "max_tokens": list(lengths) if lengths else max_tokens,
        "wall_s": round(wall, 3),
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 95), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "throughput_rps": round(len(latencies) / wall, 3) if wall > 0 else None,
        "mean_batch_size": round(len(latencies) / batches, 2) if batches else None,
        "largest_batch": after.get("largest_batch"),
        **({"worker": worker_summary(worker, wall)} if "model_s" in worker else {}),
    }


def worker_summary(worker: dict, wall: float) -> dict:
    """The worker's seconds at the model, its share of the run's wall time, and (continuous batching) its
    prefill and decoding seconds and rows per decoding step."""
    steps = worker.get("decode_steps", 0)
    return {
        "model_s": round(worker["model_s"], 4),
        "busy_share": round(worker["model_s"] / wall, 4) if wall > 0 else None,
        "prefill_s": round(worker.get("prefill_s", 0.0), 3),
        "decode_s": round(worker.get("decode_s", 0.0), 3),
        "decode_steps": steps,
        "decode_rows": worker.get("decode_rows", 0),
        "rows_per_step": round(worker.get("decode_rows", 0) / steps, 2) if steps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server; without it one is started on 127.0.0.1")
    parser.add_argument("--model", help="model folder for the server started here (default: the tiny preset)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--lengths",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[],
        help="answer lengths the requests take in turn, e.g. 8,16,32,64 (instead of --max-tokens for all)",
    )
    parser.add_argument(
        "--image", type=Path, default=None, help=f"image sent with each request (default {DEFAULT_IMAGE})"
    )
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop issuing requests after this")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    parser.add_argument("--max-batch-size", type=int, help="for the server started here (default: shipped)")
    parser.add_argument("--batch-window-ms", type=float, default=20.0, help="for the server started here")
    parser.add_argument("--device", default=None, help="for the server started here, e.g. cuda")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        parser.error("--clients and --requests must be at least 1")
    with ExitStack() as stack:
        url = args.url or stack.enter_context(_local_server(args)).url
        report = run_load(
            url,
            args.clients,
            args.requests,
            args.max_tokens,
            args.api_key,
            args.image,
            args.max_seconds,
            args.timeout,
            args.lengths,
        )
    report["server"] = (
        args.url or f"local ({args.model or 'tiny preset, random weights'}, device {args.device or 'cpu'})"
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["errors"] == 0 else 1


def _local_server(args: argparse.Namespace):
    from pallava import load_preset
    from pallava.inference import PaLlava
    from pallava.serve.app import BackgroundServer, ServerSettings, create_app

    if args.model:
        assistant = PaLlava.from_pretrained(args.model, device=args.device)
    else:  # round trip through a folder, as a user's model would be loaded
        model, processor = load_preset("tiny", seed=0)
        with tempfile.TemporaryDirectory() as folder:
            PaLlava(model, processor).save_pretrained(folder)
            assistant = PaLlava.from_pretrained(folder, device=args.device)
    limit = {} if args.max_batch_size is None else {"max_batch_size": args.max_batch_size}
    settings = ServerSettings(
        model_name="pallava",
        api_key=args.api_key,
        **limit,
        batch_window_s=args.batch_window_ms / 1000,
        max_tokens_limit=max(1024, args.max_tokens),
        timeout_s=args.timeout,
        max_queue=max(256, args.clients),
    )
    return BackgroundServer(create_app(assistant, settings))


if __name__ == "__main__":
    sys.exit(main())
