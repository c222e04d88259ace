"""Frozen-vision feature cache: cached features are exactly the tower's, keyed by content and weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pallava.processing.image import PaLlavaImageProcessor
from pallava.train.feature_cache import FeatureCache, image_key, namespace_for


def _namespace(model, processor) -> str:
    return namespace_for(
        model.vision_tower, model.config.vision_feature_layer, processor.image_processor, "auto"
    )


def test_cached_features_reproduce_the_pixel_path(tiny, tmp_path, lung_tiles, shared_data):
    model, processor = tiny
    # A 500x300 image gets several tiles, the 224 px lung tiles one: the batch mixes tile counts.
    sources = [str(p) for p in lung_tiles] + [
        str(shared_data / "samples" / "pathology" / "stardist_histo.jpg")
    ]
    keys = [image_key(Path(s).read_bytes()) for s in sources]
    cache = FeatureCache(tmp_path, _namespace(model, processor), shard_size=3)
    encoded = cache.build(
        model.encode_crops, processor.image_processor, dict(zip(keys, sources, strict=True)), progress=False
    )
    assert encoded == 4 and len(cache) == 4
    shards = sorted(cache.directory.glob("features-*.safetensors"))
    assert len(shards) == 2  # shard_size 3: 3 + 1 entries

    pixels = processor.image_processor(sources)
    cached = cache.batch(keys)
    assert torch.equal(cached["tile_mask"], pixels["tile_mask"])
    with torch.no_grad():
        direct = model.encode_crops(pixels["pixel_values"], pixels["tile_mask"])
    torch.testing.assert_close(cached["crop_features"], direct, rtol=1e-5, atol=1e-5)

    conversation = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "tissue"}]
    batch = processor(text=[conversation] * 4, images=[[s] for s in sources])
    with torch.no_grad():
        from_pixels = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            tile_mask=batch["tile_mask"],
        ).logits
        from_cache = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **cached
        ).logits
    torch.testing.assert_close(from_cache, from_pixels, rtol=1e-4, atol=1e-4)


def test_cache_persists_and_is_reused_and_partial_shards_are_ignored(tiny, tmp_path, lung_tiles):
    model, processor = tiny
    sources = {image_key(p.read_bytes()): str(p) for p in lung_tiles}
    namespace = _namespace(model, processor)
    first = FeatureCache(tmp_path, namespace)
    assert first.build(model.encode_crops, processor.image_processor, sources, progress=False) == 3
    (first.directory / "features-r9-dead.safetensors.partial").write_bytes(b"interrupted write")
    again = FeatureCache(tmp_path, namespace)  # a later run (or the next stage) with the same tower
    assert len(again) == 3 and all(key in again for key in sources)
    calls = []

    def encode(*args):
        calls.append(args)
        return model.encode_crops(*args)

    assert again.build(encode, processor.image_processor, sources, progress=False) == 0
    assert calls == []
    features, grid = again.get(next(iter(sources)))
    assert again.tile_mask(next(iter(sources))).tolist() == [True]
    assert grid == (1, 1) and features.shape == (
        2,
        model.config.num_image_tokens,
        model.config.vision_config.hidden_size,
    )


def test_keys_change_with_content_weights_and_tiling(tiny, lung_tiles):
    model, processor = tiny
    data = lung_tiles[0].read_bytes()
    assert image_key(data) == image_key(bytes(data)) != image_key(data + b"\0")
    before = _namespace(model, processor)
    assert _namespace(model, processor) == before
    from pallava.processing.image import PaLlavaImageProcessor

    other_tiling = PaLlavaImageProcessor(tile_size=224, grid_policy="paper")
    assert namespace_for(model.vision_tower, -2, other_tiling, "auto") != before
    assert namespace_for(model.vision_tower, -1, processor.image_processor, "auto") != before
    weight = dict(model.vision_tower.named_parameters())["encoder.layers.0.layer_norm1.weight"]
    with torch.no_grad():
        weight.add_(1.0)
    try:
        assert _namespace(model, processor) != before
    finally:
        with torch.no_grad():
            weight.sub_(1.0)


def test_a_run_without_tile_cross_attention_caches_the_real_tiles(tiny, tmp_path, shared_data):
    # The cache namespace depends on the vision tower, not the connector: a cache written by a run whose
    # connector ignores tiles is read by a later run whose connector attends to them.
    model, processor = tiny
    source = str(shared_data / "samples" / "pathology" / "stardist_histo.jpg")  # several tiles
    key = image_key(Path(source).read_bytes())
    pixels = processor.image_processor([source])
    with torch.no_grad():
        real = model.encode_crops(pixels["pixel_values"], pixels["tile_mask"])
    connector = model.config.connector_config
    connector.tile_cross_attention = False
    try:
        cache = FeatureCache(tmp_path, _namespace(model, processor))
        cache.build(model.encode_crops, processor.image_processor, {key: source}, progress=False)
    finally:
        connector.tile_cross_attention = True
    cached = FeatureCache(tmp_path, _namespace(model, processor)).batch([key])
    assert cached["tile_mask"].all() and cached["tile_mask"].shape[1] > 1
    assert cached["crop_features"][:, 1:].abs().amax(dim=(-1, -2)).min() > 0  # no all-zero tile
    torch.testing.assert_close(cached["crop_features"], real, rtol=1e-5, atol=1e-5)


def test_the_cache_refuses_zero_features_for_a_real_crop(tiny, tmp_path, lung_tiles):
    model, processor = tiny
    source = str(lung_tiles[0])

    def zero_tiles(pixel_values, tile_mask):
        features = model.encode_crops(pixel_values, tile_mask)
        features[:, 1:] = 0
        return features

    cache = FeatureCache(tmp_path, _namespace(model, processor))
    with pytest.raises(ValueError, match="all-zero features for real crop"):
        cache.build(
            zero_tiles,
            processor.image_processor,
            {image_key(lung_tiles[0].read_bytes()): source},
            progress=False,
        )
    assert len(cache) == 0


def test_empty_padding_tiles_stay_masked_through_the_cache(tiny, tmp_path):
    # The paper's grid list puts a 224 x 224 image on 1x4 tiles, two of them pure padding.
    model, processor = tiny
    paper_tiling = PaLlavaImageProcessor(tile_size=224, grid_policy="paper")
    image = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(image)
    key = image_key(image.read_bytes())
    cache = FeatureCache(tmp_path / "cache", namespace_for(model.vision_tower, -2, paper_tiling, "auto"))
    cache.build(model.encode_crops, paper_tiling, {key: str(image)}, progress=False)
    pixels = paper_tiling([str(image)])
    assert pixels["tile_mask"].tolist() == [[False, True, True, False]]
    cached = FeatureCache(tmp_path / "cache", cache.directory.name).batch([key])
    assert torch.equal(cached["tile_mask"], pixels["tile_mask"])
    with torch.no_grad():
        direct = model.encode_crops(pixels["pixel_values"], pixels["tile_mask"])
    torch.testing.assert_close(cached["crop_features"], direct, rtol=1e-5, atol=1e-5)
