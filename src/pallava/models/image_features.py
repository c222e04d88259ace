"""A memory of images already seen: their vision-tower features, by image content.

The server's API is stateless, so a chat client sends the conversation's image again with every turn, and
each turn would run the vision tower on the same crops again (at the paper's shapes on a CPU, a 1024x768
image's 7 crops of ViT-B/16 take 0.35 s of a 1.04 s first token; docs/benchmarks.md). An evaluation asks
many questions about each image (the quickstart's suite: ten per dev image). `ImageFeatureCache` keeps the
crop features of the last `max_images` distinct images, keyed by a digest of their pixels (`pixel_key` of the
decoded image, set on each `TiledImage` at the server's admission, or `crops_key` of the tiled crops,
`PaLlava.remember_images`), and fills a batch's `crop_features` from it; only the images it has not seen go
through the tower. The features are the tower's output for the crops as tiled, before the connector, so the
answers are the same as without the cache (tests check that).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import torch
from PIL import Image

from pallava.processing.image import TiledImage


def crops_key(pixel_values: torch.Tensor) -> str:
    """A digest of one image's crops as tiled and normalised ((1+T, 3, S, S), shape included)."""
    digest = hashlib.sha1(usedforsecurity=False)  # a content key, not a security one: twice blake2b's speed
    digest.update(f"{tuple(pixel_values.shape)}:{pixel_values.dtype}:".encode())
    digest.update(pixel_values.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pixel_key(image: Image.Image) -> str:
    """A digest of an image's pixels, size and mode: equal for the same image however it was encoded."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ImageFeatureCache:
    """Crop features of recently seen images, least recently used first out. Used by one thread (the
    server's generation worker)."""

    def __init__(self, model, max_images: int):
        if max_images < 1:
            raise ValueError(f"the image feature cache needs room for at least 1 image, got {max_images}")
        self.model, self.max_images = model, max_images
        self._features: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._features)

    @torch.inference_mode()
    def crop_features(self, tiled: Sequence[TiledImage], stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, 1+T, P, D) features of the stacked images (`PaLlavaImageProcessor.stack`'s output), zeros
        where a tile is padding or is not encoded, as `encode_crops` gives them. Images without a `key` are
        always encoded."""
        keys, sizes = [image.key for image in tiled], [1 + image.num_tiles for image in tiled]
        return self._features_of(keys, sizes, stacked["pixel_values"], stacked["tile_mask"])

    @torch.inference_mode()
    def batch_features(self, pixel_values: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """`crop_features` of a batch as an image processor gives it, each image keyed by its row of crops
        (`crops_key`: the same image in a batch padded to more tiles is another key, and is encoded again)."""
        keys = [crops_key(row) for row in pixel_values]
        return self._features_of(keys, [pixel_values.shape[1]] * len(keys), pixel_values, tile_mask)

    def _features_of(
        self,
        keys: Sequence[str | None],
        sizes: Sequence[int],
        pixel_values: torch.Tensor,
        tile_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Rows of remembered keys from memory; each other key once through the tower, however often it
        recurs in the batch (an evaluation batches several questions about one image); unkeyed rows always."""
        rows: dict[str, torch.Tensor] = {}  # this batch's features by key, read before any eviction
        for key in keys:
            if key is not None and key in self._features and key not in rows:
                self._features.move_to_end(key)
                rows[key] = self._features[key]
        pending: set[str] = set()  # keys this batch encodes, at their first row
        unseen = []
        for i, key in enumerate(keys):
            if key is None or (key not in rows and key not in pending):
                unseen.append(i)
                if key is not None:
                    pending.add(key)
        fresh: dict[int, torch.Tensor] = {}
        if unseen:
            index, device = torch.tensor(unseen), self.model.device
            encoded = self.model.tiles_to_encode(tile_mask)[index].to(device)
            features = self.model.encode_crops(pixel_values[index].to(device), encoded)
            fresh = dict(zip(unseen, features, strict=True))
        features = None
        for i, key in enumerate(keys):
            if i in fresh:
                row = fresh[i][: sizes[i]]
                self.misses += 1
                if key is not None:
                    rows[key] = row
                    self._remember(key, row.clone())
            else:
                row = rows[key]
                self.hits += 1
            if features is None:
                features = row.new_zeros(len(keys), pixel_values.shape[1], *row.shape[1:])
            features[i, : row.shape[0]] = row
        return features

    def _remember(self, key: str, features: torch.Tensor) -> None:
        self._features[key] = features
        while len(self._features) > self.max_images:
            self._features.popitem(last=False)
