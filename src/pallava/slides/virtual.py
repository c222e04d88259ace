"""Virtual slides with known ground truth, laid out from real labelled tiles.

Each slide shows one organ: an irregular tissue outline on white glass, filled with benign tiles of that
organ, with zero, one or two tumour regions (contiguous blobs of one carcinoma class of the organ, each
inside one quadrant of the tissue so that "where" has one answer). Tiles sit on a grid of `tile` pixels
at `mpp` microns per pixel with one empty cell of glass around the tissue, so `slide map` / `slide ask`
tile the slide exactly along the pasted tiles. Written as a pyramidal tiled TIFF (levels at downsamples
1, 4, 16, ...; `slides/pyramid.py`) that OpenSlide reads as a generic tiled TIFF, plus `<name>.truth.json`.

Which classes are benign is read from the label map: `malignant: false`, or, where a map does not say, a
class whose label ends in `_n` or whose name or synonyms say benign/normal/non-neoplastic. Every other class
of an organ is a carcinoma class.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pallava.data.labels import ClassInfo, LabelMap
from pallava.data.records import LabelledImage
from pallava.slides.pyramid import TileCodec, write_pyramid

QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
BENIGN_WORDS = ("benign", "normal", "non-neoplastic")


def is_benign(info: ClassInfo) -> bool:
    """The label map's `malignant: false`; without that field, a label ending in `_n` or a name/synonym saying
    benign, normal or non-neoplastic."""
    if info.malignant is not None:
        return not info.malignant
    texts = [info.name.lower(), *(s.lower() for s in info.synonyms)]
    return info.label.endswith("_n") or any(word in text for text in texts for word in BENIGN_WORDS)


@dataclass(frozen=True)
class OrganPools:
    """The tiles of one organ: benign label -> images, carcinoma label -> images."""

    organ: str
    benign: dict[str, list[str]]
    tumour: dict[str, list[str]]


def organ_pools(items: Sequence[LabelledImage], label_map: LabelMap) -> list[OrganPools]:
    """Group labelled tiles by organ; organs without both a benign and a carcinoma class are left out."""
    by_organ: dict[str, tuple[dict, dict]] = {}
    for item in items:
        info = label_map[item.label]
        organ = info.organ.strip()
        if not organ:
            raise ValueError(
                f"label map: label '{item.label}' has no organ; virtual slides are built per organ"
            )
        benign, tumour = by_organ.setdefault(organ, ({}, {}))
        (benign if is_benign(info) else tumour).setdefault(item.label, []).append(item.path)
    pools = [
        OrganPools(organ, dict(sorted(b.items())), dict(sorted(t.items())))
        for organ, (b, t) in sorted(by_organ.items())
        if b and t
    ]
    if not pools:
        raise ValueError(
            "no organ has both benign and carcinoma tiles (benign: label ending in _n or a name with "
            f"{'/'.join(BENIGN_WORDS)}); labels seen: {sorted({i.label for i in items})}"
        )
    return pools


# --- layout -------------------------------------------------------------------------------------------
def tissue_outline(rng: random.Random, n_tiles: int) -> np.ndarray:
    """A boolean (rows, cols) grid: an irregular blob of about `n_tiles` cells, plus one empty border."""
    aspect = rng.uniform(1.0, 1.6)
    harmonics = [(k, rng.uniform(0.04, 0.22 / k**0.5), rng.uniform(0, 2 * math.pi)) for k in range(2, 7)]
    rotation = rng.choice([False, True])
    cells = n_tiles / 0.55
    cols = max(6, round(math.sqrt(cells * aspect)))
    rows = max(6, round(cells / cols))
    if rotation:
        cols, rows = rows, cols
    yy, xx = np.mgrid[0:rows, 0:cols]
    dx, dy = (xx + 0.5 - cols / 2) / (cols / 2), (yy + 0.5 - rows / 2) / (rows / 2)
    theta, radius = np.arctan2(dy, dx), np.hypot(dx, dy)
    wobble = 1 + sum(a * np.cos(k * theta + phase) for k, a, phase in harmonics)
    low, high = 0.05, 2.0  # bisection on the outline's scale so the blob has about n_tiles cells
    for _ in range(40):
        scale = (low + high) / 2
        count = int((radius <= scale * wobble).sum())
        low, high = (scale, high) if count < n_tiles else (low, scale)
    mask = radius <= high * wobble
    mask = _largest_component(mask)
    return np.pad(mask, 1)


def _neighbours(row: int, col: int) -> Iterator[tuple[int, int]]:
    yield from ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean grid."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        component, stack = [], [start]
        seen[start] = True
        while stack:
            cell = stack.pop()
            component.append(cell)
            for r, c in _neighbours(*cell):
                if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not seen[r, c]:
                    seen[r, c] = True
                    stack.append((r, c))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask)
    for cell in best:
        out[cell] = True
    return out


def quadrant_of(row: float, col: float, centre: tuple[float, float]) -> int:
    """Index into QUADRANTS of a (row, col) point relative to the tissue's centre (row, col)."""
    return (2 if row >= centre[0] else 0) + (1 if col >= centre[1] else 0)


