"""Map a slide with PLIP: tissue tiles -> cached embeddings -> zero-shot class probabilities -> files.

`pallava slide map` writes into its output folder:
  tiles.geojson          every tissue tile with its class probabilities (QuPath: File > Import objects)
  heatmap_<class>.png    the thumbnail with one class's probability per tile
  tissue.png             the thumbnail with the tissue mask and the kept tiles
  embeddings/            the resumable PLIP embedding cache (see `cache.py`)
  summary.json           settings, tile counts and per-class totals
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pallava.data.labels import LabelMap
from pallava.models.plip.prompts import ZEROSHOT_TEMPLATES, class_prompts
from pallava.models.plip.zeroshot import PlipZeroShot
from pallava.slides.cache import EmbeddingCache
from pallava.slides.geojson import tiles_to_geojson, write_geojson
from pallava.slides.heatmap import render_all, render_tissue
from pallava.slides.reader import Slide
from pallava.slides.tiling import TileGrid, iter_tile_batches, tile_grid
from pallava.slides.tissue import TissueMask, detect_tissue

SIDE_WORKERS = 2  # threads beside the encoder: text prompts, drawing and compressing the PNG pictures
# `slide map`'s pictures: 64 thumbnail pixels per tile, at least 1,024 a side (up to `thumbnail_side`). A
# tile's colour and the tissue under it stay visible, while a small slide or region is no longer drawn,
# tissue-detected and compressed at 2,048 pixels a side, once per class (most of mapping a 56-tile region
# with the tiny PLIP).
PICTURE_PX_PER_TILE = 64
PICTURE_MIN_SIDE = 1024


@dataclass(frozen=True)
class TilingOptions:
    """How a slide is cut: output resolution, tile size, tissue threshold, scan resolution override."""

    mpp: float = 0.5
    tile_size: int = 224
    min_tissue: float = 0.25
    base_mpp: float | None = None
    thumbnail_side: int = 2048


@dataclass
class PreparedSlide:
    """A slide's overview, tissue mask and tissue tile grid."""

    thumbnail: Image.Image
    mask: TissueMask
    grid: TileGrid


@dataclass
class SlideMap:
    """The result of `map_slide`: tiles, (N, C) probabilities, class names and the files written."""

    prepared: PreparedSlide
    probabilities: np.ndarray
    class_names: list[str]
    files: dict[str, Path] = field(default_factory=dict)


def thumbnail_side(slide: Slide, options: TilingOptions, px_per_tile: int | None, min_side: int = 1) -> int:
    """The thumbnail's longest side: `options.thumbnail_side`, or less when that already gives each tile
    `px_per_tile` pixels, but not under `min_side` (None: always `options.thumbnail_side`)."""
    if px_per_tile is None or options.mpp <= 0 or options.tile_size < 8:  # tile_grid names bad options
        return options.thumbnail_side
    tile_side = options.tile_size * options.mpp / slide.mpp(options.base_mpp)  # level-0 pixels per tile
    enough = math.ceil(max(slide.dimensions) / tile_side * px_per_tile)
    return max(1, min(options.thumbnail_side, max(min_side, enough)))


def prepare_slide(
    slide: Slide, options: TilingOptions, px_per_tile: int | None = None, min_side: int = 1
) -> PreparedSlide:
    """Thumbnail, tissue mask and tile grid; raises a clear error when no tile holds enough tissue.

    `px_per_tile` caps the thumbnail at that many pixels per tile, but not under `min_side` (see
    `thumbnail_side`); None keeps the full `options.thumbnail_side`.
    """
    thumbnail, downsample = slide.thumbnail(thumbnail_side(slide, options, px_per_tile, min_side))
    mask = detect_tissue(thumbnail, downsample)
    grid = tile_grid(slide, mask, options.mpp, options.tile_size, options.min_tissue, options.base_mpp)
    if not grid.tiles:
        raise ValueError(
            f"{slide.path}: no tile holds {options.min_tissue:.0%} tissue (tissue covers "
            f"{mask.fraction:.1%} of the "
            "thumbnail); lower --min-tissue or check that the slide is not blank"
        )
    return PreparedSlide(thumbnail=thumbnail, mask=mask, grid=grid)


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap content fingerprint of a model folder (config + size and ends of each weights file)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix not in {".json", ".safetensors", ".bin"} or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def cache_meta(slide: Slide, grid: TileGrid, model_id: str) -> dict:
    """What the embeddings depend on: the slide's content, the model, and the tiling."""
    return {
        "slide": slide.info.quickhash or f"{slide.path.name}:{slide.path.stat().st_size}",
        "model": model_id,
        "mpp": grid.mpp,
        "tile_size": grid.tile_size,
        "level0_side": grid.level0_side,
    }


