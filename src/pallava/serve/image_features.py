"""The server's memory of images it has already seen: their vision-tower features, by image content.

The API is stateless, so a chat client sends the conversation's image again with every turn, and each turn
would run the vision tower on the same crops again (at the paper's shapes on a CPU, a 1024x768 image's 7
crops of ViT-B/16 take 0.35 s of a 1.04 s first token; docs/benchmarks.md). `ImageFeatureCache` keeps the
crop features of the last `max_images` distinct images, keyed by a digest of their decoded pixels
(`pixel_key`, set on each `TiledImage` at admission), and fills a batch's `crop_features` from it; only the
images it has not seen go through the tower. The features are the tower's output for the crops as tiled,
before the connector, so the answers are the same as without the cache (tests check that).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import torch
from PIL import Image

from pallava.processing.image import TiledImage


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
        where a tile is padding or is not encoded, as `encode_crops` gives them."""
        pixel_values, encoded = stacked["pixel_values"], self.model.tiles_to_encode(stacked["tile_mask"])
        known = [image.key is not None and image.key in self._features for image in tiled]
        unseen = [i for i, hit in enumerate(known) if not hit]
        fresh = iter(())  # the unseen images' features, in their order
        if unseen:
            rows, device = torch.tensor(unseen), self.model.device
            fresh = iter(self.model.encode_crops(pixel_values[rows].to(device), encoded[rows].to(device)))
        features = None
        for i, image in enumerate(tiled):
            if known[i]:
                self._features.move_to_end(image.key)
                row = self._features[image.key]
                self.hits += 1
            else:
                row = next(fresh)[: 1 + image.num_tiles]
                self.misses += 1
                if image.key is not None:
                    self._remember(image.key, row.clone())
            if features is None:
                features = row.new_zeros(len(tiled), pixel_values.shape[1], *row.shape[1:])
            features[i, : row.shape[0]] = row
        return features

    def _remember(self, key: str, features: torch.Tensor) -> None:
        self._features[key] = features
        while len(self._features) > self.max_images:
            self._features.popitem(last=False)
