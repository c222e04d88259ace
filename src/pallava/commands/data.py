"""`pallava data`: import public formats, clean a corpus, build training sets, write shards."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from pallava.data.records import LabelledImage

BUILD_KINDS = ("captions", "vqa", "stage1", "stage2", "virtual-slides")


def _import(args: argparse.Namespace) -> int:
    from pallava.data.importers import import_records
    from pallava.data.io import write_jsonl

    records = import_records(
        args.format, args.input, image_root=args.image_root, image_dir=args.image_dir, split=args.split
    )
    count = write_jsonl(
        tqdm(records, desc=f"importing {args.format}", unit="rec", disable=args.no_progress), args.out
    )
    print(f"wrote {count} records to {args.out}")
    return 0


def _clean(args: argparse.Namespace) -> int:
    from pallava.data.clean import CleanConfig, clean, clean_on_ray

    config = CleanConfig.from_file(args.config) if args.config else CleanConfig()
    overrides = {
        "workers": args.workers,
        "min_words": args.min_words,
        "image_root": args.image_root,
        "shard_size": args.shard_size,
    }
    data = {**asdict(config), **{k: v for k, v in overrides.items() if v is not None}}
    if args.plip_model:
        data["image_judge"] = {
            **(data["image_judge"] if data["image_judge"].get("type") == "plip" else {}),
            "type": "plip",
            "model_dir": args.plip_model,
        }
    config = CleanConfig.from_dict(data, source=args.config or "command line")
    if config.image_judge.get("type") == "plip":
        import pallava.models.plip  # noqa: F401  (registers the loader of PLIP folders)
    if args.engine == "ray":
        summary = clean_on_ray(args.input, args.out, config, not args.no_progress, args.ray_address)
    else:
        summary = clean(args.input, args.out, config, progress=not args.no_progress)
    print(
        f"kept {summary['kept']} of {summary['input']} records "
        f"({summary['resumed_from']} were already done); report: {Path(args.out) / 'report.md'}"
    )
    return 0


def _labelled(path: str, split: str | None) -> list[LabelledImage]:
    from pallava.data.importers.manifest import holds_labelled_images, read_labelled_images
    from pallava.data.io import iter_records

    source = Path(path)
    if holds_labelled_images(source) and not any(source.glob("*.parquet")):  # a folder of shards: records
        return read_labelled_images(source, split)
    items = [LabelledImage.from_dict(r) for r in iter_records(source)]
    return [i for i in items if split is None or i.split == split]


def _parsed(path: str, record_type: type) -> Iterator:
    """Records of one type from any record file; a wrong record names the file and its position."""
    from pallava.data.io import iter_records

    for index, data in enumerate(iter_records(path)):
        try:
            yield record_type.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: record {index}: {error}") from None


def _labelled_sources(inputs: list[str], split: str | None, labels: str | None):
    """Labelled images of one or several sources (provenance kept) and the label map that covers them."""
    from pallava.data.datasets import merged_label_map, parse_data_args, read_labelled
    from pallava.data.labels import LabelMap

    manifests = [
        p
        for p in inputs
        if Path(p).suffix.lower() in (".csv", ".yaml", ".yml") or (Path(p) / "manifest.csv").is_file()
    ]
    if len(inputs) > 1 or manifests:
        if len(manifests) != len(inputs):
            raise ValueError(
                "several --input values must all be manifests (CSV, folder with manifest.csv or YAML list)"
            )
        datasets = parse_data_args(inputs)
        items = read_labelled(datasets, split)
        return items, merged_label_map(datasets, items, labels)
    items = _labelled(inputs[0], split)
    return items, LabelMap.resolve(labels, {item.label for item in items}, source="--labels")


def _build(args: argparse.Namespace) -> int:
    from itertools import chain

    from pallava.data import builders
    from pallava.data.io import write_jsonl
    from pallava.data.records import CaptionPair, VQAItem

    if args.kind == "virtual-slides":
        return _build_slides(args)
    if args.kind in ("captions", "vqa"):
        items, labels = _labelled_sources(args.input, args.split, args.labels)
        make = builders.captions_from_labels if args.kind == "captions" else builders.vqa_from_labels
        records = make(items, labels, seed=args.seed)
    elif args.kind == "stage1":
        captions = chain.from_iterable(_parsed(path, CaptionPair) for path in args.input)
        records = (builders.stage1_conversation(c, args.seed) for c in captions)
    else:
        questions = chain.from_iterable(_parsed(path, VQAItem) for path in args.input)
        records = (builders.stage2_conversation(item) for item in questions)
    count = write_jsonl(
        tqdm(records, desc=f"building {args.kind}", unit="rec", disable=args.no_progress), args.out
    )
    print(f"wrote {count} {args.kind} records to {args.out}")
    return 0


def _build_slides(args: argparse.Namespace) -> int:
    from pallava.slides.virtual import build_virtual_slides

    if args.n is None:
        raise ValueError("--kind virtual-slides needs --n N (the number of slides)")
    items, label_map = _labelled_sources(args.input, args.split, args.labels)
    slides = build_virtual_slides(
        items,
        label_map,
        args.n,
        args.out,
        seed=args.seed,
        tile=args.tile,
        mpp=args.mpp,
        min_tiles=args.min_tiles,
        max_tiles=args.max_tiles,
        progress=not args.no_progress,
        balanced=args.balanced,
    )
    tumour = sum(s["tumour_present"] for s in slides)
    tiles = [s["tissue_tiles"] for s in slides]
    print(
        f"wrote {len(slides)} virtual slides ({tumour} with tumour; {min(tiles)}-{max(tiles)} tissue tiles) "
        f"to {args.out}"
    )
    return 0


def _shard(args: argparse.Namespace) -> int:
    from pallava.data.io import iter_records
    from pallava.data.shards import write_shards

    shards = write_shards(
        iter_records(args.input),
        args.out,
        records_per_shard=args.shard_size,
        row_group_size=args.row_group_size,
        embed_images=args.embed_images,
        image_root=args.image_root,
        progress=not args.no_progress,
    )
    index = json.loads((Path(args.out) / "index.json").read_text())
    print(f"wrote {index['records']} records in {len(shards)} shards to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava data {import,clean,build,shard}`."""
    from pallava.data.importers import FORMATS
    from pallava.scale import add_engine_arguments

    parser = subparsers.add_parser("data", help="corpus building: import, clean, build training sets, shard")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    formats = "\n".join(f"  {name}: {text}" for name, text in FORMATS.items())
    imp = commands.add_parser(
        "import",
        help="convert a public dataset file into pallava records (JSONL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"formats:\n{formats}",
    )
    imp.add_argument(
        "--format", required=True, choices=list(FORMATS), metavar="FORMAT", help="input format (see below)"
    )
    imp.add_argument("--input", required=True, help="the dataset file (or folder for image-folder)")
    imp.add_argument("--out", required=True, help="output JSONL of records")
    imp.add_argument("--image-root", help="folder prefixed to relative image paths")
    imp.add_argument("--image-dir", help="folder to extract images embedded in Parquet into")
    imp.add_argument("--split", help="keep one split (manifest, pmc-vqa)")
    imp.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    imp.set_defaults(func=_import)

    cln = commands.add_parser(
        "clean", help="clean records into OUT/kept.jsonl and OUT/rejected.jsonl (resumable)"
    )
    cln.add_argument("--input", required=True, help="JSONL of records (captions, VQA items or conversations)")
    cln.add_argument("--out", required=True, help="output folder; re-running with the same folder resumes")
    cln.add_argument("--config", help="YAML/JSON cleaning config (stages, judges, thresholds)")
    cln.add_argument("--workers", type=int, help="image-decoding processes (default 2)")
    cln.add_argument("--min-words", type=int, help="minimum caption length in words (default 20)")
    cln.add_argument(
        "--image-root", help="folder relative image paths are resolved against (default: input's folder)"
    )
    cln.add_argument("--plip-model", help="trained PLIP folder: enables the PLIP zero-shot image judge")
    cln.add_argument("--shard-size", type=int, help="also write kept records as Parquet shards of this size")
    add_engine_arguments(cln, "decode and judge in this process")
    cln.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cln.set_defaults(func=_clean)

    bld = commands.add_parser(
        "build", help="build captions/VQA from labelled images, stage-1/2 conversations, or virtual slides"
    )
    bld.add_argument(
        "--kind",
        required=True,
        choices=BUILD_KINDS,
        help="captions|vqa: from labelled images; stage1: from captions; stage2: from VQA items",
    )
    bld.add_argument(
        "--input",
        "--data",
        dest="input",
        action="append",
        required=True,
        help="manifest CSV (or a folder holding manifest.csv), image folder, JSONL/shards of records, or a "
        "YAML dataset list; repeat for several datasets (each record keeps its dataset's name)",
    )
    bld.add_argument("--out", required=True, help="output JSONL (virtual-slides: output folder)")
    bld.add_argument(
        "--labels",
        help="built-in label map name or a JSON/YAML label file (default: the built-in "
        "map(s) covering the labels)",
    )
    bld.add_argument("--split", help="keep one split of the labelled images")
    bld.add_argument(
        "--seed", type=int, default=0, help="seed for phrasings, option order and image position"
    )
    bld.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    slides = bld.add_argument_group("virtual-slides (labelled manifests in; organs come from the label map)")
    slides.add_argument("--n", type=int, help="number of slides")
    slides.add_argument("--tile", type=int, default=224, help="tile side in pixels (default 224)")
    slides.add_argument(
        "--mpp", type=float, default=0.5, help="microns per pixel written into the slide (default 0.5)"
    )
    slides.add_argument(
        "--min-tiles", type=int, default=50, help="fewest tissue tiles per slide (default 50)"
    )
    slides.add_argument(
        "--max-tiles", type=int, default=1000, help="most tissue tiles per slide (default 1000)"
    )
    slides.add_argument(
        "--balanced",
        action="store_true",
        help="each organ's slides alternate between tumour and no tumour (default: 40%% without)",
    )
    bld.set_defaults(func=_build)

    shd = commands.add_parser("shard", help="write records as Parquet shards for streaming training")
    shd.add_argument("--input", required=True, help="JSONL/JSON of records")
    shd.add_argument("--out", required=True, help="empty output folder")
    shd.add_argument("--shard-size", type=int, default=10_000, help="records per shard (default 10000)")
    shd.add_argument(
        "--row-group-size",
        type=int,
        default=1_000,
        help="records per row group, the unit split across processes",
    )
    shd.add_argument("--embed-images", action="store_true", help="store image bytes in the shards")
    shd.add_argument("--image-root", help="folder relative image paths are resolved against")
    shd.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    shd.set_defaults(func=_shard)
