"""`pallava eval`: score predictions, run VQA evaluation, run zero-shot classification."""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from pallava.eval.scorers import SCORERS
from pallava.eval.tasks import VQA_FORMATS

T = TypeVar("T")


def _score(args: argparse.Namespace) -> int:
    from pallava.eval.predictions import read_predictions
    from pallava.eval.scorers import score

    records = read_predictions(args.predictions)
    if records and all(r["answer_type"] == "class" for r in records):  # written by `pallava eval zeroshot`
        from pallava.eval.report import zeroshot_report

        labels = sorted({str(r["reference"]) for r in records})
        summary = zeroshot_report(
            [str(r["reference"]) for r in records],
            [str(r.get("predicted_label")) for r in records],
            labels,
            n_resamples=args.n_resamples,
            seed=args.seed,
        )
    else:
        summary = score(records, args.scorer, ci=not args.no_ci, n_resamples=args.n_resamples, seed=args.seed)
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _sample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """A seeded random subset of `limit` items, kept in input order (all items when no limit)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


class _LazyAssistant:
    """Loads the model on first use, so re-running a finished evaluation (e.g. to report with
    another scorer) reads the predictions file without loading any weights."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.assistant: Any = None

    def _loaded(self) -> Any:
        if self.assistant is None:
            import torch

            from pallava.inference import PaLlava

            device = self.args.device or ("cuda" if torch.cuda.is_available() else None)
            self.assistant = PaLlava.from_pretrained(self.args.model, device=device)
        return self.assistant

    def ask_batch(self, images: Sequence[Any], questions: Sequence[str], **options: Any) -> list[str]:
        return self._loaded().ask_batch(images, questions, **options)

    def tile_grid(self, image: Any) -> tuple[int, int]:
        return self._loaded().tile_grid(image)


def _print_paths(paths: dict[str, Path]) -> None:
    print(f"report: {paths['markdown']} and {paths['json']}")


def _vqa(args: argparse.Namespace) -> int:
    from pallava.eval.report import vqa_report, write_report
    from pallava.eval.runner import run_vqa, with_option_orders
    from pallava.eval.tasks import load_vqa_items

    out = Path(args.out)
    items = load_vqa_items(
        args.data, args.format, args.split, args.image_root, out / "images", args.label_map, args.seed
    )
    items = with_option_orders(_sample(items, args.limit, args.seed), args.option_orders, args.seed)
    records = run_vqa(
        _LazyAssistant(args),
        items,
        out / "predictions.jsonl",
        args.batch_size,
        args.max_new_tokens,
        progress=not args.no_progress,
    )
    report = vqa_report(records, args.scorer, args.n_resamples, args.seed)
    report.update(
        model=str(args.model),
        data=str(args.data),
        split=args.split,
        generation={
            "decoding": "greedy",
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
        },
    )
    paths = write_report(report, out, title=f"VQA evaluation: {Path(args.data).name}")
    for kind in ("closed", "open", "choice"):
        if kind in report:
            block = report[kind]
            extra = f", recall {block['recall']:.4f}" if "recall" in block else ""
            print(f"{kind}: n={block['n']} accuracy {block['accuracy']:.4f}{extra} ({args.scorer})")
    _print_paths(paths)
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from pallava.data.importers.manifest import read_manifest
    from pallava.data.labels import LabelMap
    from pallava.eval.report import write_report, zeroshot_report
    from pallava.eval.runner import run_zeroshot

    out = Path(args.out)
    images = _sample(read_manifest(args.data, args.split), args.limit, args.seed)
    label_map = LabelMap.resolve(args.label_map, {item.label for item in images}, source="--label-map")
    records = run_zeroshot(
        _LazyAssistant(args),
        images,
        label_map,
        out / "predictions.jsonl",
        args.batch_size,
        args.max_new_tokens,
        progress=not args.no_progress,
    )
    report = zeroshot_report(
        [r["reference"] for r in records],
        [r["predicted_label"] for r in records],
        label_map.labels(),
        args.n_resamples,
        args.seed,
    )
    report.update(
        model=str(args.model),
        data=str(args.data),
        split=args.split,
        question=records[0]["question"],
        generation={
            "decoding": "greedy",
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
        },
    )
    paths = write_report(report, out, title=f"Zero-shot classification: {Path(args.data).name}")
    print(
        f"n={report['n']} accuracy {report['accuracy']:.4f} micro F1 {report['micro']['f1']:.4f} "
        f"macro F1 {report['macro']['f1']:.4f} unmapped {report['n_unmapped']}"
    )
    _print_paths(paths)
    return 0


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="model directory (saved by training or `pallava convert`)"
    )
    parser.add_argument("--split", help="only this split (manifests and PMC-VQA CSV)")
    parser.add_argument(
        "--out", required=True, help="report folder: predictions.jsonl (resumable), report.json/.md, PNGs"
    )
    parser.add_argument(
        "--label-map",
        help="built-in label map name or JSON/YAML file (default: the built-in one "
        "covering the manifest's labels)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (left padded)")
    parser.add_argument("--limit", type=int, help="evaluate a seeded random sample of this many items")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for sampling, generated questions and bootstrap"
    )
    parser.add_argument(
        "--n-resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava eval {score,vqa,zeroshot}`."""
    parser = subparsers.add_parser("eval", help="evaluate the assistant: VQA, zero-shot, scoring")
    commands = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)

    score = commands.add_parser(
        "score",
        help="score a predictions JSONL file (JSON to stdout); zero-shot "
        "predictions get the classification report",
    )
    score.add_argument("--predictions", required=True, help="predictions JSONL written by `pallava eval vqa`")
    score.add_argument(
        "--scorer",
        choices=sorted(SCORERS),
        default="strict",
        help="strict (default), paper (PA-LLaVA) or llava-med (legacy, flawed closed set)",
    )
    score.add_argument(
        "--n-resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    score.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    score.add_argument("--no-ci", action="store_true", help="skip the bootstrap intervals")
    score.set_defaults(func=_score)

    vqa = commands.add_parser("vqa", help="answer VQA questions with the assistant and write a report")
    vqa.add_argument(
        "--data", required=True, help="PathVQA Parquet, PMC-VQA CSV, LLaVA/VQA JSONL or a labelled manifest"
    )
    vqa.add_argument("--format", choices=VQA_FORMATS, help="input format (default: guessed from the file)")
    vqa.add_argument("--image-root", help="folder that relative image paths are resolved against")
    vqa.add_argument(
        "--scorer", choices=sorted(SCORERS), default="strict", help="headline scorer (all are reported)"
    )
    vqa.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (greedy decoding)")
    vqa.add_argument(
        "--option-orders",
        type=int,
        default=1,
        help="also ask each multiple-choice question with this many option orders in all (consistency)",
    )
    _run_options(vqa)
    vqa.set_defaults(func=_vqa)

    zeroshot = commands.add_parser(
        "zeroshot", help="zero-shot classification of a labelled manifest by the assistant"
    )
    zeroshot.add_argument("--data", required=True, help="manifest CSV: path,label[,cluster,split]")
    zeroshot.add_argument(
        "--max-new-tokens", type=int, default=24, help="answer length limit (greedy decoding)"
    )
    _run_options(zeroshot)
    zeroshot.set_defaults(func=_zeroshot)
