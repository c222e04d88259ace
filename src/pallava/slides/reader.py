"""Whole-slide reading through OpenSlide: metadata, thumbnails and bounded region reads.

Every read goes through `Slide.read_region_scaled`, which picks the pyramid level closest
to the requested scale so that memory depends on the output size, never on the slide size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import openslide
from PIL import Image

# Largest single read from OpenSlide (pixels at the chosen level); bigger requests are assembled in chunks.
MAX_READ_PIXELS = 4096 * 4096
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


class SlideReadError(ValueError):
    """A file that is missing, not a whole-slide image, or corrupt (the message names it)."""


@dataclass(frozen=True)
class SlideInfo:
    """What a user needs to know about a slide before tiling it."""

    path: str
    vendor: str
    width: int  # level 0, pixels
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None  # microns per level-0 pixel; None when the file does not say
    mpp_y: float | None
    objective_power: float | None
    quickhash: str | None  # OpenSlide's content hash, used to key the embedding cache

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """A human-readable multi-line summary (what `pallava slide info` prints)."""
        mpp = f"{self.mpp_x:.4f} x {self.mpp_y:.4f}" if self.mpp_x and self.mpp_y else "unknown"
        power = f"{self.objective_power:g}x" if self.objective_power else "unknown"
        lines = [
            f"file:            {self.path}",
            f"vendor:          {self.vendor}",
            f"dimensions:      {self.width} x {self.height} px (level 0)",
            f"microns/pixel:   {mpp}",
            f"objective power: {power}",
            f"levels:          {self.level_count}",
        ]
        for index, ((w, h), down) in enumerate(
            zip(self.level_dimensions, self.level_downsamples, strict=True)
        ):
            lines.append(f"  level {index}: {w} x {h} px, downsample {down:g}")
        return "\n".join(lines)


def _float_property(properties, name: str) -> float | None:
    value = properties.get(name)
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number and math.isfinite(number) and number > 0 else None


def _on_white(region: Image.Image) -> Image.Image:
    """OpenSlide returns premultiplied RGBA with transparent pixels outside the scanned area: show them
    white."""
    if region.mode != "RGBA":
        return region.convert("RGB")
    background = Image.new("RGB", region.size, (255, 255, 255))
    background.paste(region, mask=region.getchannel("A"))
    return background


class Slide:
    """An open whole-slide image. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideReadError(f"{self.path}: no such slide file")
        try:
            vendor = openslide.OpenSlide.detect_format(str(self.path))
        except openslide.OpenSlideError as error:
            raise SlideReadError(f"{self.path}: cannot read the file: {error}") from error
        if vendor is None:
            with self.path.open("rb") as handle:
                is_tiff = handle.read(4) in TIFF_MAGIC
            what = (
                "a TIFF that is truncated, corrupt, or a plain (untiled) image rather than a slide"
                if is_tiff
                else "not a whole-slide image"
            )
            raise SlideReadError(
                f"{self.path}: {what}; OpenSlide reads Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS, Leica "
                "SCN, "
                "Philips TIFF, Ventana BIF, Sakura SVSLIDE, DICOM WSI, Zeiss CZI and tiled TIFF"
            )
        try:
            self._slide = openslide.OpenSlide(str(self.path))
            # Corrupt files often open but fail on the first pixel read: decode one tile now.
            self._slide.read_region((0, 0), self._slide.level_count - 1, (1, 1))
        except openslide.OpenSlideError as error:
            raise SlideReadError(f"{self.path}: corrupt or unreadable {vendor} slide: {error}") from error
        self.vendor = vendor
        properties = self._slide.properties
        self.info = SlideInfo(
            path=str(self.path),
            vendor=vendor,
            width=self._slide.dimensions[0],
            height=self._slide.dimensions[1],
            level_count=self._slide.level_count,
            level_dimensions=tuple(tuple(d) for d in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp_x=_float_property(properties, openslide.PROPERTY_NAME_MPP_X),
            mpp_y=_float_property(properties, openslide.PROPERTY_NAME_MPP_Y),
            objective_power=_float_property(properties, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
            quickhash=properties.get(openslide.PROPERTY_NAME_QUICKHASH1),
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.width, self.info.height

    def mpp(self, override: float | None = None) -> float:
        """Microns per level-0 pixel (mean of x and y); `override` wins, and is required when the file lacks
        it."""
        if override is not None:
            if override <= 0:
                raise ValueError(f"--base-mpp must be positive, got {override}")
            return float(override)
        if self.info.mpp_x is None or self.info.mpp_y is None:
            raise SlideReadError(
                f"{self.path}: the slide does not record microns per pixel; pass the scanner's value with "
                "--base-mpp"
            )
        return (self.info.mpp_x + self.info.mpp_y) / 2

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as `downsample` (so reads are only ever
        shrunk)."""
        best = 0
        for index, level_down in enumerate(self.info.level_downsamples):
            if level_down <= downsample * (1 + 1e-6):
                best = index
        return best

    def read_region_scaled(self, x: int, y: int, w: int, h: int, out_size: tuple[int, int]) -> Image.Image:
        """Read the level-0 box (x, y, w, h) and return it as an RGB image of `out_size`.

        The read happens at the best pyramid level, so memory scales with `out_size`.
        Areas outside the slide come back white.
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"region {x},{y},{w},{h}: width and height must be positive")
        downsample = min(w / out_size[0], h / out_size[1])
        level = self.best_level(downsample)
        level_down = self.info.level_downsamples[level]
        level_size = (max(1, round(w / level_down)), max(1, round(h / level_down)))
        if level_size[0] * level_size[1] > MAX_READ_PIXELS:
            return self._read_in_chunks(x, y, w, h, out_size, level_down)
        try:
            region = self._slide.read_region((int(x), int(y)), level, level_size)
        except openslide.OpenSlideError as error:
            raise SlideReadError(f"{self.path}: failed to read region {x},{y},{w},{h}: {error}") from error
        region = _on_white(region)
        if region.size != tuple(out_size):
            region = region.resize(tuple(out_size), Image.Resampling.BILINEAR)
        return region

    def _read_in_chunks(
        self, x: int, y: int, w: int, h: int, out_size: tuple[int, int], level_down: float
    ) -> Image.Image:
        """Assemble a large shrink (e.g. a thumbnail of a slide without a pyramid) from bounded reads."""
        out_w, out_h = out_size
        # Output pixels per chunk side so that each read stays under MAX_READ_PIXELS.
        level_per_out = max(w / out_w, h / out_h) / level_down
        step = max(1, int(math.sqrt(MAX_READ_PIXELS) / level_per_out))
        canvas = Image.new("RGB", out_size, (255, 255, 255))
        for oy in range(0, out_h, step):
            for ox in range(0, out_w, step):
                cw, ch = min(step, out_w - ox), min(step, out_h - oy)
                x0, y0 = x + ox * w / out_w, y + oy * h / out_h
                x1, y1 = x + (ox + cw) * w / out_w, y + (oy + ch) * h / out_h
                box = (round(x0), round(y0), max(1, round(x1) - round(x0)), max(1, round(y1) - round(y0)))
                canvas.paste(self.read_region_scaled(*box, (cw, ch)), (ox, oy))
        return canvas

    def thumbnail(self, max_side: int = 2048) -> tuple[Image.Image, float]:
        """An RGB overview whose longest side is at most `max_side`, and its downsample from level 0."""
        width, height = self.dimensions
        scale = max(width, height) / max_side
        downsample = max(1.0, scale)
        size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        image = self.read_region_scaled(0, 0, width, height, size)
        return image, width / size[0]


def open_slide(path: str | Path) -> Slide:
    """Open a whole-slide image, raising `SlideReadError` (a `ValueError`) that names the file on failure."""
    return Slide(path)