def embed_grid(
    slide: Slide, grid: TileGrid, plip: PlipZeroShot, cache: EmbeddingCache, batch_size: int = 64
) -> np.ndarray:
    """(N, D) embeddings of the grid's tiles; only tiles missing from `cache` are read and encoded.

    The cache is flushed even when interrupted, so a re-run resumes where this one stopped.
    """
    missing = cache.missing(grid.tiles)
    progress = "embedding tiles" if missing else None  # all cached: no empty progress bar
    try:
        # The reader threads also normalise the pixels: this thread only encodes.
        for tiles, pixels in iter_tile_batches(
            slide, missing, grid.tile_size, batch_size, progress=progress, transform=plip.pixels
        ):
            cache.add(tiles, plip.encode_pixels(torch.stack(pixels)).numpy())
    finally:
        cache.flush()
    return cache.vectors_for(grid.tiles)


def check_templates(templates: Sequence[str]) -> None:
    """Each prompt template must use `{name}` and no placeholder other than `{name}` and `{organ}`."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for template in templates:
        try:
            filled = template.format(name="\0", organ="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"--template {template!r}: only {{name}} and {{organ}} may be used ({error})"
            ) from None
        if "\0" not in filled:
            raise ValueError(f"--template {template!r}: must contain {{name}}")


def map_slide(
    slide: Slide,
    plip: PlipZeroShot,
    label_map: LabelMap,
    out_dir: str | Path,
    model_id: str,
    options: TilingOptions = TilingOptions(),
    batch_size: int = 64,
    templates: Sequence[str] = ZEROSHOT_TEMPLATES,
) -> SlideMap:
    """Tile the slide's tissue, embed the tiles with PLIP, classify them zero-shot and write the outputs.

    Each class is the prompt ensemble of every template (with `{name}`, optionally `{organ}`) filled with
    every name of the class.
    """
    check_templates(templates)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_slide(slide, options, PICTURE_PX_PER_TILE, PICTURE_MIN_SIDE)
    grid = prepared.grid
    cache = EmbeddingCache(out_dir / "embeddings", cache_meta(slide, grid, model_id))
    names = label_map.names()
    # Beside the tile encoder, in threads: the class prompts' text embeddings and the tissue picture (torch
    # and Pillow release the GIL), then the heat maps while the GeoJSON is written.
    with ThreadPoolExecutor(max_workers=SIDE_WORKERS) as side:
        tissue = side.submit(render_tissue, prepared.thumbnail, prepared.mask, grid, out_dir / "tissue.png")
        classes = side.submit(plip.class_embeddings, class_prompts(label_map, tuple(templates)))
        vectors = embed_grid(slide, grid, plip, cache, batch_size)
        probabilities = plip.proba_from_embeddings(torch.from_numpy(vectors), classes.result())
        heatmaps = render_all(
            prepared.thumbnail, prepared.mask.downsample, grid, probabilities, names, out_dir, pool=side
        )
        files = {
            "geojson": write_geojson(
                out_dir / "tiles.geojson", tiles_to_geojson(grid.tiles, probabilities, names)
            )
        }
        files["tissue"] = tissue.result()
        files.update({f"heatmap:{name}": path.result() for name, path in zip(names, heatmaps, strict=True)})
    winners = np.bincount(probabilities.argmax(axis=1), minlength=len(names))
    summary = {
        "slide": slide.info.to_dict(),
        "model": model_id,
        "tiling": {**asdict(options), "level0_side": grid.level0_side, "cols": grid.cols, "rows": grid.rows},
        "tissue_fraction": round(prepared.mask.fraction, 4),
        "tiles": len(grid),
        "classes": {
            label: {"name": name, "tiles_predicted": int(count), "mean_probability": round(float(mean), 4)}
            for label, name, count, mean in zip(
                label_map.labels(), names, winners, probabilities.mean(axis=0), strict=True
            )
        },
    }
    files["summary"] = out_dir / "summary.json"
    files["summary"].write_text(json.dumps(summary, indent=2))
    return SlideMap(prepared=prepared, probabilities=probabilities, class_names=names, files=files)


def load_classes(spec: str | Path | None, default: str = "nct-crc-he") -> LabelMap:
    """Classes for zero-shot mapping: a built-in label map name, a JSON/YAML label map, or one name per
    line."""
    if spec is None:
        return LabelMap.builtin(default)
    if str(spec) in LabelMap.builtin_names():
        return LabelMap.builtin(str(spec))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"--classes {spec}: no such file and not a built-in label map "
            f"({', '.join(LabelMap.builtin_names())})"
        )
    if path.suffix.lower() in {".json", ".yaml", ".yml"}:
        return LabelMap.from_file(path)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    if len(names) < 2:
        raise ValueError(
            f"{path}: zero-shot mapping needs at least two class names (one per line), found {len(names)}"
        )
    return LabelMap.from_dict({name: {"name": name} for name in names}, source=str(path))