def tissue_centre(tissue: np.ndarray) -> tuple[float, float]:
    """Centre (row, col) of the tissue's bounding box, in cell units (cell centres at +0.5)."""
    rows, cols = np.nonzero(tissue)
    return (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2


def grow_region(rng: random.Random, allowed: np.ndarray, size: int) -> np.ndarray:
    """A contiguous blob of up to `size` cells grown from a random allowed cell; holes are filled."""
    cells = list(zip(*np.nonzero(allowed), strict=True))
    region = np.zeros_like(allowed)
    if not cells:
        return region
    seed = rng.choice(cells)
    region[seed] = True
    frontier = [n for n in _neighbours(*seed)]
    count = 1
    while count < size and frontier:
        cell = frontier.pop(rng.randrange(len(frontier)))
        r, c = cell
        if not (0 <= r < allowed.shape[0] and 0 <= c < allowed.shape[1]) or region[cell] or not allowed[cell]:
            continue
        region[cell] = True
        count += 1
        frontier.extend(_neighbours(r, c))
    # Fill enclosed benign islands: a tumour region is one solid blob.
    outside = _largest_component(np.pad(~region, 1))[1:-1, 1:-1]
    return (~outside) & allowed | region


def tumour_regions(rng: random.Random, tissue: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` blobs, each inside its own quadrant of the tissue, off the centre lines."""
    centre = tissue_centre(tissue)
    rows, cols = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]]
    quadrant = (2 * (rows + 0.5 >= centre[0]) + (cols + 0.5 >= centre[1])).astype(int)
    # Keep one cell away from the centre lines so the region's quadrant is unambiguous.
    margin = (np.abs(rows + 0.5 - centre[0]) >= 1) & (np.abs(cols + 0.5 - centre[1]) >= 1)
    regions: list[np.ndarray] = []
    for q in rng.sample(range(4), 4):
        if len(regions) == count:
            break
        allowed = tissue & (quadrant == q) & margin
        available = int(allowed.sum())
        if available < 2:
            continue
        size = max(2, round(available * rng.uniform(0.2, 0.6)))
        regions.append(grow_region(rng, allowed, size))
    return regions


# --- polygons -----------------------------------------------------------------------------------------
def region_rings(region: np.ndarray, cell: int, offset: tuple[int, int] = (0, 0)) -> list[list[list[int]]]:
    """Outline rings of a set of grid cells in pixels (x right, y down): outer rings with positive shoelace
    area, holes negative. Each cell (r, c) covers [c*cell, (c+1)*cell) x [r*cell, (r+1)*cell)."""
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in zip(*np.nonzero(region), strict=True):
        r, c = int(r), int(c)
        # Directed so that the region is on the same side of every edge.
        for (r2, c2), start, end in (
            ((r - 1, c), (c + 1, r), (c, r)),
            ((r, c - 1), (c, r), (c, r + 1)),
            ((r + 1, c), (c, r + 1), (c + 1, r + 1)),
            ((r, c + 1), (c + 1, r + 1), (c + 1, r)),
        ):
            inside = 0 <= r2 < region.shape[0] and 0 <= c2 < region.shape[1] and region[r2, c2]
            if not inside:
                edges.setdefault(start, []).append(end)
    rings = []
    while edges:
        start = next(iter(edges))
        ring, point, previous = [start], start, None
        while True:
            options = edges[point]
            # At a pinch point take the sharpest turn, so rings touching at a corner stay separate.
            if len(options) > 1 and previous is not None:
                direction = (point[0] - previous[0], point[1] - previous[1])
                options.sort(
                    key=lambda p: direction[0] * (p[1] - point[1]) - direction[1] * (p[0] - point[0])
                )
            nxt = options.pop(0)
            if not options:
                del edges[point]
            previous, point = point, nxt
            ring.append(point)
            if point == start:
                break
        rings.append([[offset[0] + x * cell, offset[1] + y * cell] for x, y in _simplify(ring)])
    return rings


def _simplify(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop collinear points of a closed ring (keeps it closed)."""
    points = ring[:-1]
    kept = [
        p
        for i, p in enumerate(points)
        if (points[i - 1][0] - p[0]) * (points[(i + 1) % len(points)][1] - p[1])
        != (points[i - 1][1] - p[1]) * (points[(i + 1) % len(points)][0] - p[0])
    ]
    return [*kept, kept[0]]


def shoelace(ring: Sequence[Sequence[float]]) -> float:
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True)) / 2


# --- pixels -------------------------------------------------------------------------------------------
# --- slides -------------------------------------------------------------------------------------------
def regions_geojson(regions: Sequence[np.ndarray], cell: int, label: str, name: str) -> dict:
    """Tumour regions as a GeoJSON FeatureCollection in level-0 pixels (QuPath annotations)."""
    features = []
    for index, region in enumerate(regions, start=1):
        rings = [
            ring[::-1] for ring in region_rings(region, cell)
        ]  # counter-clockwise outer rings (RFC 7946)
        outers = [ring for ring in rings if shoelace(ring) > 0]
        holes = [ring for ring in rings if shoelace(ring) < 0]
        if len(outers) == 1:
            geometry = {"type": "Polygon", "coordinates": [outers[0], *holes]}
        else:
            geometry = {"type": "MultiPolygon", "coordinates": [[ring] for ring in outers]}
        features.append(
            {
                "type": "Feature",
                "id": f"tumour-{index}",
                "geometry": geometry,
                "properties": {
                    "objectType": "annotation",
                    "name": f"tumour region {index}",
                    "classification": {"name": name, "color": [220, 40, 40]},
                    "label": label,
                    "tiles": int(region.sum()),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def plan_slide(
    rng: random.Random, pools: OrganPools, min_tiles: int, max_tiles: int, tumour: bool | None = None
) -> dict:
    """The layout of one slide: tissue cells, tumour regions, the class and source image of every cell.
    `tumour` fixes whether it has tumour (None: 0, 1 or 2 regions with odds 0.4, 0.4, 0.2)."""
    n_tiles = round(math.exp(rng.uniform(math.log(min_tiles), math.log(max_tiles))))
    tissue = tissue_outline(rng, n_tiles)
    if tumour is None:
        count = rng.choices((0, 1, 2), weights=(0.4, 0.4, 0.2))[0]
    else:  # one or two regions in the same 2:1 ratio as above
        count = rng.choices((1, 2), weights=(2, 1))[0] if tumour else 0
    regions = tumour_regions(rng, tissue, count) if count else []
    benign_label = rng.choice(list(pools.benign))
    tumour_label = rng.choice(list(pools.tumour)) if regions else None
    labels = np.full(tissue.shape, None, dtype=object)
    sources = np.full(tissue.shape, None, dtype=object)
    for r, c in zip(*np.nonzero(tissue), strict=True):
        in_tumour = any(region[r, c] for region in regions)
        label = tumour_label if in_tumour else benign_label
        labels[r, c] = label
        sources[r, c] = rng.choice((pools.tumour if in_tumour else pools.benign)[label])
    return {
        "tissue": tissue,
        "regions": regions,
        "labels": labels,
        "sources": sources,
        "benign_label": benign_label,
        "tumour_label": tumour_label,
    }


def write_slide(
    plan: dict,
    pools: OrganPools,
    label_map: LabelMap,
    path: Path,
    tile: int,
    mpp: float,
    codec: TileCodec | None = None,
) -> dict:
    """Write one planned slide (TIFF) and its truth (`<stem>.truth.json`); returns the truth. `codec`
    carries encoded tiles over from the earlier slides of a build (`slides/pyramid.py`)."""
    levels = write_pyramid(path, plan["sources"], tile, mpp, codec=codec)
    centre = tissue_centre(plan["tissue"])
    tumour_label = plan["tumour_label"]
    quadrants = sorted(
        {quadrant_of(*np.argwhere(region).mean(0) + 0.5, centre) for region in plan["regions"]}
    )
    tiles = [
        {
            "col": int(c),
            "row": int(r),
            "x": int(c) * tile,
            "y": int(r) * tile,
            "w": tile,
            "h": tile,
            "label": plan["labels"][r, c],
            "tumour": plan["labels"][r, c] == tumour_label,
            "image": plan["sources"][r, c],
        }
        for r, c in zip(*np.nonzero(plan["tissue"]), strict=True)
    ]
    name = label_map[tumour_label].name if tumour_label else None
    truth = {
        "slide": path.name,
        "organ": pools.organ,
        "tumour_present": bool(plan["regions"]),
        "tumour_label": tumour_label,
        "tumour_class": name,
        "benign_label": plan["benign_label"],
        "benign_class": label_map[plan["benign_label"]].name,
        "location": [QUADRANTS[q] for q in quadrants],
        "mpp": mpp,
        "tile_size": tile,
        "grid": {"cols": int(plan["tissue"].shape[1]), "rows": int(plan["tissue"].shape[0])},
        "levels": [list(d) for d in levels],
        "tissue_tiles": len(tiles),
        "tumour_tiles": sum(t["tumour"] for t in tiles),
        "regions": regions_geojson(plan["regions"], tile, tumour_label or "", name or ""),
        "tiles": tiles,
        "label_map": {
            label: label_map[label].__dict__ | {"synonyms": list(label_map[label].synonyms)}
            for label in [*pools.benign, *pools.tumour]
        },
    }
    truth_path(path).write_text(json.dumps(truth, indent=1))
    return truth


def truth_path(slide: Path) -> Path:
    return slide.with_name(slide.stem + ".truth.json")


def build_virtual_slides(
    items: Sequence[LabelledImage],
    label_map: LabelMap,
    n: int,
    out: str | Path,
    seed: int = 0,
    tile: int = 224,
    mpp: float = 0.5,
    min_tiles: int = 50,
    max_tiles: int = 1000,
    progress: bool = True,
    balanced: bool = False,
) -> list[dict]:
    """Write `n` slides (organs in turn) into `out` with `index.json`; the same seed gives the same files.

    `balanced`: each organ's slides alternate between tumour and no tumour, so that tumour presence is as
    common on every organ (with random draws a small set can teach "this organ: yes" instead of looking)."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if not 8 <= min_tiles <= max_tiles:
        raise ValueError(
            f"tile counts must satisfy 8 <= min_tiles <= max_tiles, got {min_tiles} and {max_tiles}"
        )
    if tile % 16:
        raise ValueError(f"--tile must be a multiple of 16 (TIFF tiles), got {tile}")
    from tqdm import tqdm

    pools = organ_pools(items, label_map)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries, codec = [], TileCodec(tile)
    for index in tqdm(range(n), desc="virtual slides", unit="slide", disable=not progress):
        organ = pools[index % len(pools)]
        rng = random.Random(f"{seed}:{index}")  # each slide depends only on (seed, index)
        turn = index // len(pools)  # this organ's turn-th slide
        plan = plan_slide(rng, organ, min_tiles, max_tiles, tumour=turn % 2 == 0 if balanced else None)
        path = out / f"slide-{index:04d}-{organ.organ}.tiff"
        truth = write_slide(plan, organ, label_map, path, tile, mpp, codec)
        summaries.append(
            {
                key: truth[key]
                for key in (
                    "slide",
                    "organ",
                    "tumour_present",
                    "tumour_label",
                    "location",
                    "tissue_tiles",
                    "tumour_tiles",
                )
            }
        )
    (out / "index.json").write_text(
        json.dumps(
            {"seed": seed, "mpp": mpp, "tile_size": tile, "balanced": balanced, "slides": summaries}, indent=1
        )
    )
    return summaries


def load_truth(slide: str | Path) -> dict:
    """The ground truth written next to a virtual slide."""
    path = truth_path(Path(slide))
    if not path.is_file():
        raise ValueError(
            f"{slide}: no ground truth {path.name} next to the slide (built by `pallava data build "
            "--kind virtual-slides`)"
        )
    return json.loads(path.read_text())


def list_slides(folder: str | Path) -> list[Path]:
    """The slides of a virtual-slide folder (those with a truth file), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of virtual slides")
    slides = sorted(p for p in folder.glob("*.tiff") if truth_path(p).is_file())
    if not slides:
        raise ValueError(
            f"{folder}: holds no slides with a .truth.json (build them with `pallava data build "
            "--kind virtual-slides`)"
        )
    return slides
