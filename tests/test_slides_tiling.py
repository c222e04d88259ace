"""Tissue detection, the tile grid, streaming, the embedding cache and GeoJSON on the real Aperio sample."""

import json

import numpy as np
import openslide
import pytest

from pallava.slides.cache import EmbeddingCache
from pallava.slides.geojson import tiles_to_geojson, write_geojson
from pallava.slides.reader import open_slide
from pallava.slides.tiling import Tile, iter_tile_batches, tile_grid
from pallava.slides.tissue import detect_tissue, otsu_threshold
from test_slides_reader import write_pyramid


@pytest.fixture(scope="module")
def tissue(svs):
    with open_slide(svs) as slide:
        thumbnail, downsample = slide.thumbnail(1024)
    return thumbnail, detect_tissue(thumbnail, downsample)


def test_otsu_splits_two_populations():
    values = np.concatenate([np.full(700, 10), np.full(300, 150)]).astype(np.uint8)
    threshold = otsu_threshold(values)
    assert 10 <= threshold < 150
    assert otsu_threshold(np.zeros(0, np.uint8)) == 0


def test_tissue_mask_excludes_white_background(tissue):
    thumbnail, mask = tissue
    pixels = np.asarray(thumbnail, dtype=np.int16)
    white = (pixels > 215).all(axis=-1)  # bright, grey glass
    assert mask.mask.shape == pixels.shape[:2]
    assert 0.2 < mask.fraction < 0.6
    saturation = np.asarray(thumbnail.convert("HSV"))[..., 1]
    # Background is grey glass; tissue is stained. Small gaps inside tissue are filled, so a few
    # white pixels remain inside the mask, but almost all white glass is background.
    assert saturation[~mask.mask].mean() < 10 < 60 < saturation[mask.mask].mean()
    assert (saturation[~mask.mask] > mask.threshold).mean() < 0.01
    assert white[mask.mask].mean() < 0.1
    assert (~mask.mask[white]).mean() > 0.95
    # The top-left corner is empty glass (with a dust speck the clean-up must drop).
    assert not mask.mask[:300, :200].any()
    # The bottom-centre is solid tissue, right up to the slide's edge.
    assert mask.mask[-5:, 200:370].all()


def test_tissue_mask_on_blank_slide_is_empty():
    from PIL import Image

    noise = np.random.default_rng(0).integers(235, 245, (200, 300, 3)).astype(np.uint8)
    mask = detect_tissue(Image.fromarray(noise), downsample=8)
    assert mask.fraction == 0.0


def test_grid_covers_only_and_all_tissue(svs, tissue):
    _, mask = tissue
    with open_slide(svs) as slide:
        grid = tile_grid(slide, mask, mpp=0.5, tile_size=224, min_tissue=0.25)
        everything = tile_grid(slide, mask, mpp=0.5, tile_size=224, min_tissue=0.0)
    assert grid.level0_side == 224  # 224 px at 0.5 um on a 0.499 um scan
    assert (grid.cols, grid.rows) == (10, 14)
    assert 0 < len(grid) < grid.cols * grid.rows
    for tile in grid.tiles:
        assert (tile.x, tile.y) == (tile.col * 224, tile.row * 224) and tile.w == tile.h == 224
        assert tile.tissue >= 0.25
        assert mask.box_fraction(*tile.box) == pytest.approx(tile.tissue, abs=1e-4)
    # With no minimum, the kept tiles cover every tissue pixel of the mask and nothing else is kept.
    covered = np.zeros_like(mask.mask)
    for tile in everything.tiles:
        assert tile.tissue > 0
        r0, c0 = int(tile.y / mask.downsample), int(tile.x / mask.downsample)
        r1, c1 = (
            int(np.ceil((tile.y + tile.h) / mask.downsample)),
            int(np.ceil((tile.x + tile.w) / mask.downsample)),
        )
        covered[r0:r1, c0:c1] = True
    assert covered[mask.mask].all()


def test_streamed_tiles_equal_level0_crops(svs, tissue):
    _, mask = tissue
    raw = openslide.OpenSlide(str(svs))
    with open_slide(svs) as slide:
        grid = tile_grid(slide, mask, mpp=0.5, tile_size=224)
        tiles = grid.tiles[::7][:6]
        batches = list(iter_tile_batches(slide, tiles, 224, batch_size=4, progress=None))
    assert [len(batch) for batch, _ in batches] == [4, 2]
    streamed = [(tile, image) for batch, images in batches for tile, image in zip(batch, images, strict=True)]
    assert [tile for tile, _ in streamed] == tiles
    for tile, image in streamed:
        crop = raw.read_region((tile.x, tile.y), 0, (tile.w, tile.h)).convert("RGB")
        assert image.size == (224, 224)
        assert np.array_equal(np.asarray(image), np.asarray(crop))


def test_a_transform_runs_in_the_reader_threads_and_keeps_the_order(svs, tissue):
    import threading

    _, mask = tissue
    seen_threads = set()

    def mean_colour(image):
        seen_threads.add(threading.get_ident())
        return np.asarray(image).mean(axis=(0, 1))

    with open_slide(svs) as slide:
        tiles = tile_grid(slide, mask, mpp=0.5, tile_size=224).tiles[:5]
        plain = [
            im for _, ims in iter_tile_batches(slide, tiles, 224, batch_size=2, progress=None) for im in ims
        ]
        batches = list(
            iter_tile_batches(slide, tiles, 224, batch_size=2, progress=None, transform=mean_colour)
        )
    assert [tile for batch, _ in batches for tile in batch] == tiles
    means = [value for _, values in batches for value in values]
    np.testing.assert_allclose(means, [np.asarray(im).mean(axis=(0, 1)) for im in plain])
    assert threading.get_ident() not in seen_threads  # prepared off the consumer's (the model's) thread


