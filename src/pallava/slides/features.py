"""Slide features for the slide-level assistant, computed once per slide and cached.

Global view: the slide's *tissue thumbnail* (the thumbnail cropped to the tissue tiles' bounding box),
letterboxed to one crop like any global view. Keys: the patch tokens of every tissue tile, read at the
grid's resolution. Each tile's centre is also given in the global view's frame (0..1 in x and y), so the
connector can relate a tile to the query tokens above it (`slides/model.py` embeds it).

One reading pass over the tiles feeds both the assistant's vision tower and, optionally, PLIP (for the
attention-MIL baseline and retrieval); both results are cached as safetensors files keyed by the slide's
content hash, the tiling and a hash of the encoder, so a second run, or another stage, reads no pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pallava.models.image_features import pixel_key
from pallava.processing.image import letterbox_box, normalize_to_tensor
from pallava.processing.stain_norm import stain_normalize
from pallava.slides.mapping import PreparedSlide, TilingOptions, prepare_slide
from pallava.slides.reader import Slide
from pallava.slides.tiling import Tile, TileGrid, iter_tile_batches

# Thumbnail pixels per tile for the tissue mask and the global view: enough for a 5 x 5-tile slide's view
# to fill its 224-pixel crop. A small slide's full 2048-pixel thumbnail was read from its finest level:
# with its tissue mask, 78% of preparing a 100-tile virtual slide (py-spy over `pallava eval slides`).
THUMBNAIL_PX_PER_TILE = 48

FORMAT_VERSION = 2  # 2: each tile's image embedding (`tile_summaries`) too


class TileMemo:
    """Features of the tiles one encoder has already seen in this process, keyed by their pixels.

    Virtual slides are laid out from a pool of dataset images, so the same tile recurs across slides (the
    quickstart's 150 training slides hold 6,499 tissue tiles of 1,827 distinct images; its dev slides about
    3,000 tiles of 264); a repeated tile then costs a hash instead of a pass through the tower. Valid for one
    (vision tower, PLIP, stain setting): the caller makes one per encoder and passes it to every
    `slide_features` call of that encoder.
    """

    def __init__(self) -> None:
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.hits = 0  # tiles served without encoding

    key = staticmethod(pixel_key)  # a digest of a tile's pixels, size and mode

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self._rows[key]

    def put(self, key: str, tokens: torch.Tensor, summary: torch.Tensor, embedding: torch.Tensor | None):
        self._rows[key] = (tokens, summary, embedding)


@dataclass
class SlideFeatures:
    """Everything the slide model (and the baselines) need about one slide."""

    global_tokens: torch.Tensor  # (P, D) tissue thumbnail
    tile_tokens: torch.Tensor  # (N, P, D)
    tile_summaries: torch.Tensor  # (N, D) each tile's image embedding (the tower's post-normed class token)
    positions: torch.Tensor  # (N, 2) tile centres (x, y) in the global view, 0..1
    grid: TileGrid
    thumb_downsample: float
    plip: torch.Tensor | None = None  # (N, E) PLIP image embeddings

    def __len__(self) -> int:
        return len(self.grid.tiles)


def tissue_view(
    prepared: PreparedSlide, downsample: float, size: int, stain: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised global view (3, size, size) of the tissue tiles' bounding box, stain-normalised first
    with `stain` (the tower's recorded normalisation); tile centres in it."""
    tiles = prepared.grid.tiles
    x0, y0 = min(t.x for t in tiles), min(t.y for t in tiles)
    x1, y1 = max(t.x + t.w for t in tiles), max(t.y + t.h for t in tiles)
    thumb = prepared.thumbnail
    box = (
        max(0, int(x0 / downsample)),
        max(0, int(y0 / downsample)),
        min(thumb.width, max(int(x0 / downsample) + 1, round(x1 / downsample))),
        min(thumb.height, max(int(y0 / downsample) + 1, round(y1 / downsample))),
    )
    crop = stain_normalize(thumb.crop(box), stain)
    left, top, right, bottom = letterbox_box(crop.size, size, size)
    scale_x, scale_y = (right - left) / crop.width, (bottom - top) / crop.height
    centres = torch.tensor([[t.x + t.w / 2, t.y + t.h / 2] for t in tiles], dtype=torch.float64) / downsample
    positions = torch.stack(
        [
            (left + (centres[:, 0] - box[0]) * scale_x) / size,
            (top + (centres[:, 1] - box[1]) * scale_y) / size,
        ],
        dim=1,
    )
    return normalize_to_tensor(crop, size), positions.clamp(0, 1).float()


