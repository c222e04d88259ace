"""`pallava convert`: bring outside weights into a pallava model folder (the authors' released PA-LLaVA)."""

from __future__ import annotations

import argparse

DTYPES = ("bfloat16", "float16", "float32")


def _official(args: argparse.Namespace) -> int:
    import torch

    from pallava.convert.official import convert_official

    report = convert_official(
        args.plip,
        args.checkpoint,
        args.llm,
        args.out,
        allow_missing=args.allow_missing,
        connector_heads=args.connector_heads,
        connector_layers=args.connector_layers,
        lora_alpha=args.lora_alpha,
        dtype=getattr(torch, args.dtype),
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava convert official`."""
    parser = subparsers.add_parser("convert", help="convert outside weights (the authors' PA-LLaVA release)")
    commands = parser.add_subparsers(dest="convert_command", metavar="SUBCOMMAND", required=True)
    official = commands.add_parser(
        "official",
        help="the authors' PLIP + stage-1/stage-2 checkpoint + base LLM -> a pallava model folder",
        description="Strict: every source tensor must find its place and every vision, connector and LoRA "
        "parameter must be filled, else the names are listed and nothing is written.",
    )
    official.add_argument("--plip", required=True, help="PLIP folder: config.json + plip_80w_196token.bin")
    official.add_argument(
        "--checkpoint",
        required=True,
        help="stage-1/stage-2 checkpoint: a .pth state dict or a DeepSpeed checkpoint folder",
    )
    official.add_argument(
        "--llm", required=True, help="base LLM folder (Meta-Llama-3-8B-Instruct for the release)"
    )
    official.add_argument("--out", required=True, help="new or empty output folder")
    official.add_argument(
        "--allow-missing",
        action="store_true",
        help="convert even when tensors are unmapped or parameters unfilled; lists them",
    )
    official.add_argument(
        "--connector-heads",
        type=int,
        default=12,
        help="attention heads of the connector (not stored in the weights; 12 in the release)",
    )
    official.add_argument(
        "--connector-layers",
        type=int,
        default=6,
        help="connector depth (not stored in the weights; 6 in the release): a checkpoint "
        "missing a layer, or holding more, then fails the strict check",
    )
    official.add_argument(
        "--lora-alpha",
        type=float,
        help="LoRA alpha (not stored in the weights; default 2 x rank, as in the release)",
    )
    official.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights dtype of the output")
    official.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    official.set_defaults(func=_official)
