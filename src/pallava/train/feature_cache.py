"""Frozen-vision feature cache: each image's crop features computed once, stored in safetensors shards.

While the vision tower is frozen its output for an image never changes, so training reads the features
from disk instead of decoding, tiling and encoding the image on every epoch (and on the next stage, as
long as the tower is the same). Entries are keyed by the sha256 of the image bytes; the folder they
live in (the *namespace*) is a hash of the vision weights, the feature layer and the tiling settings,
so a different tower or tiling can never read stale features. Every tile that holds image pixels is
encoded and stored whatever the connector does with tiles, so one cache serves connectors with and
without tile cross-attention; a crop marked real whose features are all zero is refused.

Layout: `<root>/<namespace>/features-<writer>-<n>.safetensors`, each holding `<key>.features`
(1+T, P, D) for the global view and the grid's T tiles (zeros for tiles of pure padding),
`<key>.tile_mask` (T,) and `<key>.grid` (columns, rows). Shards are written under a temporary name
and renamed; the index is the set of tensor names in the shards, read from their headers, so several
processes can add shards at once without a shared index file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pallava.processing.image import CLIP_MEAN, CLIP_STD, PaLlavaImageProcessor
from pallava.processing.loading import ImageSource

FORMAT_VERSION = 2  # 2: tile masks stored; tiles always encoded (1 could hold zero tiles)
SHARD_GLOB = "features-*.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    """`$PALLAVA_FEATURE_CACHE`, else `~/.cache/pallava/vision-features`."""
    env = os.environ.get("PALLAVA_FEATURE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pallava" / "vision-features"


def image_key(data: bytes) -> str:
    """Content key of an image: the sha256 of its encoded bytes."""
    return hashlib.sha256(data).hexdigest()


def namespace_for(
    vision_tower: torch.nn.Module, feature_layer: int, image_processor: PaLlavaImageProcessor, dtype: str
) -> str:
    """Hash of everything that determines an image's features: weights, layer, tiling, normalisation."""
    digest = hashlib.sha256()
    settings = {
        "format": FORMAT_VERSION,
        "feature_layer": feature_layer,
        "dtype": dtype,
        "tiling": image_processor.to_dict(),
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(vision_tower.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureCache:
    """Read and add crop features of one namespace (one vision tower + tiling)."""

    def __init__(self, root: str | Path, namespace: str, shard_size: int = 1024) -> None:
        if shard_size < 1:
            raise ValueError(f"feature cache shard_size must be at least 1, got {shard_size}")
        self.directory = Path(root) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pid = os.getpid()
        self.refresh()

    # --- index --------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the shard headers (after other processes added shards)."""
        index: dict[str, Path] = {}
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            with safe_open(path, "pt") as handle:
                for name in handle.keys():
                    if name.endswith(".features"):
                        index[name[: -len(".features")]] = path
        self._index = index

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys without cached features, deduplicated, in first-seen order."""
        return [key for key in dict.fromkeys(keys) if key not in self._index]

    # --- reading ------------------------------------------------------------------------------------
    def _handle(self, path: Path):
        if os.getpid() != self._pid:  # a DataLoader worker: never share open files across a fork
            self._handles, self._pid = {}, os.getpid()
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path]

    def get(self, key: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """(features (1+T, P, D), grid (columns, rows)) of one image; zeros for tiles of pure padding."""
        if key not in self._index:
            raise KeyError(f"image {key[:12]}... has no cached features in {self.directory}")
        handle = self._handle(self._index[key])
        grid = handle.get_tensor(f"{key}.grid")
        return handle.get_tensor(f"{key}.features"), (int(grid[0]), int(grid[1]))

    def tile_mask(self, key: str) -> torch.Tensor:
        """(T,) bool of one image: False for the grid's tiles of pure padding."""
        if key not in self._index:
            raise KeyError(f"image {key[:12]}... has no cached features in {self.directory}")
        return self._handle(self._index[key]).get_tensor(f"{key}.tile_mask")

    def batch(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for N images: `crop_features` (N, 1+T, P, D) zero-padded and `tile_mask` (N, T)."""
        features = [self.get(key)[0] for key in keys]
        masks = [self.tile_mask(key) for key in keys]
        max_tiles = max(mask.shape[0] for mask in masks)
        crop_features = features[0].new_zeros(len(keys), 1 + max_tiles, *features[0].shape[1:])
        tile_mask = torch.zeros(len(keys), max_tiles, dtype=torch.bool)
        for i, (crops, mask) in enumerate(zip(features, masks, strict=True)):
            crop_features[i, : crops.shape[0]] = crops
            tile_mask[i, : mask.shape[0]] = mask
        return {"crop_features": crop_features, "tile_mask": tile_mask}

    # --- writing ------------------------------------------------------------------------------------
    def write_shard(
        self, entries: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]], writer: str
    ) -> Path:
        """Write one shard of key -> (features, tile mask, grid) atomically (temporary name, then rename)
        and add it to the index."""
        tensors = {}
        for key, (features, mask, grid) in entries.items():
            tensors[f"{key}.features"] = features.contiguous()
            tensors[f"{key}.tile_mask"] = mask.to(torch.bool).contiguous()
            tensors[f"{key}.grid"] = torch.tensor(grid, dtype=torch.int64)
        path = self.directory / f"features-{writer}-{uuid.uuid4().hex[:8]}.safetensors"
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={"format": str(FORMAT_VERSION)})
        os.replace(partial, path)
        for key in entries:
            self._index[key] = path
        return path

    @torch.no_grad()
    def build(
        self,
        encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        image_processor: PaLlavaImageProcessor,
        images: dict[str, ImageSource],
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        writer: str = "r0",
        progress: bool = True,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        device: torch.device | str = "cpu",
    ) -> int:
        """Compute and store the features of `images` (key -> source) that are not cached yet.

        `encode` maps (pixel_values, tile_mask) to (N, 1+T, P, D) with real features for every crop the
        mask marks, e.g. `model.encode_crops`. Returns how many images were encoded.
        """
        todo = self.missing(list(images))
        pending: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
        bar = tqdm(
            total=len(todo), desc="caching vision features", unit="img", disable=not progress or not todo
        )
        for start in range(0, len(todo), batch_size):
            keys = todo[start : start + batch_size]
            try:
                batch = image_processor([_materialise(images[key]) for key in keys])
            except ValueError as error:
                raise ValueError(f"feature cache: {error}") from None
            with autocast():
                features = encode(batch["pixel_values"].to(device), batch["tile_mask"].to(device))
            features = features.detach().to("cpu", dtype or features.dtype)
            for i, key in enumerate(keys):
                cols, rows = (int(v) for v in batch["grids"][i])
                mask = batch["tile_mask"][i, : cols * rows].clone()
                real = torch.cat(
                    [mask.new_ones(1), mask]
                )  # (1+T,): the global view and the tiles with pixels
                zero = features[i, : 1 + cols * rows].abs().amax(dim=(-1, -2)) == 0
                if bool((zero & real).any()):
                    raise ValueError(
                        f"feature cache: the encoder returned all-zero features for real crop(s) "
                        f"{(zero & real).nonzero().flatten().tolist()} of image {key[:12]}...; "
                        "cached features must not depend on the connector"
                    )
                pending[key] = (features[i, : 1 + cols * rows].clone(), mask, (cols, rows))
            while len(pending) >= self.shard_size:
                ready = list(pending)[: self.shard_size]
                self.write_shard({key: pending.pop(key) for key in ready}, writer)
            bar.update(len(keys))
        if pending:
            self.write_shard(pending, writer)
        bar.close()
        return len(todo)


def _materialise(source: ImageSource | Callable[[], ImageSource]) -> ImageSource:
    """An image, or a function that makes it (augmented views are made only when they are encoded)."""
    return source() if callable(source) else source
