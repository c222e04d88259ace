"""`pallava slide`: inspect a whole-slide image, map it with PLIP zero-shot, ask the assistant about regions."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from pallava.slides.reader import open_slide

    with open_slide(args.slide) as slide:
        if args.json:
            json.dump(slide.info.to_dict(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(slide.info.describe())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pallava slide {info,map,ask}`."""
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
