"""The benchmark's inputs: real pathology images from the shared data folder, decoded once into memory.

Cases: `real mix` (the 9 NCT-CRC tiles, a 500x300 H&E and a 512x512 IHC image), `224x224` (LC25000 dev
tiles), and `1024x768` / `2048x1536` (level-0 crops of the CMU-1 whole-slide image). Where the shared
folder is missing (a user's machine), seeded noise images of the same sizes stand in, flagged as
`synthetic` in the results.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import ROOT
from pallava.processing.loading import load_image

SHARED_DATA = ROOT.parent / "shared" / "data"
SIZES = ("224x224", "1024x768", "2048x1536")  # the sizes every latency number is reported at
WSI = Path("samples") / "wsi" / "cmu_small_region.svs"


@dataclass
class ImageCase:
    """A named list of decoded RGB images and where they came from."""

    name: str
    images: list[Image.Image]
    source: str

    @property
    def sizes(self) -> list[str]:
        return sorted({f"{im.width}x{im.height}" for im in self.images})


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _wsi_crop(path: Path, width: int, height: int) -> Image.Image:
    from pallava.slides.reader import open_slide

    with open_slide(path) as slide:
        full_w, full_h = slide.dimensions
        if width > full_w or height > full_h:
            raise ValueError(f"{path} is {full_w}x{full_h}; cannot crop {width}x{height} from it")
        x, y = (full_w - width) // 2, (full_h - height) // 2
        return slide.read_region_scaled(x, y, width, height, (width, height))


def _lc25000_dev(root: Path, count: int) -> list[Image.Image]:
    with (root / "manifest.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "dev"]
    if len(rows) < count:
        raise ValueError(f"{root / 'manifest.csv'}: expected at least {count} dev rows, found {len(rows)}")
    return [load_image(root / row["path"]) for row in rows[:count]]


def image_cases(data_dir: Path = SHARED_DATA, tiles: int = 8) -> dict[str, ImageCase]:
    """The four cases, real where `data_dir` holds the shared data, synthetic otherwise."""
    if not data_dir.is_dir():
        cases = {
            "real mix": ImageCase(
                "real mix",
                [_noise(224, 224, i) for i in range(9)] + [_noise(500, 300, 9), _noise(512, 512, 10)],
                "synthetic",
            )
        }
        cases["224x224"] = ImageCase("224x224", [_noise(224, 224, 20 + i) for i in range(tiles)], "synthetic")
        for name in SIZES[1:]:
            width, height = map(int, name.split("x"))
            cases[name] = ImageCase(name, [_noise(width, height, width)], "synthetic")
        return cases
    samples = data_dir / "samples"
    mix = [load_image(p) for p in sorted((samples / "crc").iterdir())]
    mix += [
        load_image(samples / "pathology" / "stardist_histo.jpg"),
        load_image(samples / "pathology" / "skimage_ihc.png"),
    ]
    cases = {
        "real mix": ImageCase("real mix", mix, "NCT-CRC-HE tiles, stardist H&E, scikit-image IHC"),
        "224x224": ImageCase(
            "224x224", _lc25000_dev(data_dir / "lc25000-lung", tiles), "LC25000 lung dev tiles"
        ),
    }
    for name in SIZES[1:]:
        width, height = map(int, name.split("x"))
        cases[name] = ImageCase(name, [_wsi_crop(data_dir / WSI, width, height)], "CMU-1 slide, level-0 crop")
    return cases
