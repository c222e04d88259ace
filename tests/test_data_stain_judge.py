"""The H&E stain judge on real images: pathology tiles kept, non-pathology photographs rejected."""

from __future__ import annotations

import pytest

from pallava.data.clean.stain_judge import StainJudge, he_fraction
from pallava.processing.image import load_image


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
