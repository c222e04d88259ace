"""Virtual slides: deterministic, readable by OpenSlide and the slide commands, truth matching the pixels."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from PIL import Image

from pallava.cli import main
from pallava.data.importers.manifest import read_manifest
from pallava.data.labels import LabelMap
from pallava.slides import pyramid
from pallava.slides.mapping import TilingOptions, prepare_slide
from pallava.slides.pyramid import TileCodec, write_pyramid
from pallava.slides.reader import open_slide
from pallava.slides.virtual import (
    QUADRANTS,
    build_virtual_slides,
    is_benign,
    list_slides,
    load_truth,
    organ_pools,
    plan_slide,
    region_rings,
    shoelace,
)

SMALL = {"min_tiles": 12, "max_tiles": 24}


@pytest.fixture(scope="module")
def dev_tiles(lung):
    return read_manifest(lung / "manifest.csv", "dev")


@pytest.fixture(scope="module")
def built(tmp_path_factory, dev_tiles):
    out = tmp_path_factory.mktemp("virtual")
    build_virtual_slides(dev_tiles, LabelMap.builtin("lc25000-lung"), 4, out, seed=3, progress=False, **SMALL)
    return out


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, dev_tiles, built):
    label_map = LabelMap.builtin("lc25000-lung")
    build_virtual_slides(dev_tiles, label_map, 4, tmp_path / "again", seed=3, progress=False, **SMALL)
    build_virtual_slides(dev_tiles, label_map, 1, tmp_path / "other", seed=4, progress=False, **SMALL)
    for path in list_slides(built):
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes()
        assert load_truth(tmp_path / "again" / path.name) == load_truth(path)
    first = "slide-0000-lung.tiff"
    assert (tmp_path / "other" / first).read_bytes() != (built / first).read_bytes()


def test_openslide_reads_the_pyramid_and_the_slide_grid_lies_on_the_pasted_tiles(built):
    for path in list_slides(built):
        truth = load_truth(path)
        with open_slide(path) as slide:
            assert slide.info.vendor == "generic-tiff"
            assert slide.info.mpp_x == pytest.approx(0.5) and slide.info.mpp_y == pytest.approx(0.5)
            assert [list(d) for d in slide.info.level_dimensions] == truth["levels"]
            grid = prepare_slide(slide, TilingOptions(mpp=0.5, tile_size=224)).grid
            pasted = {(t["x"], t["y"]): t for t in truth["tiles"]}
            # Every tile the slide commands find is a pasted tile (none straddles two); most are found.
            assert {(t.x, t.y) for t in grid.tiles} <= set(pasted)
            assert len(grid.tiles) >= 0.8 * len(pasted)
            tile = truth["tiles"][len(truth["tiles"]) // 2]
            region = np.asarray(slide.read_region_scaled(tile["x"], tile["y"], 224, 224, (224, 224)))
            source = np.asarray(Image.open(tile["image"]).convert("RGB"))
            assert np.array_equal(region, source)  # lossless: the slide holds the real tile's pixels


def test_a_build_decodes_each_source_image_once_and_a_bounded_codec_writes_the_same_files(
    tmp_path, dev_tiles, built, monkeypatch
):
    """The slides repeat their pool's images: each is decoded and compressed once per build, however often
    it recurs; a codec holding a single image (re-encoding nearly every tile) writes the same bytes."""
    decoded = []
    read = pyramid._tile_pixels
    monkeypatch.setattr(pyramid, "_tile_pixels", lambda path, size: decoded.append(path) or read(path, size))
    label_map = LabelMap.builtin("lc25000-lung")
    build_virtual_slides(dev_tiles, label_map, 4, tmp_path / "again", seed=3, progress=False, **SMALL)
    shown = [t["image"] for path in list_slides(built) for t in load_truth(path)["tiles"]]
    assert len(decoded) == len(set(decoded)) == len(set(shown)) < len(shown)

    plan = plan_slide(random.Random("3:0"), organ_pools(dev_tiles, label_map)[0], 12, 24)
    levels = write_pyramid(
        tmp_path / "bounded.tiff", plan["sources"], 224, 0.5, codec=TileCodec(224, capacity=1)
    )
    fresh = write_pyramid(tmp_path / "fresh.tiff", plan["sources"], 224, 0.5)
    assert levels == fresh
    assert (tmp_path / "bounded.tiff").read_bytes() == (tmp_path / "fresh.tiff").read_bytes()
    assert (tmp_path / "fresh.tiff").read_bytes() == (built / "slide-0000-lung.tiff").read_bytes()


def test_truth_polygons_cover_exactly_the_tumour_tiles_and_labels_come_from_the_manifest(built, dev_tiles):
    labels = {item.path: item.label for item in dev_tiles}
    tumour_slides = 0
    for path in list_slides(built):
        truth = load_truth(path)
        assert all(labels[t["image"]] == t["label"] for t in truth["tiles"])
        tumour = {(t["x"], t["y"]) for t in truth["tiles"] if t["tumour"]}
        assert truth["tumour_present"] == bool(tumour) == bool(truth["regions"]["features"])
        if not tumour:
            assert truth["location"] == [] and truth["tumour_label"] is None
            continue
        tumour_slides += 1
        assert {t["label"] for t in truth["tiles"] if t["tumour"]} == {truth["tumour_label"]}
        assert not is_benign(LabelMap.builtin("lc25000-lung")[truth["tumour_label"]])
        inside = set()
        for feature in truth["regions"]["features"]:
            geometry = feature["geometry"]
            polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
            for rings in polygons:
                assert shoelace(rings[0]) > 0 and rings[0][0] == rings[0][-1]
                outline = PolygonPath(np.asarray(rings[0], float))
                for t in truth["tiles"]:
                    if outline.contains_point((t["x"] + 112, t["y"] + 112)):
                        inside.add((t["x"], t["y"]))
        assert inside == tumour
        assert truth["location"] and set(truth["location"]) <= set(QUADRANTS)
    assert tumour_slides >= 1


def test_region_rings_split_corner_touching_cells_and_keep_holes():
    diagonal = np.zeros((3, 3), bool)
    diagonal[0, 0] = diagonal[1, 1] = True
    rings = [ring[::-1] for ring in region_rings(diagonal, 10)]
    assert sorted(shoelace(r) for r in rings) == [100, 100]
    ring_with_hole = np.ones((3, 3), bool)
    ring_with_hole[1, 1] = False
    areas = sorted(shoelace(r[::-1]) for r in region_rings(ring_with_hole, 1))
    assert areas == [-1, 9]


def test_cli_builds_slides_from_a_manifest_and_refuses_organless_labels(tmp_path, lung, capsys):
    code = main(
        [
            "data",
            "build",
            "--kind",
            "virtual-slides",
            "--data",
            str(lung / "manifest.csv"),
            "--split",
            "dev",
            "--n",
            "1",
            "--out",
            str(tmp_path / "cli"),
            "--min-tiles",
            "10",
            "--max-tiles",
            "12",
            "--no-progress",
        ]
    )
    assert code == 0 and "wrote 1 virtual slides" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["slides"][0]["organ"] == "lung"
    organless = LabelMap.from_dict(
        {"lung_n": {"name": "benign lung tissue"}, "lung_aca": {"name": "adenocarcinoma"}}
    )
    items = read_manifest(lung / "manifest.csv", "dev")
    with pytest.raises(ValueError, match="has no organ"):
        organ_pools([i for i in items if i.label != "lung_scc"], organless)


def test_balanced_slides_alternate_tumour_and_none_on_every_organ(shared_data, tmp_path):
    from pallava.data.datasets import merged_label_map, parse_data_args, read_labelled

    datasets = parse_data_args([str(shared_data / name) for name in ("lc25000-lung", "oscc")])
    items = read_labelled(datasets, "dev")
    slides = build_virtual_slides(
        items,
        merged_label_map(datasets, items, None),
        8,
        tmp_path,
        seed=0,
        progress=False,
        balanced=True,
        min_tiles=40,
        max_tiles=50,
    )
    for organ in ("lung", "oral cavity"):
        assert [s["tumour_present"] for s in slides if s["organ"] == organ] == [True, False, True, False]
    assert json.loads((tmp_path / "index.json").read_text())["balanced"] is True