def encoder_namespace(model, processor, extra: dict) -> str:
    """Hash of the vision tower's weights, feature layer and the tiling settings."""
    digest = hashlib.sha256(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "layer": model.config.vision_feature_layer,
                "tile": processor.image_processor.tile_size,
                **extra,
            },
            sort_keys=True,
        ).encode()
    )
    for name, tensor in sorted(model.vision_tower.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def slide_key(slide: Slide) -> str:
    return (
        slide.info.quickhash
        or hashlib.sha256(f"{slide.path.resolve()}:{slide.path.stat().st_size}".encode()).hexdigest()
    )


class SlideFeatureCache:
    """`<root>/<namespace>/<slide key>.safetensors` (assistant features), `<key>.plip-<id>.safetensors`."""

    def __init__(self, root: str | Path, namespace: str) -> None:
        self.directory = Path(root) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str, plip_id: str | None = None) -> Path:
        return self.directory / (f"{key}.plip-{plip_id}.safetensors" if plip_id else f"{key}.safetensors")

    @staticmethod
    def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.partial")
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"meta": json.dumps(meta)}
        )
        os.replace(partial, path)

    @staticmethod
    def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(path, "pt") as handle:
            meta = json.loads(handle.metadata()["meta"])
            return {name: handle.get_tensor(name) for name in handle.keys()}, meta


def _grid_from(meta: dict, tiles: torch.Tensor) -> TileGrid:
    rows = tiles.tolist()
    return TileGrid(
        tiles=[Tile(x=r[0], y=r[1], w=r[2], h=r[3], col=r[4], row=r[5], tissue=r[6] / 1e4) for r in rows],
        tile_size=meta["tile_size"],
        mpp=meta["mpp"],
        level0_side=meta["level0_side"],
        cols=meta["cols"],
        rows=meta["rows"],
        slide_size=tuple(meta["slide_size"]),
    )


