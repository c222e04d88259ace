"""Tile predictions as a GeoJSON FeatureCollection that QuPath imports (File > Import objects).

Each tile is a `Polygon` in level-0 pixel coordinates (QuPath's image space), with QuPath's
`objectType`, a `classification` {name, color} for the most probable class, and `measurements`
holding every class probability and the tile's tissue share.
"""

from __future__ import annotations

import colorsys
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pallava.slides.tiling import Tile


def class_colors(count: int) -> list[tuple[int, int, int]]:
    """`count` well-separated RGB colours (evenly spaced hues), stable for a given class order."""
    colors = []
    for index in range(count):
        r, g, b = colorsys.hsv_to_rgb(index / max(count, 1), 0.75, 0.9)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def tile_feature(
    tile: Tile, probabilities: np.ndarray, class_names: Sequence[str], color: tuple[int, int, int]
) -> dict:
    """One tile as a GeoJSON Feature: a closed ring with positive shoelace area (RFC 7946
    counter-clockwise)."""
    x0, y0, x1, y1 = tile.x, tile.y, tile.x + tile.w, tile.y + tile.h
    best = int(np.argmax(probabilities))
    measurements = {
        f"prob: {name}": round(float(p), 6) for name, p in zip(class_names, probabilities, strict=True)
    }
    measurements["tissue fraction"] = float(tile.tissue)
    return {
        "type": "Feature",
        # Stable id from the box so that re-exports of the same grid keep object identity.
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"tile:{x0},{y0},{tile.w},{tile.h}")),
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "properties": {
            "objectType": "tile",
            "name": f"tile r{tile.row} c{tile.col}",
            "classification": {"name": class_names[best], "color": list(color)},
            "measurements": measurements,
        },
    }


def tiles_to_geojson(tiles: Sequence[Tile], probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """A FeatureCollection of `tiles` with their class `probabilities` (N, C)."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape != (len(tiles), len(class_names)):
        raise ValueError(
            f"probabilities have shape {probabilities.shape}, expected ({len(tiles)}, {len(class_names)})"
        )
    colors = class_colors(len(class_names))
    features = [
        tile_feature(tile, probs, class_names, colors[int(np.argmax(probs))])
        for tile, probs in zip(tiles, probabilities, strict=True)
    ]
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: dict) -> Path:
    """Write a FeatureCollection compactly (slides can have 100k tiles)."""
    path = Path(path)
    path.write_text(json.dumps(collection, separators=(",", ":")))
    return path
