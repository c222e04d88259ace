"""A virtual slide's pixels: a pyramidal tiled TIFF (levels at downsamples 1, 4, 16, ...) that OpenSlide
reads as a generic tiled TIFF, its level-0 tiles the source images' own pixels (lossless zlib)."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

GLASS = 243  # grey level of empty glass (OpenSlide's outside-the-scan white is 255)
PYRAMID_STEP = 4
ZLIB_LEVEL = 1
WRITE_THREADS = 2  # tiles decoded and compressed in threads (PIL and zlib release the GIL)


def _tile_pixels(path: str, size: int) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(image)


def _downsamples(tile: int) -> list[int]:
    """Every downsample at which a tile keeps at least one pixel: 4, 16, 64 for 224-pixel tiles."""
    downs, down = [], PYRAMID_STEP
    while tile // down >= 1:
        downs.append(down)
        down *= PYRAMID_STEP
    return downs


class TileCodec:
    """Each source image's level-0 tile, compressed as the TIFF stores it, and its shrunk copies for the
    coarser levels, made once and reused by every slide that shows the image.

    Virtual slides repeat their pool's images (the quickstart's 150 training slides show 6,499 tissue tiles
    of 1,827 images, its 30 dev slides about 3,000 of 264), and compressing tiles was most of building a
    slide. The files are byte for byte those of compressing every tile anew. Holds at most `capacity`
    images (about 0.2 MB each for 224-pixel tiles), dropping the least recently used."""

    def __init__(self, tile: int, capacity: int = 2048) -> None:
        self.tile = tile
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[bytes, dict[int, np.ndarray]]] = OrderedDict()
        self.glass = zlib.compress(np.full((tile, tile, 3), GLASS, np.uint8).tobytes(), ZLIB_LEVEL)

    def _encode(self, source: str) -> tuple[bytes, dict[int, np.ndarray]]:
        pixels = _tile_pixels(source, self.tile)
        image = Image.fromarray(pixels)
        shrunk = {
            down: np.asarray(image.resize((self.tile // down,) * 2, Image.Resampling.BOX))
            for down in _downsamples(self.tile)
        }
        return zlib.compress(pixels.tobytes(), ZLIB_LEVEL), shrunk

    def prepare(self, sources: Sequence[str]) -> None:
        """Encode, in threads, the sources not held yet (each once, however often it recurs)."""
        missing = list(dict.fromkeys(s for s in sources if s not in self._entries))
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            for source, entry in zip(missing, pool.map(self._encode, missing), strict=True):
                self._entries[source] = entry
        for source in sources:  # this slide's sources are the most recently used
            self._entries.move_to_end(source)
        while len(self._entries) > max(self.capacity, len(set(sources))):
            self._entries.popitem(last=False)

    def __getitem__(self, source: str) -> tuple[bytes, dict[int, np.ndarray]]:
        """(compressed level-0 tile, {downsample: shrunk pixels}) of a prepared source."""
        return self._entries[source]


def write_pyramid(
    path: Path,
    sources: np.ndarray,
    tile: int,
    mpp: float,
    min_side: int = 512,
    codec: TileCodec | None = None,
) -> list[tuple[int, int]]:
    """Write the slide: `sources` is a (rows, cols) object array of image paths (None = glass).

    Level 0 is streamed tile by tile, already compressed (never held whole); coarser levels are assembled
    from shrunk tiles. `codec` carries encoded tiles over from earlier slides of the same pool. Returns the
    (width, height) of every level.
    """
    codec = codec or TileCodec(tile)
    if codec.tile != tile:
        raise ValueError(f"the codec's tiles are {codec.tile} pixels, the slide's {tile}")
    rows, cols = sources.shape
    placed = [(r, c, sources[r, c]) for r in range(rows) for c in range(cols) if sources[r, c] is not None]
    codec.prepare([source for _, _, source in placed])
    # level 0, then each coarser level whose longer side keeps at least `min_side` pixels
    levels = [1, *(down for down in _downsamples(tile) if max(rows, cols) * tile // down >= min_side)]

    def level0() -> Iterator[bytes]:
        for r in range(rows):
            for c in range(cols):
                yield codec.glass if sources[r, c] is None else codec[sources[r, c]][0]

    dims = []
    with tifffile.TiffWriter(path, bigtiff=rows * cols * tile * tile * 3 > 2**31) as writer:
        for index, down in enumerate(levels):
            resolution = 1e4 / (mpp * down)  # pixels per centimetre
            options = dict(
                tile=(tile, tile) if down == 1 else (256, 256),
                photometric="rgb",
                compression="zlib",
                compressionargs={"level": ZLIB_LEVEL},
                resolution=(resolution, resolution),
                resolutionunit="CENTIMETER",
                subfiletype=1 if index else 0,
                metadata=None,
                maxworkers=WRITE_THREADS,
            )
            if down == 1:
                writer.write(level0(), shape=(rows * tile, cols * tile, 3), dtype=np.uint8, **options)
                dims.append((cols * tile, rows * tile))
                continue
            side = tile // down
            image = np.full((rows * side, cols * side, 3), GLASS, np.uint8)
            for r, c, source in placed:
                image[r * side : (r + 1) * side, c * side : (c + 1) * side] = codec[source][1][down]
            writer.write(image, **options)
            dims.append((cols * side, rows * side))
    return dims
