"""Frozen-vision feature cache: cached features are exactly the tower's, keyed by content and weights."""

from __future__ import annotations

from pathlib import Path

import torch

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
