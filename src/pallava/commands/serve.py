"""`pallava chat | predict | serve | ui`: the doors to a trained assistant."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pallava.commands import add_stain_normalize_argument

DEFAULT_EXAMPLES = Path("../shared/data/samples")  # relative to where the command runs (the repo root)
DTYPES = ("float32", "bfloat16", "float16")


def _load(args: argparse.Namespace):
    import torch

    from pallava.inference import PaLlava

    assistant = PaLlava.from_pretrained(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        stain_normalize=getattr(args, "stain_normalize", None),
    )
    if args.static_cache:
        assistant.speed_up_generation()
    return assistant


def _options(args: argparse.Namespace) -> dict:
    from pallava.serve.protocol import MIN_TEMPERATURE

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2], got {args.temperature}")
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {args.temperature}"
        )
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    return {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}


def _chat(args: argparse.Namespace) -> int:
    from pallava.processing.loading import load_image
    from pallava.serve.chat import interactive_chat

    options = _options(args)
    assistant = _load(args)
    image = load_image(args.image, assistant.processor.image_processor.max_pixels)
    if args.question:
        print(assistant.ask(image, " ".join(args.question), **options))
        return 0
    return interactive_chat(assistant, image, **options)


def _predict(args: argparse.Namespace) -> int:
    from pallava.predict import answered_ids, predict_jsonl, read_requests

    options = _options(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"input file not found: {args.input}")
    read_requests(Path(args.input), Path(args.image_root) if args.image_root else None)  # fail before loading
    answered_ids(Path(args.output))
    summary = predict_jsonl(_load(args), args.input, args.output, args.batch_size, args.image_root, **options)
    print(
        f"{summary.answered} answered, {summary.skipped} already in {args.output}, {summary.total} in total",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pallava.serve.app import ServerSettings, run_server

    batching = args.batching or ("static" if args.static_cache else "continuous")
    if args.static_cache and batching != "static":
        # A static cache is allocated for one batch's shapes; continuous batching changes them every step.
        raise ValueError("--static-cache needs --batching static")
    settings = ServerSettings(
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key or os.environ.get("PALLAVA_API_KEY") or None,
        allow_local_dir=args.allow_local_dir,
        max_body_bytes=args.max_body_mb * 2**20,
        max_image_bytes=args.max_image_mb * 2**20,
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=min(args.max_tokens, args.max_tokens_limit),
        timeout_s=args.timeout,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000,
        batching=batching,
        generation_threads=None if args.generation_threads == "all" else args.generation_threads,
        image_cache=args.image_cache,
        max_queue=args.max_queue,
        max_queued_pixels=args.max_queued_pixels,
        decode_workers=args.decode_workers,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.keep_alive,
        max_slide_bytes=args.max_slide_mb * 2**20,
    )
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key", file=sys.stderr)
    run_server(_load(args), settings, args.host, args.port)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from pallava.serve.ui import launch_ui

    examples = args.examples if args.examples is not None else DEFAULT_EXAMPLES
    if args.examples is not None and not Path(examples).is_dir():
        raise ValueError(f"--examples {examples} is not a directory")
    launch_ui(_load(args), args.host, args.port, examples, max_tokens=args.max_tokens)
    return 0


def _model_arguments(parser: argparse.ArgumentParser, max_tokens: int = 256, sampling: bool = True) -> None:
    parser.add_argument("--model", required=True, help="model directory (from save_pretrained or training)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32)")
    add_stain_normalize_argument(parser)
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="static KV cache, and on a GPU the language model compiled with CUDA graphs: lower latency "
        "once warm (the first requests compile); answers unchanged",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"answer length cap (default {max_tokens})"
    )
    if sampling:  # the server takes these per request instead
        parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), up to 2")
        parser.add_argument(
            "--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0"
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava chat`, `pallava predict`, `pallava serve` and `pallava ui`."""
    chat = subparsers.add_parser(
        "chat", help="ask about an image in the terminal (one question, or an interactive session)"
    )
    _model_arguments(chat)
    chat.add_argument("image", help="image file")
    chat.add_argument("question", nargs="*", help="question; omit it for an interactive session")
    chat.set_defaults(func=_chat)

    predict = subparsers.add_parser("predict", help="answer a JSONL file of {id, image, question}, resumable")
    _model_arguments(predict)
    predict.add_argument("--input", required=True, help="JSONL with id, image (path or null), question")
    predict.add_argument(
        "--output", required=True, help="JSONL written with an added 'answer'; resumed if present"
    )
    predict.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (default 8)")
    predict.add_argument(
        "--image-root", default=None, help="folder image paths are relative to (default: the input's)"
    )
    predict.set_defaults(func=_predict)

    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API (chat completions, streaming)")
    _model_arguments(serve, sampling=False)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set PALLAVA_API_KEY)"
    )
    serve.add_argument(
        "--model-name", default=None, help="model id reported to clients (default: folder name)"
    )
    serve.add_argument(
        "--allow-local-dir",
        type=Path,
        default=None,
        help="also accept image paths relative to this folder (never outside it)",
    )
    serve.add_argument("--max-body-mb", type=int, default=32, help="request body limit in MiB (default 32)")
    serve.add_argument("--max-image-mb", type=int, default=16, help="per-image limit in MiB (default 16)")
    serve.add_argument("--max-image-pixels", type=int, default=16_777_216, help="per-image pixel limit")
    serve.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    serve.add_argument(
        "--max-tokens-limit", type=int, default=1024, help="largest max_tokens a client may ask"
    )
    serve.add_argument("--timeout", type=float, default=120.0, help="seconds per request, checks to answer")
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="requests generated together (default 16)"
    )
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=20.0,
        help="an idle server waits this long for requests being admitted to start together (default 20)",
    )
    serve.add_argument(
        "--batching",
        choices=("continuous", "static"),
        default=None,
        help="continuous: requests join and leave the running batch at every token (default); static: "
        "one generate per batch of requests with equal options, each waiting for the longest (the default "
        "with --static-cache)",
    )
    serve.add_argument(
        "--generation-threads",
        choices=("auto", "all"),
        default="auto",
        help="CPU threads for the token-by-token generation steps: auto measures all against one per "
        "batch size and keeps the faster (default); all: every step uses all of torch's threads",
    )
    serve.add_argument(
        "--image-cache",
        type=int,
        default=32,
        help="images whose vision features are kept for requests that send them again, as a chat does on "
        "every turn (default 32; 0: none)",
    )
    serve.add_argument(
        "--max-slide-mb",
        type=int,
        default=4096,
        help="whole-slide routes: largest slide file, local or uploaded, in MiB (default 4096; uploads "
        "are also held to --max-body-mb)",
    )
    serve.add_argument("--max-queue", type=int, default=256, help="queued requests before 503 (default 256)")
    serve.add_argument(
        "--max-queued-pixels",
        type=int,
        default=2**25,
        help="image pixels (as model-ready crops) queued requests may hold before 503",
    )
    serve.add_argument(
        "--decode-workers", type=int, default=2, help="requests decoding images at once (default 2)"
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds for a request's headers to arrive before the connection is closed",
    )
    serve.add_argument(
        "--body-timeout", type=float, default=60.0, help="seconds for a request's body to arrive (then 408)"
    )
    serve.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle connection is kept")
    serve.set_defaults(func=_serve)

    ui = subparsers.add_parser("ui", help="web page: upload an image, ask, see the answer and a heat map")
    _model_arguments(ui, max_tokens=64, sampling=False)
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument(
        "--examples", default=None, help=f"folder of example images (default {DEFAULT_EXAMPLES} when present)"
    )
    ui.set_defaults(func=_ui)
