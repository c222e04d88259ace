"""`slide map` on the real Aperio sample with a random tiny PLIP: outputs, consistency, resuming."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from pallava.cli import main
from pallava.models.plip.prompts import class_prompts
from pallava.slides.mapping import TilingOptions, load_classes, map_slide, model_fingerprint
from pallava.slides.reader import open_slide
from pallava.slides.tiling import read_tile

# 224-px tiles at 2 um/px: about 900 level-0 px each, so the sample slide gives a handful of tiles.
OPTIONS = TilingOptions(mpp=2.0, tile_size=224, min_tissue=0.25, thumbnail_side=512)
TEMPLATES = ("an H&E image of {name}.",)  # one prompt per class name keeps the text encoder cheap


@pytest.fixture(scope="module")
def plip():
    from pallava.models.plip import PlipZeroShot, build_plip

    model, tokenizer = build_plip("tiny", text_init="scratch", text_layers=1, seed=0)
    return PlipZeroShot(model, tokenizer)


@pytest.fixture
def classes(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# tissue types\nsquamous epithelium\ndermal collagen\n\nbackground\n")
    return load_classes(path)


class CountingPlip:
    """Wraps PlipZeroShot and counts (or, after `fail_after` calls, refuses) image encodings."""

    def __init__(self, plip, fail_after: int | None = None):
        self.plip, self.fail_after, self.calls, self.images = plip, fail_after, 0, 0

    def encode_pixels(self, pixel_values):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.images += len(pixel_values)
        return self.plip.encode_pixels(pixel_values)

    def __getattr__(self, name):
        return getattr(self.plip, name)


def test_map_outputs_and_probabilities_match_the_tiles(svs, plip, classes, tmp_path):
    with open_slide(svs) as slide:
        result = map_slide(slide, plip, classes, tmp_path / "out", "tiny-random", OPTIONS, 8, TEMPLATES)
        grid = result.prepared.grid
        tiles = [read_tile(slide, tile, grid.tile_size) for tile in grid.tiles[:3]]
    n = len(grid)
    assert result.class_names == ["squamous epithelium", "dermal collagen", "background"]
    assert 4 <= n <= 12 and result.probabilities.shape == (n, 3)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The stored probabilities are those of the very pixels a user reads back at the tile's box.
    np.testing.assert_allclose(
        result.probabilities[:3], plip.predict_proba(tiles, class_prompts(classes, TEMPLATES)), atol=1e-5
    )

    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "heatmap_background.png",
        "heatmap_dermal_collagen.png",
        "heatmap_squamous_epithelium.png",
        "tissue.png",
    ]
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.width > 300 and image.height > 300
    geojson = json.loads((out / "tiles.geojson").read_text())
    assert len(geojson["features"]) == n
    first = geojson["features"][0]["properties"]
    assert first["classification"]["name"] == result.class_names[int(result.probabilities[0].argmax())]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == n and summary["tiling"]["level0_side"] == grid.level0_side == 898
    assert sum(c["tiles_predicted"] for c in summary["classes"].values()) == n


@pytest.mark.slow
def test_map_resumes_after_interruption_and_reuses_the_cache(svs, plip, classes, tmp_path):
    out = tmp_path / "out"
    with open_slide(svs) as slide:
        interrupted = CountingPlip(plip, fail_after=1)
        with pytest.raises(KeyboardInterrupt):
            map_slide(slide, interrupted, classes, out, "tiny-random", OPTIONS, 2, TEMPLATES)
        assert interrupted.images == 2  # one batch embedded, then the run stopped...
        assert len(list((out / "embeddings").glob("part-*.npz"))) == 1  # ...and that batch reached disk

        resumed = CountingPlip(plip)
        first = map_slide(slide, resumed, classes, out, "tiny-random", OPTIONS, 2, TEMPLATES)
        assert resumed.images == len(first.prepared.grid) - 2

        again = CountingPlip(plip)
        second = map_slide(slide, again, classes, out, "tiny-random", OPTIONS, 2, TEMPLATES)
        assert again.images == 0
        np.testing.assert_allclose(second.probabilities, first.probabilities, atol=1e-6)

        with pytest.raises(ValueError, match=r"different settings \(level0_side, mpp\)"):
            map_slide(slide, plip, classes, out, "tiny-random", TilingOptions(mpp=1.0), 2, TEMPLATES)


def test_blank_tiling_and_class_files_give_clear_errors(svs, plip, tmp_path):
    with open_slide(svs) as slide:
        with pytest.raises(ValueError, match="no tile holds 100% tissue"):
            map_slide(slide, plip, load_classes(None), tmp_path, "m", TilingOptions(mpp=8.0, min_tissue=1.0))
        for template, problem in (
            ("H&E of {nam}", "only {name} and {organ}"),
            ("tissue", "must contain {name}"),
        ):
            with pytest.raises(ValueError, match=problem):
                map_slide(slide, plip, load_classes(None), tmp_path, "m", OPTIONS, templates=(template,))
    one = tmp_path / "one.txt"
    one.write_text("tumour\n")
    with pytest.raises(ValueError, match=r"one\.txt: zero-shot mapping needs at least two class names"):
        load_classes(one)
    with pytest.raises(ValueError, match="no such file and not a built-in label map"):
        load_classes(tmp_path / "missing.yaml")
    assert load_classes("lc25000-lung").labels() == ["lung_aca", "lung_n", "lung_scc"]
    assert len(load_classes(None)) == 9  # nct-crc-he tissue classes by default


@pytest.mark.slow
def test_map_command_end_to_end(svs, plip, tmp_path, capsys):
    plip_dir = tmp_path / "plip"
    plip.model.save_pretrained(plip_dir)
    plip.tokenizer.save_pretrained(plip_dir)
    classes = tmp_path / "classes.yaml"
    classes.write_text("EPI: {name: squamous epithelium}\nCOL: {name: collagen, synonyms: [dermis]}\n")
    out = tmp_path / "map"
    argv = [
        "slide",
        "map",
        "--slide",
        str(svs),
        "--model",
        str(plip_dir),
        "--out",
        str(out),
        "--mpp",
        "2.0",
        "--classes",
        str(classes),
        "--batch-size",
        "16",
        "--template",
        TEMPLATES[0],
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tissue tiles of 224 px at 2.0 um/px (898 level-0 px each); 2 classes" in printed
    assert (out / "heatmap_squamous_epithelium.png").is_file() and (out / "heatmap_collagen.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == model_fingerprint(plip_dir)
    assert list(summary["classes"]) == ["EPI", "COL"]

    assert (
        main(["slide", "map", "--slide", str(svs), "--model", str(tmp_path / "nope"), "--out", str(out)]) == 1
    )
    assert "PLIP model folder" in capsys.readouterr().err


def test_map_command_reports_an_interruption(svs, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pallava.slides.mapping.map_slide", interrupted)
    monkeypatch.setattr("pallava.commands.slide._load_plip", lambda model_dir, device: (None, "m"))
    argv = ["slide", "map", "--slide", str(svs), "--model", "plip", "--out", str(tmp_path / "map")]
    assert main(argv) == 130
    assert "run the same command to resume" in capsys.readouterr().err


def _saved(plip, folder):
    plip.model.save_pretrained(folder)
    plip.tokenizer.save_pretrained(folder)
    return folder


def test_map_command_refuses_a_folder_that_is_not_a_trained_plip(svs, plip, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    from pallava.models.presets import tiny_config
    from pallava.processing.tokenizer import build_tiny_tokenizer

    llm = tmp_path / "llm"  # a language model folder: PLIP would get random weights from it
    LlamaForCausalLM(tiny_config().text_config).save_pretrained(llm)
    build_tiny_tokenizer().save_pretrained(llm)
    no_text = _saved(plip, tmp_path / "no-text-tower")  # a PLIP whose text tower is missing from the weights
    weights = load_file(no_text / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("text_")}, no_text / "model.safetensors")
    no_weights = _saved(plip, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    expected = {
        llm: "is not a PLIP model folder: its config.json has model_type 'llama', expected 'pallava_plip'",
        no_text: "weights do not fill the PLIP model: missing text_",
        no_weights: "cannot load the PLIP weights",
    }
    for folder, message in expected.items():
        out = tmp_path / f"map-{folder.name}"
        argv = [
            "slide",
            "map",
            "--slide",
            str(svs),
            "--model",
            str(folder),
            "--out",
            str(out),
            "--mpp",
            "2.0",
        ]
        assert main(argv) == 1, folder
        last_line = capsys.readouterr().err.rstrip().splitlines()[-1]  # after any progress bars
        assert last_line.startswith("pallava slide: error: ") and message in last_line, last_line
        assert not (out / "summary.json").exists()


def test_plip_folders_never_run_code_they_ship(plip, tmp_path, plant_folder_code):
    from pallava.models.plip import PlipZeroShot

    folder = _saved(plip, tmp_path / "plip")
    marker = plant_folder_code(folder)
    with pytest.raises(ValueError, match="custom code"):
        PlipZeroShot.from_pretrained(folder)
    assert not marker.exists() and plant_folder_code.asked == []


def test_class_prompts_are_encoded_once_per_model_and_returned_as_copies(plip):
    from pallava.models.plip import PlipZeroShot

    fresh = PlipZeroShot(plip.model, plip.tokenizer)
    encoded = []
    encode_texts = fresh.encode_texts
    fresh.encode_texts = lambda texts: encoded.append(list(texts)) or encode_texts(texts)
    prompts = [["an H&E image of tumour."], ["an H&E image of stroma.", "stroma."]]
    first = fresh.class_embeddings(prompts)
    first.zero_()  # a caller's change to its copy does not reach the remembered embeddings
    again = fresh.class_embeddings([tuple(texts) for texts in prompts])  # the same prompts, as tuples
    assert len(encoded) == 2  # one encoding per class, the first time only
    np.testing.assert_allclose(again.norm(dim=1).numpy(), 1.0, atol=1e-5)
    fresh.class_embeddings([["an H&E image of tumour."], ["an H&E image of fat."]])
    assert len(encoded) == 4  # other prompts are encoded


def test_map_pictures_have_64_pixels_per_tile_and_at_least_1024_a_side(svs):
    from pallava.slides.mapping import PICTURE_MIN_SIDE, PICTURE_PX_PER_TILE, thumbnail_side

    with open_slide(svs) as slide:
        tile_side = 224 * 2.0 / slide.mpp()  # level-0 pixels per tile at OPTIONS' 2 um/px
        tiles_across = max(slide.dimensions) / tile_side
        coarse = TilingOptions(mpp=2.0, thumbnail_side=4096)
        fine = TilingOptions(mpp=0.25, thumbnail_side=4096)  # 8x more tiles across: 64 px each needs more
        small = thumbnail_side(slide, coarse, PICTURE_PX_PER_TILE, PICTURE_MIN_SIDE)
        large = thumbnail_side(slide, fine, PICTURE_PX_PER_TILE, PICTURE_MIN_SIDE)
        enough = math.ceil(max(slide.dimensions) / (224 * 0.25 / slide.mpp()) * PICTURE_PX_PER_TILE)
        capped = thumbnail_side(slide, OPTIONS, PICTURE_PX_PER_TILE, PICTURE_MIN_SIDE)
    assert tiles_across * PICTURE_PX_PER_TILE < PICTURE_MIN_SIDE and small == PICTURE_MIN_SIDE
    assert large == min(4096, enough)
    assert large > PICTURE_MIN_SIDE and capped == OPTIONS.thumbnail_side  # never above thumbnail_side
