"""The H&E stain judge on real images: pathology tiles kept, non-pathology photographs rejected."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pallava.data.clean.stain_judge import (
    HE_HUE_DEGREES,
    StainJudge,
    coloured_and_in_band,
    he_fraction,
    pale_pixels,
)
from pallava.processing.loading import load_image


def test_non_pathology_samples_are_rejected(shared_data):
    paths = sorted((shared_data / "samples" / "non-pathology").iterdir())
    assert len(paths) == 5
    verdicts = StainJudge().judge_images(paths)
    assert [v.ok for v in verdicts] == [False] * 5
    assert all("H&E fraction" in v.detail for v in verdicts)


def test_he_tiles_are_kept(shared_data):
    lung = sorted((shared_data / "lc25000-lung" / "images").glob("*/*.jpeg"))[::60]
    crc = sorted((shared_data / "samples" / "crc").iterdir())
    verdicts = StainJudge().judge_images(lung + crc)
    assert all(v.ok for v in verdicts), [v.detail for v in verdicts if not v.ok]


def test_scores_separate_with_a_margin(shared_data):
    lowest_tile = min(
        he_fraction(load_image(p))
        for p in sorted((shared_data / "lc25000-lung" / "images").glob("*/*.jpeg"))[::100]
    )
    highest_photo = max(
        he_fraction(load_image(p)) for p in (shared_data / "samples" / "non-pathology").iterdir()
    )
    assert lowest_tile - highest_photo > 0.2


def test_threshold_is_validated():
    with pytest.raises(ValueError, match="min_he_fraction"):
        StainJudge(min_he_fraction=0)


def test_another_labs_tinted_glass_is_not_mistaken_for_another_stain(shared_data):
    """Oral mucosa photomicrographs whose camera tints the empty glass green are H&E all the same."""
    oral = sorted((shared_data / "oscc" / "images").glob("*/*.jpg"))
    green = [p for p in oral if p.name in {f"Normal_100x_{i}.jpg" for i in (16, 18, 19, 20, 21)}]
    assert len(green) == 5
    verdicts = StainJudge().judge_images(oral)
    assert all(v.ok for v in verdicts), [
        (p.name, v.detail) for p, v in zip(oral, verdicts, strict=True) if not v.ok
    ]

    # the same tiles with a yellow cast added to everything: still kept; photographs with it: still rejected
    def yellowed(path):
        image = np.asarray(load_image(path), dtype=np.float32) * [1.0, 1.0, 0.9]
        return Image.fromarray(image.astype(np.uint8))

    assert min(he_fraction(yellowed(p)) for p in green) >= 0.25
    photos = sorted((shared_data / "samples" / "non-pathology").iterdir())
    assert max(he_fraction(yellowed(p)) for p in photos) < 0.25


def test_integer_thresholds_pick_the_pixels_of_the_float_definitions():
    """The judge compares 8-bit values; every possible value selects as the definitions in floats do."""
    values = np.arange(256, dtype=np.uint8)
    grid = np.stack(np.meshgrid(values, values, values, indexing="ij"), axis=-1)  # every 8-bit triple

    rgb = grid.astype(np.float32)
    brightest, darkest = rgb.max(-1), rgb.min(-1)
    pale = (brightest >= 0.7 * 255) & ((brightest - darkest) < 0.25 * brightest)
    assert np.array_equal(pale_pixels(grid), pale)

    hue, saturation, value = rgb[..., 0] * (360.0 / 255.0), rgb[..., 1] / 255.0, rgb[..., 2] / 255.0
    coloured, in_band = coloured_and_in_band(grid)  # read as (hue, saturation, value)
    assert np.array_equal(coloured, (saturation > 0.08) & (value > 0.15) & (value < 0.92))
    assert np.array_equal(in_band, (hue >= HE_HUE_DEGREES[0]) & (hue <= HE_HUE_DEGREES[1]))
