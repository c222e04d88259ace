"""`pallava train` (one stage of the two-stage recipe) and `pallava export` (a shareable model folder)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    """`--resume auto|never`, the same for every training command (a bare `--resume` means auto)."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        choices=("auto", "never"),
        default="auto",
        help="auto (default): a re-run continues from the newest complete checkpoint in --out and never "
        "deletes one; never: start over, removing the old checkpoints",
    )


def add_run_arguments(
    parser: argparse.ArgumentParser,
    config_help: str,
    data_help: str,
    out_help: str,
    config_required: bool = False,
    data_required: bool = False,
) -> None:
    """The arguments every training command shares (`pallava train`, `pallava plip train`): --config,
    --data (repeatable), --out, --resume, --seed, --max-steps, --no-progress and recipe overrides
    `key=value` (applied last)."""
    parser.add_argument("--config", required=config_required, help=config_help)
    parser.add_argument(
        "--data", action="append", required=data_required, help=data_help + "; repeat for several datasets"
    )
    parser.add_argument("--out", required=True, help=out_help)
    add_resume_argument(parser)
    parser.add_argument("--seed", type=int, help="the run's seed (default: the recipe's)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. lr=2e-4 or optim.lr=2e-4"
    )


def _train(args: argparse.Namespace) -> int:
    from pallava.train.config import load_recipe, parse_overrides
    from pallava.train.trainer import train

    overrides = parse_overrides(list(args.overrides))
    if args.data:
        overrides.setdefault("data", {})["path"] = args.data[0] if len(args.data) == 1 else args.data
    if args.init:
        overrides.setdefault("model", {})["init"] = args.init
    if args.seed is not None:  # one seed for the run, as PLIP's: initialisation, generated data, data order
        for section in ("model", "data", "train"):
            overrides.setdefault(section, {})["seed"] = args.seed
    if args.max_steps is not None:
        overrides.setdefault("train", {})["max_steps"] = args.max_steps
    recipe = load_recipe(args.config, args.stage, overrides)
    if recipe.stage == "slide":
        from pallava.train.slide import train_slide

        out = train_slide(recipe, args.out, progress=not args.no_progress, resume=args.resume == "auto")
        print(
            f"slide model saved to {out} (`pallava slide ask --slide SLIDE --model {out} QUESTION`, "
            f"`pallava eval slides --model {out} --slides DIR --out REPORT`)"
        )
        return 0
    out = train(recipe, args.out, resume=args.resume == "auto", progress=not args.no_progress)
    print(f"model saved to {out} (load it with PaLlava.from_pretrained or `pallava eval vqa --model {out}`)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pallava.train.export import export_model

    out = export_model(args.model, args.out, merge_lora=args.merge_lora, eval_reports=args.eval_report or [])
    print(
        f"exported to {out} ({'LoRA merged' if args.merge_lora else 'LoRA kept as an adapter'}); model card "
        f"{Path(out) / 'README.md'}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava train` and `pallava export`."""
    train = subparsers.add_parser(
        "train",
        help="train the assistant: stage align (captions) or instruct (questions), resumable",
        description="Run one training stage. Values of the recipe can be overridden with section.key=value, "
        "e.g. optim.lr=2e-4 train.epochs=3. Runs under `accelerate launch` for several processes.",
    )
    train.add_argument(
        "--stage",
        required=True,
        choices=("align", "instruct", "slide"),
        help="which stage to run (slide: whole-slide questions on virtual slides, from an assistant)",
    )
    add_run_arguments(
        train,
        config_help="recipe YAML, e.g. configs/assistant-tiny.yaml",
        data_help="training data (sets data.path): LLaVA JSON/JSONL, Parquet shards, a manifest CSV or a "
        "YAML dataset list (several are balanced by data.balance); stage slide: a folder of virtual slides",
        out_help="output folder: the trained model, checkpoints, run log",
        config_required=True,
    )
    train.add_argument(
        "--init", help="start from this model folder (sets model.init; stage instruct: the align output)"
    )
    train.set_defaults(func=_train)

    export = subparsers.add_parser(
        "export", help="export a trained model folder (LoRA merged or as an adapter) with a model card"
    )
    export.add_argument("--model", required=True, help="a trained model folder (output of `pallava train`)")
    export.add_argument("--out", required=True, help="export folder (must not exist or be empty)")
    export.add_argument(
        "--merge-lora", action="store_true", help="fold LoRA into the language model's weights"
    )
    export.add_argument(
        "--eval-report",
        action="append",
        metavar="REPORT_JSON",
        help="evaluation report(s) (report.json of `pallava eval`) to list on the model card",
    )
    export.set_defaults(func=_export)
