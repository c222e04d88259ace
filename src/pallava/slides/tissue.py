"""Tissue detection on a slide thumbnail: Otsu's threshold on HSV saturation, then morphological clean-up.

Glass and background are bright and grey (low saturation); stained tissue is coloured.
Working on a thumbnail keeps this cheap and bounded whatever the slide size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage


@dataclass
class TissueMask:
    """A boolean tissue mask at thumbnail scale; `downsample` maps mask pixels to level-0 pixels."""

    mask: np.ndarray  # (H, W) bool
    downsample: float
    threshold: int  # saturation threshold that was used (0-255)

    def __post_init__(self) -> None:
        # Summed-area table (one row/column of zeros in front) for O(1) box fractions.
        self._integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    @property
    def fraction(self) -> float:
        """Share of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def box_fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Share of the level-0 box (x, y, w, h) covered by tissue; parts outside the slide count as
        background."""
        rows, cols = self.mask.shape
        x0, y0 = x / self.downsample, y / self.downsample
        x1, y1 = (x + w) / self.downsample, (y + h) / self.downsample
        area = max((x1 - x0) * (y1 - y0), 1e-9)
        c0, c1 = int(np.clip(np.floor(x0), 0, cols)), int(np.clip(np.ceil(x1), 0, cols))
        r0, r1 = int(np.clip(np.floor(y0), 0, rows)), int(np.clip(np.ceil(y1), 0, rows))
        count = (
            self._integral[r1, c1] - self._integral[r0, c1] - self._integral[r1, c0] + self._integral[r0, c0]
        )
        # Mask pixels are counted whole; cap at 1 when the box is smaller than a mask pixel.
        return float(min(1.0, count / area))

    def to_image(self) -> Image.Image:
        """The mask as a black-and-white image (white = tissue)."""
        return Image.fromarray((self.mask * 255).astype(np.uint8), mode="L")


def _small_components(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """The connected components of `mask` with fewer than `max_pixels` pixels."""
    labels, count = ndimage.label(mask)
    if not count:
        return np.zeros_like(mask, dtype=bool)
    small = np.bincount(labels.ravel()) < max_pixels
    small[0] = False
    return small[labels]


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold for 8-bit values: the cut that maximises between-class variance."""
    histogram = np.bincount(values.ravel().astype(np.uint8), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(histogram)
    weight_high = total - weight_low
    cumulative_mean = np.cumsum(histogram * levels)
    mean_low = cumulative_mean / np.maximum(weight_low, 1)
    mean_high = (cumulative_mean[-1] - cumulative_mean) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # Pixels <= threshold are background; the cut is the level with the largest between-class variance.
    return int(np.argmax(between))


def detect_tissue(
    thumbnail: Image.Image,
    downsample: float,
    min_saturation: int = 20,
    min_object_fraction: float = 0.0005,
) -> TissueMask:
    """Find tissue in an RGB thumbnail whose pixels are `downsample` level-0 pixels wide.

    Pixels with saturation above Otsu's threshold (never below `min_saturation`, so that an
    all-background slide stays empty) are tissue; closing bridges gaps between nuclei, opening
    removes dust, holes under 4 x `min_object_fraction` of the image are filled, and objects
    under `min_object_fraction` are dropped.
    """
    saturation = np.asarray(thumbnail.convert("RGB").convert("HSV"))[..., 1]
    threshold = max(otsu_threshold(saturation), min_saturation)
    # Pad by reflection so that closing does not eat tissue touching the thumbnail's edge.
    pad = 3
    mask = np.pad(saturation > threshold, pad, mode="reflect")
    structure = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_closing(mask, structure=structure, iterations=2)
    mask = ndimage.binary_opening(mask, structure=structure, iterations=1)
    mask = mask[pad:-pad, pad:-pad]
    min_pixels = max(1, min_object_fraction * mask.size)
    # Fill small holes (lumens, nuclei clearing) but keep large empty areas inside tissue outlines as
    # background.
    mask = mask | _small_components(ndimage.binary_fill_holes(mask) & ~mask, min_pixels * 4)
    mask = mask & ~_small_components(mask, min_pixels)
    return TissueMask(mask=mask.astype(bool), downsample=float(downsample), threshold=threshold)
