"""Pictures of a mapped slide: per-class probability heat maps and the tissue mask, over the thumbnail."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from pallava.slides.tiling import TileGrid
from pallava.slides.tissue import TissueMask


def slug(name: str) -> str:
    """A file-name-safe version of a class name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "class"


def probability_grid(grid: TileGrid, values: np.ndarray) -> np.ndarray:
    """Scatter one value per tile into a (rows, cols) array; cells without a tile are NaN."""
    canvas = np.full((grid.rows, grid.cols), np.nan, dtype=np.float32)
    for tile, value in zip(grid.tiles, values, strict=True):
        canvas[tile.row, tile.col] = value
    return canvas


def _figure(thumbnail: Image.Image, width: int, height: int, title: str):
    aspect = thumbnail.height / max(thumbnail.width, 1)
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    fig = Figure(figsize=(7, 7 * aspect + 0.6), dpi=120)
    ax = fig.add_subplot()
    ax.imshow(thumbnail, extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    return fig, ax


def render_heatmap(
    thumbnail: Image.Image,
    slide_size: tuple[int, int],
    grid: TileGrid,
    probabilities: np.ndarray,
    class_name: str,
    path: str | Path,
) -> Path:
    """Save the thumbnail with one class's tile probabilities overlaid (viridis, 0..1, with a colour bar)."""
    width, height = slide_size
    fig, ax = _figure(thumbnail, width, height, f"P({class_name}) per tile")
    side = grid.level0_side
    image = ax.imshow(
        np.ma.masked_invalid(probability_grid(grid, probabilities)),
        extent=(0, grid.cols * side, grid.rows * side, 0),
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        alpha=0.55,
        interpolation="nearest",
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="probability")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def render_tissue(
    thumbnail: Image.Image, slide_size: tuple[int, int], mask: TissueMask, grid: TileGrid, path: str | Path
) -> Path:
    """Save the thumbnail with the tissue mask tinted and the kept tiles outlined."""
    width, height = slide_size
    fig, ax = _figure(
        thumbnail, width, height, f"tissue ({mask.fraction:.0%} of thumbnail), {len(grid)} tiles"
    )
    tint = np.zeros((*mask.mask.shape, 4), dtype=np.float32)
    tint[mask.mask] = (0.1, 0.8, 0.2, 0.35)
    ax.imshow(tint, extent=(0, mask.mask.shape[1] * mask.downsample, mask.mask.shape[0] * mask.downsample, 0))
    boxes = [Rectangle((tile.x, tile.y), tile.w, tile.h) for tile in grid.tiles]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="black", linewidth=0.4))
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def render_all(
    thumbnail: Image.Image,
    slide_size: tuple[int, int],
    grid: TileGrid,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
) -> list[Path]:
    """One `heatmap_<class>.png` per class in `out_dir`."""
    out_dir = Path(out_dir)
    return [
        render_heatmap(
            thumbnail, slide_size, grid, probabilities[:, index], name, out_dir / f"heatmap_{slug(name)}.png"
        )
        for index, name in enumerate(class_names)
    ]
