"""Stain-normalised reading: each file is normalised once and reused, a rewritten file is read again, the
pixel limit holds for reused images, and the memory budget evicts the least recently used."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pallava.processing import loading
from pallava.processing.loading import ImageTooLargeError, _NormalizedFiles, load_normalized


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every stain estimate made, by image size, in a fresh cache."""
    calls: list[tuple[int, int]] = []
    real = loading.stain_normalize

    def normalize(image: Image.Image, method: str | None) -> Image.Image:
        calls.append(image.size)
        return real(image, method)

    monkeypatch.setattr(loading, "stain_normalize", normalize)
    monkeypatch.setattr(loading, "_NORMALIZED_FILES", _NormalizedFiles())
    return calls


def test_a_file_is_normalised_once_and_read_again_when_rewritten(
    lung_tiles: list[Path], tmp_path: Path, counted: list
) -> None:
    path = tmp_path / "tile.png"
    Image.open(lung_tiles[0]).convert("RGB").save(path)
    first = load_normalized(path, "macenko")
    again = load_normalized(str(path), "macenko")  # the same file, named as a string
    assert again is first and len(counted) == 1
    assert not np.array_equal(np.asarray(first), np.asarray(Image.open(path).convert("RGB")))
    with pytest.raises(ImageTooLargeError, match="over the limit of 1,000"):
        load_normalized(path, "macenko", max_pixels=1_000)  # a reused image obeys the limit too
    Image.open(lung_tiles[1]).convert("RGB").save(path)
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    rewritten = load_normalized(path, "macenko")
    assert len(counted) == 2 and not np.array_equal(np.asarray(rewritten), np.asarray(first))
    image = Image.open(lung_tiles[0]).convert("RGB")
    load_normalized(image, "macenko")
    load_normalized(image, "macenko")  # a PIL image has no name to know it by: normalised each time
    assert len(counted) == 4
    assert load_normalized(path, None).size == (224, 224) and len(counted) == 4  # off: nothing to estimate


def test_the_pixel_budget_evicts_the_least_recently_used() -> None:
    files = _NormalizedFiles(max_pixels=3 * 100)
    images = {name: Image.new("RGB", (10, 10)) for name in "abcd"}
    for name in "abc":
        files.put((name,), images[name])
    assert files.get(("a",)) is images["a"]  # now the most recently used
    files.put(("d",), images["d"])
    assert files.get(("b",)) is None and [files.get((n,)) for n in "acd"] == [images[n] for n in "acd"]
    files.put(("big",), Image.new("RGB", (20, 20)))  # larger than the whole budget: not kept
    assert files.get(("big",)) is None and files.pixels == 300