def test_coarser_mpp_reads_the_pyramid_level(tmp_path):
    image = write_pyramid(tmp_path / "pyramid.tiff", mpp=0.25)
    with open_slide(tmp_path / "pyramid.tiff") as slide:
        thumbnail, downsample = slide.thumbnail(256)
        mask = detect_tissue(thumbnail, downsample)
        grid = tile_grid(slide, mask, mpp=1.0, tile_size=64, min_tissue=0.5)
        assert grid.level0_side == 256  # 64 px at 1.0 um = 256 px at 0.25 um
        ((batch, images),) = list(iter_tile_batches(slide, grid.tiles, 64, batch_size=64, progress=None))
        with pytest.raises(ValueError, match="finer than the scan"):
            tile_grid(slide, mask, mpp=0.1)
    level2 = image[::4, ::4]
    assert len(batch) >= 2
    for tile, tile_image in zip(batch, images, strict=True):
        expected = level2[tile.y // 4 : tile.y // 4 + 64, tile.x // 4 : tile.x // 4 + 64]
        assert np.array_equal(np.asarray(tile_image), expected)
        assert (np.asarray(tile_image) == (180, 60, 150)).all(axis=-1).mean() >= 0.5


def _tiles(n: int) -> list[Tile]:
    return [Tile(x=i * 10, y=0, w=10, h=10, col=i, row=0, tissue=1.0) for i in range(n)]


def test_embedding_cache_resumes_and_rejects_other_settings(tmp_path):
    meta = {"slide": "abc", "model": "m1", "mpp": 0.5, "tile_size": 224}
    tiles = _tiles(10)
    vectors = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    cache = EmbeddingCache(tmp_path / "emb", meta, flush_every=4)
    cache.add(tiles[:3], vectors[:3])
    assert not list((tmp_path / "emb").glob("part-*"))  # below flush_every: nothing written yet
    cache.add(tiles[3:6], vectors[3:6])  # crosses flush_every: written
    cache.add(tiles[6:7], vectors[6:7])  # pending when the run "crashes"
    assert cache.missing(tiles) == tiles[7:]

    resumed = EmbeddingCache(tmp_path / "emb", meta)
    assert len(resumed) == 6 and resumed.missing(tiles) == tiles[6:]
    (tmp_path / "emb" / "part-000001.tmp.npz").write_bytes(b"half-written")  # an interrupted write is ignored
    resumed.add(tiles[6:], vectors[6:])
    resumed.flush()
    again = EmbeddingCache(tmp_path / "emb", meta)
    assert again.missing(tiles) == []
    np.testing.assert_array_equal(again.vectors_for(tiles[::-1]), vectors[::-1])

    with pytest.raises(ValueError, match=r"different settings \(model, mpp\)"):
        EmbeddingCache(tmp_path / "emb", {**meta, "model": "m2", "mpp": 1.0})
    with pytest.raises(ValueError, match="no cached embedding for tile box"):
        again.vectors_for([Tile(x=999, y=0, w=10, h=10, col=0, row=0, tissue=1.0)])
    (tmp_path / "emb" / "part-000000.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"part-000000\.npz: unreadable embedding cache part"):
        EmbeddingCache(tmp_path / "emb", meta)


def test_geojson_is_valid_and_qupath_shaped(tmp_path, svs, tissue):
    _, mask = tissue
    with open_slide(svs) as slide:
        grid = tile_grid(slide, mask, mpp=0.5, tile_size=224)
    names = ["epithelium", "stroma", "background"]
    probabilities = np.random.default_rng(1).dirichlet(np.ones(3), size=len(grid))
    path = write_geojson(tmp_path / "tiles.geojson", tiles_to_geojson(grid.tiles, probabilities, names))
    collection = json.loads(path.read_text())

    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(grid)
    ids = set()
    for feature, tile, probs in zip(collection["features"], grid.tiles, probabilities, strict=True):
        assert feature["type"] == "Feature" and set(feature) == {"type", "id", "geometry", "properties"}
        ids.add(feature["id"])
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
        ring = np.asarray(geometry["coordinates"][0], dtype=float)
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()  # closed linear ring
        area = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
        assert area == tile.w * tile.h  # positive: counter-clockwise as RFC 7946 asks
        assert ring[:, 0].min() == tile.x and ring[:, 1].max() == tile.y + tile.h  # level-0 pixels
        properties = feature["properties"]
        assert properties["objectType"] == "tile"
        classification = properties["classification"]
        assert classification["name"] == names[int(np.argmax(probs))]
        assert len(classification["color"]) == 3 and all(0 <= c <= 255 for c in classification["color"])
        measurements = properties["measurements"]
        assert sum(measurements[f"prob: {n}"] for n in names) == pytest.approx(1.0, abs=1e-4)
        assert measurements["tissue fraction"] == tile.tissue
    assert len(ids) == len(grid)
    with pytest.raises(ValueError, match="expected"):
        tiles_to_geojson(grid.tiles, probabilities[:, :2], names)
