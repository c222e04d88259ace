"""One module per `pallava` command group; options shared by several groups live here."""

from __future__ import annotations

import argparse

from pallava.processing.stain_norm import NO_NORMALIZATION, STAIN_NORMALIZERS


def add_stain_normalize_argument(parser: argparse.ArgumentParser) -> None:
    """`--stain-normalize METHOD`: the same option wherever images are read for a model."""
    parser.add_argument(
        "--stain-normalize",
        choices=(*STAIN_NORMALIZERS, NO_NORMALIZATION),
        help="map each image onto reference H&E stain vectors first (default: what the model was trained "
        "with, recorded in its config: a PLIP or assistant trained with `stain_normalize: macenko` applies "
        "it by itself; none: off). Only for models trained on images normalised the same way: the demo's "
        "models, trained on unnormalised tiles, fall to near chance with it (docs/robustness.md)",
    )


def add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """`--max-pixels N`: the same option wherever a dataset's images are read for evaluation."""
    parser.add_argument(
        "--max-pixels",
        type=int,
        help="largest image (width x height) to read (default: the model's limit, 16,777,216 = 4096 x 4096 "
        "unless it records another); every image is checked before the first answer, and one error names "
        "all that are missing, undecodable or larger",
    )
