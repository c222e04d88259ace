"""Stain normalisation: map an H&E image onto reference stain vectors before a model reads it.

`stain_normalize(image, "macenko")` uses the reference H&E stain vectors and amounts of Macenko et al.
(2009), through torchstain: numpy only (no OpenCV), the published reference, no target image needed.

A model trained on normalised images must read normalised images, so the setting is recorded with the
vision tower (`stain_normalize` in its config, `recorded_stain_normalize`): PLIP training writes it, the
exported tower carries it into the assistant, and every image processor built from the model applies it
(docs/robustness.md). `--stain-normalize` on the commands overrides the recorded value (`none` turns it
off).
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

STAIN_NORMALIZERS = ("macenko",)
NO_NORMALIZATION = "none"  # the command-line value that switches a recorded normalisation off


def check_stain_normalize(method: object, field: str = "stain_normalize") -> str | None:
    """`method` if it names a normaliser (None: off); otherwise a ValueError naming `field`."""
    if method is None or method in STAIN_NORMALIZERS:
        return method
    raise ValueError(f"{field} must be null (off) or one of {', '.join(STAIN_NORMALIZERS)}, got {method!r}")


def resolve_stain_normalize(requested: str | None, recorded: str | None) -> str | None:
    """The normalisation to apply: the command line's (`none` = off) when given, else the model's."""
    if requested is None:
        return recorded
    return None if requested == NO_NORMALIZATION else check_stain_normalize(requested, "--stain-normalize")


def recorded_stain_normalize(vision_config: object) -> str | None:
    """The normalisation a vision tower was trained with (None for towers that record none)."""
    recorded = getattr(vision_config, "stain_normalize", None)
    return check_stain_normalize(recorded, "vision_config.stain_normalize")


def stain_normalize(image: Image.Image, method: str | None) -> Image.Image:
    """Map an RGB image onto reference H&E stain vectors (`macenko`); None returns it unchanged.

    An image with too little stained tissue to estimate stain vectors (e.g. blank glass) is returned
    unchanged with a warning, never dropped.
    """
    if method is None:
        return image
    if method not in STAIN_NORMALIZERS:
        raise ValueError(
            f"unknown stain normalisation {method!r}; choose one of {', '.join(STAIN_NORMALIZERS)}"
        )
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    pixels = np.asarray(image.convert("RGB"))
    try:
        with np.errstate(all="ignore"):
            normalized, _, _ = NumpyMacenkoNormalizer().normalize(pixels, stains=False)
    except (np.linalg.LinAlgError, ValueError, IndexError) as error:
        warnings.warn(
            f"stain normalisation skipped: too little stained tissue to estimate stains ({error})",
            stacklevel=2,
        )
        return image
    if not np.isfinite(normalized).all():
        return image
    return Image.fromarray(normalized)