@torch.no_grad()
def slide_features(
    slide: Slide,
    model,
    processor,
    cache: SlideFeatureCache | None = None,
    options: TilingOptions | None = None,
    plip=None,
    plip_id: str | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float16,
    progress: bool = False,
    memo: TileMemo | None = None,
) -> SlideFeatures:
    """Features of every tissue tile of `slide` (read from `cache` when there; else computed and stored).

    `model` is a `PaLlavaForConditionalGeneration` (its vision tower), `plip` a `PlipZeroShot` or None.
    Stored in `dtype` (float16 halves the cache; the connector computes in its own dtype). `memo` (one per
    encoder) skips the tower for tiles whose pixels it has seen, in this slide or an earlier one.
    """
    options = options or TilingOptions()
    key = slide_key(slide)
    stain = processor.image_processor.stain_normalize  # what the tower was trained with, or an override
    settings = {
        "mpp": options.mpp,
        "tile": options.tile_size,
        "min_tissue": options.min_tissue,
        "base_mpp": options.base_mpp,
        "thumbnail_px_per_tile": THUMBNAIL_PX_PER_TILE,
    }
    if stain:  # only then: caches written before the setting keep their names
        settings["stain_normalize"] = stain
    main_path = cache.path(f"{key}-{_short(settings)}") if cache else None
    plip_path = cache.path(f"{key}-{_short(settings)}", plip_id) if cache and plip is not None else None
    if main_path is not None and main_path.is_file() and (plip is None or plip_path.is_file()):
        tensors, meta = cache.read(main_path)
        embeddings = cache.read(plip_path)[0]["plip"] if plip is not None else None
        return SlideFeatures(
            tensors["global"],
            tensors["tiles"],
            tensors["summaries"],
            tensors["positions"],
            _grid_from(meta, tensors["boxes"]),
            meta["thumb_downsample"],
            embeddings,
        )

    prepared = prepare_slide(slide, options, THUMBNAIL_PX_PER_TILE)
    grid = prepared.grid
    downsample = slide.dimensions[0] / prepared.thumbnail.width
    size = processor.image_processor.tile_size
    view, positions = tissue_view(prepared, downsample, size, stain)
    device, vision_dtype = model.vision_tower.device, model.vision_tower.dtype
    global_tokens = model.vision_hidden_states(view[None].to(device, vision_dtype))[0, 1:].to("cpu", dtype)
    # The quickstart's assistant reads through PLIP's own tower: its last layer gives PLIP's embedding too.
    shared = plip is not None and plip.shares_tower(model.vision_tower, size)

    def encode(images: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pixels = torch.stack([normalize_to_tensor(image, size) for image in images])
        hidden = model.vision_hidden_states(pixels.to(device, vision_dtype))
        output = model.vision_output_tokens(hidden)
        embedded = None
        if shared:
            embedded = plip.embed_tokens(output)
        elif plip is not None:
            plip_size = plip.model.image_size
            if plip_size != size:
                pixels = torch.stack([normalize_to_tensor(image, plip_size) for image in images])
            embedded = plip.encode_pixels(pixels)
        return hidden[:, 1:].to("cpu", dtype), output[:, 0].to("cpu", dtype), embedded

    def read(image):  # in the reader threads, beside the encoder
        image = stain_normalize(image, stain)
        return image, (TileMemo.key(image) if memo is not None else None)

    tokens, summaries, embeddings = [], [], []
    bar = "slide tiles" if progress else None
    for _, batch in iter_tile_batches(slide, grid.tiles, grid.tile_size, batch_size, bar, transform=read):
        images, keys = [image for image, _ in batch], [key for _, key in batch]
        if memo is None:
            batch_tokens, batch_summaries, batch_embeddings = encode(images)
        else:
            fresh = {}  # key -> the batch index of its first tile, for tiles the memo has not seen
            for index, key in enumerate(keys):
                if key not in memo and key not in fresh:
                    fresh[key] = index
            if fresh:
                new = encode([images[i] for i in fresh.values()])
                for row, key in enumerate(fresh):
                    memo.put(key, new[0][row], new[1][row], None if new[2] is None else new[2][row])
            memo.hits += len(keys) - len(fresh)
            rows = [memo.get(key) for key in keys]
            batch_tokens = torch.stack([r[0] for r in rows])
            batch_summaries = torch.stack([r[1] for r in rows])
            batch_embeddings = torch.stack([r[2] for r in rows]) if plip is not None else None
        tokens.append(batch_tokens)
        summaries.append(batch_summaries)
        if batch_embeddings is not None:
            embeddings.append(batch_embeddings)
    tile_tokens, tile_summaries = torch.cat(tokens), torch.cat(summaries)
    plip_vectors = torch.cat(embeddings) if plip is not None else None
    if cache is not None:
        boxes = torch.tensor([[t.x, t.y, t.w, t.h, t.col, t.row, round(t.tissue * 1e4)] for t in grid.tiles])
        meta = {
            "tile_size": grid.tile_size,
            "mpp": grid.mpp,
            "level0_side": grid.level0_side,
            "cols": grid.cols,
            "rows": grid.rows,
            "slide_size": list(grid.slide_size),
            "thumb_downsample": downsample,
            "slide": str(slide.path),
            **settings,
        }
        cache.write(
            main_path,
            {
                "global": global_tokens,
                "tiles": tile_tokens,
                "summaries": tile_summaries,
                "positions": positions,
                "boxes": boxes,
            },
            meta,
        )
        if plip_vectors is not None:
            cache.write(plip_path, {"plip": plip_vectors}, {"plip": plip_id})
    return SlideFeatures(
        global_tokens, tile_tokens, tile_summaries, positions, grid, downsample, plip_vectors
    )


def _short(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def default_slide_cache_root() -> Path:
    """Beside the vision-feature cache: `$PALLAVA_FEATURE_CACHE/../slide-features`, else
    `~/.cache/pallava/slide-features`."""
    env = os.environ.get("PALLAVA_FEATURE_CACHE")
    return (Path(env).parent if env else Path.home() / ".cache" / "pallava") / "slide-features"


def load_plip(directory: str | None, device: str = "cpu"):
    """(PlipZeroShot, fingerprint) of a PLIP folder, or (None, None) without one."""
    if not directory:
        return None, None
    from pallava.models.plip.zeroshot import PlipZeroShot
    from pallava.slides.mapping import model_fingerprint

    if not Path(directory).is_dir():
        raise ValueError(f"PLIP model folder {directory} does not exist")
    return PlipZeroShot.from_pretrained(directory, device=device), model_fingerprint(directory)


def tile_truth(features: SlideFeatures, truth: dict) -> np.ndarray:
    """Per grid tile: 1 where the virtual slide's truth says tumour, else 0 (glass tiles count as benign)."""
    tumour = {(t["x"], t["y"]) for t in truth["tiles"] if t["tumour"]}
    return np.array([(t.x, t.y) in tumour for t in features.grid.tiles], dtype=np.int64)
