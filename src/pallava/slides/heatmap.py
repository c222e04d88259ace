"""Pictures of a mapped slide, pixel-aligned with the thumbnail: per-class heat maps and the tissue mask.

Drawn with Pillow (and a matplotlib colour map) rather than a plotting figure: a slide with 9 classes
renders in well under a second, and every picture keeps the thumbnail's geometry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from pallava.slides.tiling import TileGrid
from pallava.slides.tissue import TissueMask

OVERLAY_ALPHA = 0.55
LEGEND_HEIGHT = 44


def slug(name: str) -> str:
    """A file-name-safe version of a class name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def probability_grid(grid: TileGrid, values: np.ndarray) -> np.ndarray:
    """Scatter one value per tile into a (rows, cols) array; cells without a tile are NaN."""
    canvas = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    for tile, value in zip(grid.tiles, values, strict=True):
        canvas[tile.row, tile.col] = value
    return canvas


def _legend(width: int, title: str, colormap: str) -> Image.Image:
    """A strip with the title and a 0..1 colour bar."""
    strip = Image.new("RGB", (width, LEGEND_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=14)
    draw.text((6, 4), title, fill=(0, 0, 0), font=font)
    bar_width = max(40, min(240, width // 3))
    left = width - bar_width - 30
    ramp = (colormaps[colormap](np.linspace(0, 1, bar_width))[:, :3] * 255).astype(np.uint8)
    strip.paste(Image.fromarray(np.repeat(ramp[None], 12, axis=0)), (left, 6))
    draw.text((left - 14, 4), "0", fill=(0, 0, 0), font=font)
    draw.text((left + bar_width + 4, 4), "1", fill=(0, 0, 0), font=font)
    draw.text((6, 24), "probability per tile (uncoloured: no tissue tile)", fill=(90, 90, 90), font=font)
    return strip


def _with_legend(image: Image.Image, title: str, colormap: str = "viridis") -> Image.Image:
    framed = Image.new("RGB", (image.width, image.height + LEGEND_HEIGHT), (255, 255, 255))
    framed.paste(image, (0, 0))
    framed.paste(_legend(image.width, title, colormap), (0, image.height))
    return framed


def heatmap_overlay(
    thumbnail: Image.Image,
    thumb_downsample: float,
    grid: TileGrid,
    values: np.ndarray,
    colormap: str = "viridis",
) -> Image.Image:
    """The thumbnail with each tile's value (0..1) painted in `colormap`; cells without a tile stay as they are."""
    cells = probability_grid(grid, values)
    rgba = (colormaps[colormap](np.nan_to_num(cells, nan=0.0)) * 255).astype(np.uint8)
    rgba[..., 3] = np.where(np.isnan(cells), 0, round(OVERLAY_ALPHA * 255))
    cell = grid.level0_side / thumb_downsample  # tile side in thumbnail pixels
    size = (max(1, round(grid.cols * cell)), max(1, round(grid.rows * cell)))
    layer = Image.fromarray(rgba, mode="RGBA").resize(size, Image.Resampling.NEAREST)
    layer = layer.crop((0, 0, thumbnail.width, thumbnail.height))
    return Image.alpha_composite(thumbnail.convert("RGBA"), layer).convert("RGB")


def render_heatmap(
    thumbnail: Image.Image,
    thumb_downsample: float,
    grid: TileGrid,
    probabilities: np.ndarray,
    class_name: str,
    path: str | Path,
) -> Path:
    """Save the thumbnail with one class's tile probabilities overlaid, and a legend."""
    overlay = heatmap_overlay(thumbnail, thumb_downsample, grid, probabilities)
    _with_legend(overlay, f"P({class_name})").save(path, compress_level=3)
    return Path(path)


def render_tissue(thumbnail: Image.Image, mask: TissueMask, grid: TileGrid, path: str | Path) -> Path:
    """Save the thumbnail with the tissue mask tinted green and the kept tiles outlined."""
    image = thumbnail.convert("RGBA")
    tint = np.zeros((*mask.mask.shape, 4), dtype=np.uint8)
    tint[mask.mask] = (30, 200, 60, 90)
    tint_image = Image.fromarray(tint, mode="RGBA").resize(image.size, Image.Resampling.NEAREST)
    image = Image.alpha_composite(image, tint_image).convert("RGB")
    draw = ImageDraw.Draw(image)
    scale = image.width * mask.downsample / mask.mask.shape[1]  # level-0 px per output px
    for tile in grid.tiles:
        x0, y0 = tile.x / scale, tile.y / scale
        draw.rectangle((x0, y0, x0 + tile.w / scale, y0 + tile.h / scale), outline=(0, 0, 0), width=1)
    title = (
        f"tissue: {mask.fraction:.0%} of the thumbnail, {len(grid)} tiles of {grid.level0_side} level-0 px"
    )
    strip = Image.new("RGB", (image.width, 24), (255, 255, 255))
    ImageDraw.Draw(strip).text((6, 4), title, fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    framed = Image.new("RGB", (image.width, image.height + 24), (255, 255, 255))
    framed.paste(image, (0, 0))
    framed.paste(strip, (0, image.height))
    framed.save(path, compress_level=3)
    return Path(path)


def render_all(
    thumbnail: Image.Image,
    thumb_downsample: float,
    grid: TileGrid,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
) -> list[Path]:
    """One `heatmap_<class>.png` per class in `out_dir` (class index appended if two names share a slug)."""
    out_dir = Path(out_dir)
    slugs = [slug(name) for name in class_names]
    paths = []
    for index, name in enumerate(class_names):
        stem = slugs[index] if slugs.count(slugs[index]) == 1 else f"{slugs[index]}_{index}"
        path = out_dir / f"heatmap_{stem}.png"
        paths.append(render_heatmap(thumbnail, thumb_downsample, grid, probabilities[:, index], name, path))
    return paths
