"""A fast, model-free image judge for H&E-stained pathology: is the colour of the stained pixels H&E's?

Haematoxylin (blue-purple) and eosin (pink) put the stained pixels of an H&E image in the hue band
225-345 degrees. Natural photographs, fundus images and most other medical images have their coloured
pixels elsewhere (skin, sky, fur, the orange retina). The judge keeps an image when at least
`min_he_fraction` of its coloured pixels fall in that band. It recognises H&E only: immunohistochemistry
(brown DAB) is rejected, so use the PLIP or a VLM judge for corpora with other stains.

Microscope cameras tint the empty glass (green, cyan, yellow) by their white balance, and a faint stain
on a tinted background reads as "not H&E". So the image is white-balanced first: the median colour of its
pale, unsaturated pixels (the glass) is taken as white, unless that colour is itself in the H&E band (pale
eosin, not a cast).

Measured on the shared data (every 3rd-8th image of each set): LC25000 lung tiles score >= 0.46, colon
>= 0.99, the oral mucosa photomicrographs of another lab (OSCC, several with a green background) >= 0.47,
colorectal tiles >= 0.98, while the non-pathology samples score <= 0.13; the default threshold, 0.25,
sits between the two. Without the white balance, 9 of the 363 oral images scored 0.03-0.24 and were lost.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pallava.data.clean.verdict import Verdict
from pallava.processing.loading import DEFAULT_MAX_PIXELS, load_image

HE_HUE_DEGREES = (225.0, 345.0)


def white_balanced(image: Image.Image, thumbnail: int = 256) -> Image.Image:
    """A thumbnail whose glass is neutral: each channel scaled so the median pale, unsaturated pixel is grey.

    Left as it is when under 5% of the pixels are pale (a tile full of tissue) or when the pale colour lies
    in the H&E band (light eosin is stain, not a cast).
    """
    small = image.convert("RGB")
    small.thumbnail((thumbnail, thumbnail))
    rgb = np.asarray(small, dtype=np.float32)
    brightest, darkest = rgb.max(axis=2), rgb.min(axis=2)
    pale = (brightest >= 0.7 * 255) & ((brightest - darkest) < 0.25 * brightest)
    if pale.mean() < 0.05:
        return small
    white = np.median(rgb[pale], axis=0)
    hue = colorsys.rgb_to_hsv(*(white / 255.0))[0] * 360.0
    if HE_HUE_DEGREES[0] <= hue <= HE_HUE_DEGREES[1]:
        return small
    return Image.fromarray(np.clip(rgb * (white.mean() / np.maximum(white, 1.0)), 0, 255).astype(np.uint8))


def he_fraction(image: Image.Image, thumbnail: int = 256) -> float:
    """Share of coloured (not white, not black, not grey) pixels whose hue lies in the H&E band."""
    small = white_balanced(image, thumbnail)
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32)
    hue, saturation, value = hsv[..., 0] * (360.0 / 255.0), hsv[..., 1] / 255.0, hsv[..., 2] / 255.0
    coloured = (saturation > 0.08) & (value > 0.15) & (value < 0.92)
    if not coloured.any():
        return 1.0  # a blank slide background: no colour evidence against H&E
    in_band = (hue >= HE_HUE_DEGREES[0]) & (hue <= HE_HUE_DEGREES[1])
    return float(in_band[coloured].mean())


class StainJudge:
    """Keeps images whose stained pixels look like H&E (see module docstring)."""

    def __init__(self, min_he_fraction: float = 0.25, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        if not 0.0 < min_he_fraction <= 1.0:
            raise ValueError(f"min_he_fraction must be in (0, 1], got {min_he_fraction}")
        self.min_he_fraction = min_he_fraction
        self.max_pixels = max_pixels

    def judge_images(self, paths: Sequence[Path]) -> list[Verdict]:
        verdicts = []
        for path in paths:
            fraction = he_fraction(load_image(path, self.max_pixels))
            if fraction >= self.min_he_fraction:
                verdicts.append(Verdict(True, detail=f"H&E fraction {fraction:.2f}"))
            else:
                verdicts.append(
                    Verdict(
                        False,
                        "not H&E pathology (stain)",
                        f"H&E fraction {fraction:.2f} < {self.min_he_fraction}",
                    )
                )
        return verdicts
