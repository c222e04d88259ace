"""A grid of square tiles at a requested physical resolution, keeping only tiles that hold tissue.

Tile boxes are in level-0 pixels (the coordinates QuPath and OpenSlide use); each tile is read at
the best pyramid level and resized to `tile_size`, so memory depends on the batch, not the slide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image
from tqdm import tqdm

from pallava.slides.reader import Slide
from pallava.slides.tissue import TissueMask

# A requested resolution may be this much finer than the scan before we refuse to upsample.
MPP_TOLERANCE = 0.1
T = TypeVar("T")


@dataclass(frozen=True)
class Tile:
    """One square tile: its level-0 box, grid position and tissue share."""

    x: int
    y: int
    w: int
    h: int
    col: int
    row: int
    tissue: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h


@dataclass
class TileGrid:
    """The tissue tiles of a slide at `mpp` microns per pixel, each `tile_size` px on a side."""

    tiles: list[Tile]
    tile_size: int  # output pixels fed to the model
    mpp: float  # microns per output pixel
    level0_side: int  # tile side in level-0 pixels
    cols: int
    rows: int
    slide_size: tuple[int, int]  # level-0 (width, height); edge tiles may run past it

    def __len__(self) -> int:
        return len(self.tiles)

    def clipped_box(self, tile: Tile) -> tuple[int, int, int, int]:
        """The part of `tile` that lies on the slide, as a level-0 (x, y, w, h) box."""
        width, height = self.slide_size
        return tile.x, tile.y, min(tile.w, width - tile.x), min(tile.h, height - tile.y)


def tile_grid(
    slide: Slide,
    mask: TissueMask,
    mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.25,
    base_mpp: float | None = None,
) -> TileGrid:
    """Lay a grid of `tile_size`-pixel tiles at `mpp` over the slide and keep those with >= `min_tissue`
    tissue.

    Edge tiles that run past the slide are kept (the outside reads as white) so that tissue
    touching the border is covered. `base_mpp` overrides the slide's own microns per pixel.
    """
    if tile_size < 8:
        raise ValueError(f"--tile must be at least 8 pixels, got {tile_size}")
    if mpp <= 0:
        raise ValueError(f"--mpp must be positive, got {mpp}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"--min-tissue must be between 0 and 1, got {min_tissue}")
    slide_mpp = slide.mpp(base_mpp)
    if mpp < slide_mpp * (1 - MPP_TOLERANCE):
        raise ValueError(
            f"{slide.path}: requested {mpp} microns/pixel is finer than the scan ({slide_mpp:.4f}); "
            f"use --mpp {slide_mpp:.3g} or coarser"
        )
    side = max(1, round(tile_size * mpp / slide_mpp))
    width, height = slide.dimensions
    cols, rows = math.ceil(width / side), math.ceil(height / side)
    tiles = []
    for row in range(rows):
        for col in range(cols):
            x, y = col * side, row * side
            tissue = mask.box_fraction(x, y, side, side)
            if tissue >= min_tissue and tissue > 0:
                tiles.append(Tile(x=x, y=y, w=side, h=side, col=col, row=row, tissue=round(tissue, 4)))
    return TileGrid(
        tiles=tiles,
        tile_size=tile_size,
        mpp=mpp,
        level0_side=side,
        cols=cols,
        rows=rows,
        slide_size=(width, height),
    )


def read_tile(slide: Slide, tile: Tile, tile_size: int) -> Image.Image:
    """The RGB image of one tile, exactly as the model sees it."""
    return slide.read_region_scaled(tile.x, tile.y, tile.w, tile.h, (tile_size, tile_size))


def iter_tile_batches(
    slide: Slide,
    tiles: Sequence[Tile],
    tile_size: int,
    batch_size: int = 64,
    progress: str | None = "tiles",
    workers: int = 4,
    transform: Callable[[Image.Image], T] | None = None,
) -> Iterator[tuple[list[Tile], list[T]]]:
    """Stream (tiles, images) batches in order, reading the next batch in `workers` threads meanwhile.

    At most two batches of tile images are in memory at once. OpenSlide releases the GIL while it
    decodes, so the reads overlap with each other and with the model working on the current batch.
    `transform` (e.g. the encoder's normalisation) runs in the same threads, so the model's thread only
    stacks and encodes.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    bar = tqdm(total=len(tiles), desc=progress, unit="tile", disable=progress is None)

    def read(tile: Tile) -> Image.Image | T:
        image = read_tile(slide, tile, tile_size)
        return image if transform is None else transform(image)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(start: int) -> list[Future]:
            return [pool.submit(read, tile) for tile in tiles[start : start + batch_size]]

        pending = submit(0)
        try:
            for start in range(0, len(tiles), batch_size):
                images = [future.result() for future in pending]
                pending = submit(start + batch_size)
                yield list(tiles[start : start + batch_size]), images
                bar.update(len(images))
        finally:
            for future in pending:
                future.cancel()
            bar.close()
