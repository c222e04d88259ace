"""Pictures of a mapped slide, pixel-aligned with the thumbnail: per-class heat maps and the tissue mask.

Drawn with Pillow (and a matplotlib colour map) rather than a plotting figure: a slide with 9 classes
renders in well under a second, and every picture keeps the thumbnail's geometry.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from pallava.slides.tiling import TileGrid
from pallava.slides.tissue import TissueMask

OVERLAY_ALPHA = 0.55


def slug(name: str) -> str:
    """A file-name-safe version of a class name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def probability_grid(grid: TileGrid, values: np.ndarray) -> np.ndarray:
    """Scatter one value per tile into a (rows, cols) array; cells without a tile are NaN."""
    canvas = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    for tile, value in zip(grid.tiles, values, strict=True):
        canvas[tile.row, tile.col] = value
    return canvas


def _caption(image: Image.Image, title: str, note: str = "", colormap: str | None = None) -> Image.Image:
    """`image` above a white strip with a title, an optional grey note and an optional 0..1 colour bar.

    Text scales with the image width so that it stays readable on large thumbnails.
    """
    size = max(12, image.width // 64)
    font = ImageFont.load_default(size=size)
    height = round(size * (3.0 if note else 1.8))
    framed = Image.new("RGB", (image.width, image.height + height), (255, 255, 255))
    framed.paste(image, (0, 0))
    draw = ImageDraw.Draw(framed)
    top = image.height + size // 3
    draw.text((size // 2, top), title, fill=(0, 0, 0), font=font)
    if note:
        draw.text((size // 2, top + round(size * 1.3)), note, fill=(90, 90, 90), font=font)
    if colormap:
        bar_width = max(40, image.width // 4)
        left = image.width - bar_width - 2 * size
        ramp = (colormaps[colormap](np.linspace(0, 1, bar_width))[:, :3] * 255).astype(np.uint8)
        framed.paste(Image.fromarray(np.repeat(ramp[None], size, axis=0)), (left, top))
        draw.text((left - size, top), "0", fill=(0, 0, 0), font=font)
        draw.text((left + bar_width + size // 3, top), "1", fill=(0, 0, 0), font=font)
    return framed


def heatmap_overlay(
    thumbnail: Image.Image,
    thumb_downsample: float,
    grid: TileGrid,
    values: np.ndarray,
    colormap: str = "viridis",
) -> Image.Image:
    """The thumbnail with each tile's value (0..1) painted in `colormap`; cells without a tile stay as they
    are."""
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
    note = "probability per tile; uncoloured: no tissue tile"
    _caption(overlay, f"P({class_name})", note, colormap="viridis").save(path, compress_level=3)
    return Path(path)


def render_tissue(thumbnail: Image.Image, mask: TissueMask, grid: TileGrid, path: str | Path) -> Path:
    """Save the thumbnail with the background (not tissue) tinted blue and the kept tiles outlined in
    green."""
    image = thumbnail.convert("RGBA")
    tint = np.zeros((*mask.mask.shape, 4), dtype=np.uint8)
    tint[~mask.mask] = (40, 90, 220, 70)  # tissue keeps its stain colours
    tint_image = Image.fromarray(tint, mode="RGBA").resize(image.size, Image.Resampling.NEAREST)
    image = Image.alpha_composite(image, tint_image).convert("RGB")
    draw = ImageDraw.Draw(image)
    scale = image.width * mask.downsample / mask.mask.shape[1]  # level-0 px per output px
    line = max(1, image.width // 500)
    for tile in grid.tiles:
        x0, y0 = tile.x / scale, tile.y / scale
        draw.rectangle((x0, y0, x0 + tile.w / scale, y0 + tile.h / scale), outline=(0, 130, 0), width=line)
    title = (
        f"tissue: {mask.fraction:.0%} of the thumbnail; {len(grid)} tiles of {grid.level0_side} level-0 px"
    )
    note = "blue: background (no tissue); green squares: the tiles kept"
    _caption(image, title, note).save(path, compress_level=3)
    return Path(path)


def render_all(
    thumbnail: Image.Image,
    thumb_downsample: float,
    grid: TileGrid,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    pool: Executor | None = None,
) -> list[Path] | list[Future[Path]]:
    """One `heatmap_<class>.png` per class in `out_dir` (class index appended if two names share a slug).

    With `pool` the pictures are drawn there and their futures returned, in class order.
    """
    out_dir = Path(out_dir)
    slugs = [slug(name) for name in class_names]
    jobs = []
    for index, name in enumerate(class_names):
        stem = slugs[index] if slugs.count(slugs[index]) == 1 else f"{slugs[index]}_{index}"
        path = out_dir / f"heatmap_{stem}.png"
        jobs.append((thumbnail, thumb_downsample, grid, probabilities[:, index], name, path))
    if pool is None:
        return [render_heatmap(*job) for job in jobs]
    return [pool.submit(render_heatmap, *job) for job in jobs]
