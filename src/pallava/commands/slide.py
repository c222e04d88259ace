"""`pallava slide`: inspect a whole-slide image, map it with PLIP zero-shot, ask the assistant about
regions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from pallava.slides.reader import open_slide

    with open_slide(args.slide) as slide:
        if args.json:
            json.dump(slide.info.to_dict(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(slide.info.describe())
    return 0


def _options(args: argparse.Namespace):
    from pallava.slides.mapping import TilingOptions

    return TilingOptions(
        mpp=args.mpp, tile_size=args.tile, min_tissue=args.min_tissue, base_mpp=args.base_mpp
    )


def _load_plip(model_dir: str, device: str):
    from pallava.models.plip.zeroshot import PlipZeroShot
    from pallava.slides.mapping import model_fingerprint

    if not Path(model_dir).is_dir():
        raise ValueError(f"PLIP model folder {model_dir} does not exist")
    return PlipZeroShot.from_pretrained(model_dir, device=device), model_fingerprint(model_dir)


def _map_cohort(args: argparse.Namespace) -> int:
    from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES
    from pallava.slides.cohort import REPORT, SUMMARY_CSV, CohortSettings, map_cohort
    from pallava.slides.mapping import load_classes

    settings = CohortSettings(
        _options(args),
        load_classes(args.classes),
        tuple(args.template or ZEROSHOT_TEMPLATES),
        args.batch_size,
        args.device,
    )

    def show(row: dict) -> None:
        detail = f"{row['tiles']} tiles" if row["status"] != "failed" else row["error"]
        print(f"{row['id']}: {row['status']} ({detail})", flush=True)

    rows = map_cohort(
        args.cohort,
        args.model,
        args.out,
        settings,
        args.engine,
        args.ray_address,
        args.workers,
        progress=show,
    )
    failed = sum(row["status"] == "failed" for row in rows)
    out = Path(args.out)
    print(
        f"{len(rows) - failed} of {len(rows)} slides mapped; "
        f"summary: {out / SUMMARY_CSV}, report: {out / REPORT}"
    )
    return 1 if failed else 0


def _map(args: argparse.Namespace) -> int:
    from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES
    from pallava.slides.mapping import load_classes, map_slide
    from pallava.slides.reader import open_slide

    if args.cohort:
        return _map_cohort(args)
    if args.engine != "local" or args.ray_address or args.workers:
        raise ValueError(
            "--engine, --ray-address and --workers apply to --cohort; a single slide maps locally"
        )
    label_map = load_classes(args.classes)
    with open_slide(args.slide) as slide:
        plip, model_id = _load_plip(args.model, args.device)
        templates = args.template or ZEROSHOT_TEMPLATES
        try:
            result = map_slide(
                slide, plip, label_map, args.out, model_id, _options(args), args.batch_size, templates
            )
        except KeyboardInterrupt:
            cache = Path(args.out) / "embeddings"
            print(
                f"interrupted; the tiles embedded so far are cached in {cache}: run the same command to "
                "resume",
                file=sys.stderr,
            )
            return 130
    grid = result.prepared.grid
    print(
        f"{len(grid)} tissue tiles of {grid.tile_size} px at {grid.mpp} um/px "
        f"({grid.level0_side} level-0 px each); {len(result.class_names)} classes"
    )
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from pallava.inference import PaLlava
    from pallava.slides.ask import ask_regions, parse_region, retrieve_regions
    from pallava.slides.cache import EmbeddingCache
    from pallava.slides.mapping import cache_meta, embed_grid, prepare_slide
    from pallava.slides.reader import open_slide

    if args.query is not None and not args.plip:
        raise ValueError("--query needs --plip PLIP_DIR: the regions are retrieved with PLIP's text encoder")
    out = Path(args.out)
    if args.region is None and args.query is None:
        return _ask_whole(args, out)
    with open_slide(args.slide) as slide:
        if args.region is not None:
            regions = [parse_region(args.region)]
        else:
            plip, model_id = _load_plip(args.plip, args.device)
            grid = prepare_slide(slide, _options(args)).grid
            folder = Path(args.embeddings) if args.embeddings else out / "embeddings"
            vectors = embed_grid(slide, grid, plip, EmbeddingCache(folder, cache_meta(slide, grid, model_id)))
            regions = retrieve_regions(grid, vectors, plip, args.query, args.top_k)
        assistant = PaLlava.from_pretrained(args.model, device=args.device)
        answers = ask_regions(
            slide, assistant, regions, args.question, out, args.max_side, args.max_new_tokens
        )
    for item in answers:
        region = item.region
        score = f" (PLIP similarity {region.score:.3f})" if region.score is not None else ""
        print(f"region x={region.x} y={region.y} w={region.w} h={region.h}{score}: {item.answer}")
        print(f"  crop: {item.crop}")
    print(f"answers: {out / 'answers.json'}")
    return 0


def _ask_whole(args: argparse.Namespace, out: Path) -> int:
    from pallava.slides.model import SlideAssistant
    from pallava.slides.reader import open_slide
    from pallava.slides.whole import ask_whole_slide, tiling_of

    slide_model = SlideAssistant.from_pretrained(args.model, device=args.device)
    if not slide_model.settings:
        print(f"warning: {args.model} was not trained with `pallava train --stage slide`; "
              "its tile positions are "
              "not learned", file=sys.stderr)  # fmt: skip
    # The model's trained tiling wins over the flags' defaults; flags given with other values override it.
    given = {
        "mpp": args.mpp,
        "tile_size": args.tile,
        "min_tissue": args.min_tissue,
        "base_mpp": args.base_mpp,
    }
    overrides = {k: v for k, v in given.items() if v != TILING_DEFAULTS.get(k)}
    with open_slide(args.slide) as slide:
        result = ask_whole_slide(
            slide_model,
            slide,
            [args.question],
            out,
            options=tiling_of(slide_model, overrides),
            max_new_tokens=args.max_new_tokens,
        )
    print(f"slide ({len(result.features)} tissue tiles): {result.answers[0]}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    return 0


TILING_DEFAULTS = {"mpp": 0.5, "tile_size": 224, "min_tissue": 0.25, "base_mpp": None}


def _tiling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mpp",
        type=float,
        default=TILING_DEFAULTS["mpp"],
        help="microns per pixel of the tiles (default 0.5, ~20x)",
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=TILING_DEFAULTS["tile_size"],
        help="tile side in pixels at --mpp (default 224)",
    )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=TILING_DEFAULTS["min_tissue"],
        help="keep tiles with at least this tissue share",
    )
    parser.add_argument(
        "--base-mpp", type=float, help="the scan's microns per pixel, for slides that do not record it"
    )
    parser.add_argument("--device", default="cpu", help="torch device for the models (default cpu)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava slide {info,map,ask}`."""
    from pallava.scale import add_engine_arguments

    parser = subparsers.add_parser(
        "slide", help="whole-slide images: info, tissue map, questions about regions"
    )
    commands = parser.add_subparsers(dest="slide_command", metavar="SUBCOMMAND", required=True)

    info = commands.add_parser("info", help="dimensions, levels, microns per pixel and vendor of a slide")
    info.add_argument(
        "slide", help="slide file (SVS, NDPI, MRXS, SCN, tiled TIFF, ... anything OpenSlide reads)"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_info)

    mapping = commands.add_parser(
        "map", help="tissue tiles -> PLIP zero-shot class probabilities: heat maps, GeoJSON, embeddings"
    )
    which = mapping.add_mutually_exclusive_group(required=True)
    which.add_argument("--slide", help="slide file")
    which.add_argument(
        "--cohort", help="CSV of slides (columns path, optional id and mpp): one map per slide"
    )
    mapping.add_argument("--model", required=True, help="PLIP model folder (pallava plip train / convert)")
    mapping.add_argument("--out", required=True, help="output folder (re-using it resumes the embeddings)")
    add_engine_arguments(mapping, "cohorts: map the slides one after another in this process")
    mapping.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, else one per CPU)")
    mapping.add_argument(
        "--classes",
        help="built-in label map (nct-crc-he, lc25000-lung), a JSON/YAML label map, or a text file with one "
        "class name per line (default nct-crc-he)",
    )
    mapping.add_argument(
        "--template",
        action="append",
        help="zero-shot prompt template with {name} (repeatable; default: the built-in ensemble of six)",
    )
    mapping.add_argument("--batch-size", type=int, default=64, help="tiles per PLIP batch (default 64)")
    _tiling_arguments(mapping)
    mapping.set_defaults(func=_map)

    ask = commands.add_parser(
        "ask",
        help="ask about the whole slide (a slide-stage model; writes the attention heat map), a region, "
        "or the regions PLIP finds for a text",
    )
    ask.add_argument("--slide", required=True, help="slide file")
    ask.add_argument("--model", required=True, help="assistant model folder")
    where = ask.add_mutually_exclusive_group()
    where.add_argument(
        "--region", help="x,y,w,h in level-0 pixels (neither --region nor --query: the whole slide)"
    )
    where.add_argument("--query", help="text describing the regions to find (needs --plip)")
    ask.add_argument("--top-k", type=int, default=3, help="regions to retrieve for --query (default 3)")
    ask.add_argument("--plip", help="PLIP model folder for --query")
    ask.add_argument(
        "--embeddings", help="embedding cache folder to reuse (e.g. OUT/embeddings of `slide map`)"
    )
    ask.add_argument("--out", default="slide_answers", help="folder for the crops and answers.json")
    ask.add_argument(
        "--max-side", type=int, default=2048, help="longest side of a region crop shown to the model"
    )
    ask.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit in tokens")
    _tiling_arguments(ask)
    ask.add_argument("question", help="the question to ask about each region")
    ask.set_defaults(func=_ask)
