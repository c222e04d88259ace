"""`pallava eval`: score predictions, run VQA evaluation, run zero-shot classification."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pallava.commands import add_max_pixels_argument, add_stain_normalize_argument
from pallava.data.records import PROMPT_STYLES
from pallava.eval.runner import CLASS_ANSWERS
from pallava.eval.scorers import SCORERS
from pallava.eval.tasks import VQA_FORMATS, sample_items

if TYPE_CHECKING:
    from pallava.eval.suite import LazyAssistant


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
        tokenize = None
        if args.model:
            from pallava.eval.runner import model_tokenize

            tokenize = model_tokenize(args.model)
        summary = score(
            records,
            args.scorer,
            ci=not args.no_ci,
            n_resamples=args.n_resamples,
            seed=args.seed,
            tokenize=tokenize,
        )
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _assistant(args: argparse.Namespace) -> LazyAssistant:
    from pallava.eval.suite import LazyAssistant

    return LazyAssistant(args.model, args.device, args.stain_normalize, args.max_pixels)


def _print_paths(paths: dict[str, Path]) -> None:
    print(f"report: {paths['markdown']} and {paths['json']}")


def _vqa(args: argparse.Namespace) -> int:
    from pallava.eval.report import vqa_report, write_report
    from pallava.eval.runner import model_tokenize, run_vqa, with_option_orders
    from pallava.eval.tasks import load_vqa_items, model_prompt_style

    out = Path(args.out)
    items = load_vqa_items(
        args.data, args.format, args.split, args.image_root, out / "images", args.label_map, args.seed
    )
    items = with_option_orders(sample_items(items, args.limit, args.seed), args.option_orders, args.seed)
    # --prompt-style, else the model folder's (`paper` for a converted release), else the predictions file's
    style = args.prompt_style or model_prompt_style(args.model)
    assistant = _assistant(args)
    records = run_vqa(
        assistant,
        items,
        out / "predictions.jsonl",
        args.batch_size,
        args.max_new_tokens,
        progress=not args.no_progress,
        prompt_style=style,
        max_pixels=assistant.max_pixels,
    )
    # the folder's tokenizer counts the paper scorer's open recall (a finished run may no longer have it)
    tokenize = model_tokenize(args.model) if Path(args.model).is_dir() else None
    report = vqa_report(records, args.scorer, args.n_resamples, args.seed, tokenize=tokenize)
    report.update(
        model=str(args.model),
        data=str(args.data),
        split=args.split,
        prompt_style=records[0].get("prompt_style", "pallava") if records else style,
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
            extra = f", recall {block['recall']:.4f} ({block['recall_unit']})" if "recall" in block else ""
            print(f"{kind}: n={block['n']} accuracy {block['accuracy']:.4f}{extra} ({args.scorer})")
    _print_paths(paths)
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from pallava.data.importers.manifest import read_labelled_images
    from pallava.data.labels import LabelMap
    from pallava.eval.report import write_report, zeroshot_report
    from pallava.eval.runner import class_answering, run_zeroshot

    out = Path(args.out)
    images = sample_items(read_labelled_images(args.data, args.split), args.limit, args.seed)
    label_map = LabelMap.resolve(args.label_map, {item.label for item in images}, source="--label-map")
    assistant = _assistant(args)
    records = run_zeroshot(
        assistant,
        images,
        label_map,
        out / "predictions.jsonl",
        args.batch_size,
        args.max_new_tokens,
        progress=not args.no_progress,
        class_answers=args.class_answers,
        max_pixels=assistant.max_pixels,
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
        generation=class_answering(args.class_answers, args.max_new_tokens, args.batch_size),
    )
    paths = write_report(report, out, title=f"Zero-shot classification: {Path(args.data).name}")
    print(
        f"n={report['n']} accuracy {report['accuracy']:.4f} micro F1 {report['micro']['f1']:.4f} "
        f"macro F1 {report['macro']['f1']:.4f} unmapped {report['n_unmapped']}"
    )
    _print_paths(paths)
    return 0


def _suite(args: argparse.Namespace) -> int:
    from pallava.eval.suite import run_suite

    summary = run_suite(
        args.model,
        args.suite,
        args.out,
        plip_dir=args.plip,
        progress=not args.no_progress,
        limit=args.limit,
        device=args.device,
        stain_normalize=args.stain_normalize,
        max_pixels=args.max_pixels,
    )
    for row in summary["benchmarks"]:
        cells = [
            f"{key} {row[key][field]:.4f}"
            for key, field in (
                ("plip_zeroshot", "accuracy"),
                ("plip_matching", "accuracy"),
                ("closed", "accuracy"),
                ("open", "accuracy"),
                ("choice", "accuracy"),
                ("classification", "macro_f1"),
            )
            if row.get(key)
        ]
        print(f"{row['name']}: n={row['n']} " + ", ".join(cells))
    print(f"summary: {Path(args.out) / 'summary.md'} and {Path(args.out) / 'summary.json'}")
    return 0


def _slides(args: argparse.Namespace) -> int:
    from pallava.slides.evaluate import evaluate_slides
    from pallava.slides.report import METHODS, NAMES

    report = evaluate_slides(
        args.model,
        args.slides,
        args.out,
        args.plip,
        args.cache_dir,
        args.limit,
        args.n_resamples,
        args.seed,
        top_k=args.top_k,
        progress=not args.no_progress,
    )
    for method, metrics in report["methods"].items():
        shown = ", ".join(
            f"{NAMES[k]} {v['value']:.3f}" for k, v in metrics.items() if v["value"] is not None
        )
        print(f"{METHODS[method]}: {shown}")
    largest = max(report["scaling"], key=lambda row: row["tissue_tiles"])
    print(
        f"largest slide: {largest['tissue_tiles']} tiles in {largest['seconds']:.1f} s, "
        f"peak {largest['peak_rss_mib']:.0f} MiB"
    )
    print(f"report: {Path(args.out) / 'report.md'} and {Path(args.out) / 'report.json'}")
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
    add_stain_normalize_argument(parser)
    add_max_pixels_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava eval {score,vqa,zeroshot,suite,slides}`."""
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
        "--model",
        help="model folder whose tokenizer the paper scorer counts open recall in "
        "(the authors' recall); without it that recall counts whitespace words",
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
        "--prompt-style",
        choices=PROMPT_STYLES,
        help="pallava (our prompts: 'Answer yes or no.', an options block) or paper (the authors': the "
        "raw question, PMC-VQA choices as 'A:text'); default: the model folder's (paper for a "
        "converted release), else pallava",
    )
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
    zeroshot.add_argument(
        "--class-answers",
        choices=CLASS_ANSWERS,
        default="likelihood",
        help="likelihood: the class name the model is likeliest to answer, always one of the classes "
        "(default); generated: the greedy answer mapped to a class by its names, anything else wrong",
    )
    _run_options(zeroshot)
    zeroshot.set_defaults(func=_zeroshot)

    suite = commands.add_parser(
        "suite",
        help="run a list of benchmarks from a YAML file: per-dataset reports and "
        "one summary table (summary.md/.json/.png)",
    )
    suite.add_argument("--model", required=True, help="assistant model directory")
    suite.add_argument(
        "--suite",
        required=True,
        help="suite YAML (see configs/suite-dev.yaml); relative paths in it resolve against its folder",
    )
    suite.add_argument(
        "--out", required=True, help="output folder: OUT/<benchmark>/..., OUT/summary.{md,json,png}"
    )
    suite.add_argument(
        "--plip", help="PLIP model folder: adds PLIP zero-shot classification to labelled benchmarks"
    )
    suite.add_argument(
        "--limit",
        type=int,
        help="per benchmark, a seeded sample of this many images (manifests) or "
        "questions (VQA files); overrides the suite's limits",
    )
    suite.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    add_stain_normalize_argument(suite)
    add_max_pixels_argument(suite)
    suite.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    suite.set_defaults(func=_suite)

    slides = commands.add_parser(
        "slides",
        help="whole-slide questions on virtual slides: the slide model, "
        "attention-MIL and retrieve-then-ask, with localisation and scaling",
    )
    slides.add_argument("--model", required=True, help="slide model folder (pallava train --stage slide)")
    slides.add_argument(
        "--slides", required=True, help="folder of virtual slides (pallava data build --kind virtual-slides)"
    )
    slides.add_argument(
        "--out", required=True, help="report folder: report.json/.md, predictions.jsonl, scaling.png"
    )
    slides.add_argument(
        "--plip", help="PLIP folder for the baselines (default: the one the slide stage used)"
    )
    slides.add_argument(
        "--cache-dir", help="slide feature cache root (default: beside the vision-feature cache)"
    )
    slides.add_argument("--limit", type=int, help="only the this many slides with the fewest tiles")
    slides.add_argument("--top-k", type=int, default=3, help="tiles retrieve-then-ask asks about (default 3)")
    slides.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    slides.add_argument(
        "--n-resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    slides.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    slides.set_defaults(func=_slides)
