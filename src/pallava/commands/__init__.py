"""One module per `pallava` command group; options shared by several groups live here."""

from __future__ import annotations

import argparse

from pallava.processing.augment import STAIN_NORMALIZERS


def add_stain_normalize_argument(parser: argparse.ArgumentParser) -> None:
    """`--stain-normalize METHOD`: the same option wherever images are read for a model."""
    parser.add_argument(
        "--stain-normalize",
        choices=STAIN_NORMALIZERS,
        help="map each image onto reference H&E stain vectors first (default: off). Only for models trained "
        "on images normalised the same way: the demo's models, trained on unnormalised tiles, fall to near "
        "chance with it (docs/robustness.md)",
    )
