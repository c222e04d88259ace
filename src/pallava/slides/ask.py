"""Questions about slide regions: a region given in level-0 pixels, or the top-K tiles PLIP retrieves for a
text.

Regions are read at the pyramid level that gives at most `max_side` pixels on the longest side (the
assistant's tiling cannot use more), so a region of any size costs bounded memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pallava.inference import PaLlava
from pallava.models.plip.zeroshot import PlipZeroShot
from pallava.slides.reader import Slide
from pallava.slides.tiling import TileGrid

# Longest side of a region crop handed to the assistant: its largest tile grid (8 x 224) plus margin.
DEFAULT_MAX_SIDE = 2048


@dataclass(frozen=True)
class Region:
    """A level-0 box; `score` is PLIP's query similarity when the region was retrieved."""

    x: int
    y: int
    w: int
    h: int
    score: float | None = None


@dataclass
class RegionAnswer:
    """One region, the crop that was shown to the assistant, and its answer."""

    region: Region
    crop: Path
    crop_size: tuple[int, int]
    answer: str

    def to_dict(self) -> dict:
        return {
            **asdict(self.region),
            "crop": str(self.crop),
            "crop_size": list(self.crop_size),
            "answer": self.answer,
        }


def parse_region(text: str) -> Region:
    """Parse 'x,y,w,h' (level-0 pixels)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        x, y, w, h = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--region {text!r}: expected four integers x,y,w,h in level-0 pixels") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"--region {text!r}: width and height must be positive")
    return Region(x, y, w, h)


def check_inside(slide: Slide, region: Region) -> None:
    """Raise a clear error when the region is not inside the slide's level-0 bounds."""
    width, height = slide.dimensions
    if region.x < 0 or region.y < 0 or region.x + region.w > width or region.y + region.h > height:
        raise ValueError(
            f"region {region.x},{region.y},{region.w},{region.h} is outside {slide.path.name} "
            f"({width} x {height} px at level 0)"
        )


def read_region_for_assistant(slide: Slide, region: Region, max_side: int = DEFAULT_MAX_SIDE) -> Image.Image:
    """The region's pixels, shrunk (aspect kept) so the longest side is at most `max_side`."""
    check_inside(slide, region)
    scale = min(1.0, max_side / max(region.w, region.h))
    size = (max(1, round(region.w * scale)), max(1, round(region.h * scale)))
    return slide.read_region_scaled(region.x, region.y, region.w, region.h, size)


def retrieve_regions(
    grid: TileGrid, vectors: np.ndarray, plip: PlipZeroShot, query: str, top_k: int
) -> list[Region]:
    """The `top_k` tiles whose PLIP embeddings are most similar to the text `query`, best first.

    Edge tiles are clipped to the slide, so every region can be read and asked about.
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if not query.strip():
        raise ValueError("--query must not be empty")
    text = plip.encode_texts([query])[0].numpy()
    similarity = vectors @ text  # (N,) cosine: both sides are L2-normalised
    order = np.argsort(-similarity, kind="stable")[:top_k]
    return [Region(*grid.clipped_box(grid.tiles[i]), score=round(float(similarity[i]), 6)) for i in order]


def ask_regions(
    slide: Slide,
    assistant: PaLlava,
    regions: Sequence[Region],
    question: str,
    out_dir: str | Path,
    max_side: int = DEFAULT_MAX_SIDE,
    max_new_tokens: int = 128,
) -> list[RegionAnswer]:
    """Ask `question` about each region (one at a time, bounded memory); save crops and `answers.json`."""
    if not question.strip():
        raise ValueError("the question must not be empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for region in regions:
        check_inside(slide, region)
    answers = []
    for index, region in enumerate(tqdm(regions, desc="asking", unit="region"), start=1):
        crop = read_region_for_assistant(slide, region, max_side)
        path = out_dir / f"region_{index:02d}_x{region.x}_y{region.y}_w{region.w}_h{region.h}.png"
        crop.save(path)
        with torch.inference_mode():
            answer = assistant.ask(crop, question, max_new_tokens=max_new_tokens)
        answers.append(RegionAnswer(region=region, crop=path, crop_size=crop.size, answer=answer))
    record = {"slide": str(slide.path), "question": question, "regions": [a.to_dict() for a in answers]}
    (out_dir / "answers.json").write_text(json.dumps(record, indent=2))
    return answers
