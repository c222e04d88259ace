"""Stain normalisation recorded with the vision tower: a PLIP trained on normalised images records it, and
zero-shot, the exported tower, the assistant built on it and its saved folder all apply it by themselves."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pallava import load_preset
from pallava.cli import main
from pallava.inference import PaLlava
from pallava.models.plip import PlipZeroShot
from pallava.processing.image import PaLlavaImageProcessor, letterbox, normalize_to_tensor
from pallava.processing.loading import load_image
from pallava.processing.stain_norm import resolve_stain_normalize, stain_normalize
from pallava.train.feature_cache import namespace_for
from pallava.train.plip_config import PlipTrainConfig
from pallava.train.plip_data import PlipDataset, read_plip_data

pytestmark = pytest.mark.slow  # trains a PLIP for two steps: `make test-fast` skips it, `make test` runs it


@pytest.fixture(scope="module")
def manifest(lung_subset) -> Path:
    """Six train images per class of the real lung manifest."""
    return lung_subset(6)


@pytest.fixture(scope="module")
def normalised_plip(manifest, tmp_path_factory) -> Path:
    """A tiny PLIP trained two steps with `stain_normalize: macenko` (a KEY=VALUE override)."""
    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"preset": "tiny", "batch_size": 8, "text_layers": 1, "itm_max_pairs": 2, "cpu_threads": 1}
        )
    )
    out = tmp_path_factory.mktemp("plip")
    command = ["plip", "train", "--data", str(manifest), "--config", str(recipe), "--out", str(out)]
    assert main([*command, "--max-steps", "2", "--no-progress", "stain_normalize=macenko"]) == 0
    return out


def test_the_recipe_checks_the_setting():
    assert PlipTrainConfig.for_preset("tiny").stain_normalize is None  # off in the shipped recipe
    with pytest.raises(ValueError, match="stain_normalize must be null .* or one of macenko, got 'reinhard'"):
        PlipTrainConfig.for_preset("tiny", stain_normalize="reinhard")
    with pytest.raises(ValueError, match="augment.stain_mix re-stains views"):
        PlipTrainConfig.for_preset("tiny", stain_normalize="macenko", augment={"stain_mix": 0.5})


def test_training_images_are_normalised_before_they_are_cached(manifest, lung_tiles):
    samples, label_map = read_plip_data(manifest, None, None)
    plain = PlipDataset(samples[:2], 224, label_map, train=False)
    normalised = PlipDataset(samples[:2], 224, label_map, train=False, stain_normalize="macenko")
    expected = np.asarray(letterbox(stain_normalize(load_image(samples[0].image), "macenko"), 224, 224))
    np.testing.assert_array_equal(normalised._pixels(0), expected)
    assert np.abs(normalised._pixels(0).astype(int) - plain._pixels(0).astype(int)).mean() > 1


def test_a_normalised_plip_records_it_and_zero_shot_applies_it(normalised_plip, lung_tiles):
    config = json.loads((normalised_plip / "config.json").read_text())
    assert config["vision_config"]["stain_normalize"] == "macenko"
    zs = PlipZeroShot.from_pretrained(normalised_plip)
    assert zs.stain_normalize == "macenko"
    tile = lung_tiles[0]
    expected = normalize_to_tensor(stain_normalize(load_image(tile), "macenko"), zs.model.image_size)
    assert torch.equal(zs.pixels(tile), expected)
    zs.stain_normalize = resolve_stain_normalize("none", zs.stain_normalize)  # `--stain-normalize none`
    assert not torch.equal(zs.pixels(tile), expected)


def test_the_assistant_built_on_the_exported_tower_normalises_and_keeps_it(
    normalised_plip, lung_tiles, tmp_path, capsys
):
    vision = tmp_path / "vision"
    assert main(["plip", "export-vision", "--model", str(normalised_plip), "--out", str(vision)]) == 0
    assert json.loads((vision / "config.json").read_text())["stain_normalize"] == "macenko"
    model, processor = load_preset("tiny", vision_path=vision, seed=0)
    assert processor.image_processor.stain_normalize == "macenko"
    assistant = PaLlava(model, processor)
    assistant.save_pretrained(tmp_path / "assistant")
    assert main(["info", "--model", str(tmp_path / "assistant")]) == 0
    assert '"stain_normalize": "macenko"' in capsys.readouterr().out
    loaded = PaLlava.from_pretrained(tmp_path / "assistant")
    assert loaded.stain_normalize == "macenko"
    assert loaded.model.config.vision_config.stain_normalize == "macenko"
    tile = lung_tiles[0]
    pixels = loaded.processor.image_processor([tile])["pixel_values"]
    by_hand = PaLlavaImageProcessor()([stain_normalize(load_image(tile), "macenko")])["pixel_values"]
    assert torch.equal(pixels, by_hand)
    off = PaLlava.from_pretrained(tmp_path / "assistant", stain_normalize="none")
    assert off.stain_normalize is None
    assert not torch.equal(off.processor.image_processor([tile])["pixel_values"], by_hand)
    # a feature cache never mixes normalised and plain features of one tower
    keys = {
        namespace_for(m.model.vision_tower, -2, m.processor.image_processor, "auto") for m in (loaded, off)
    }
    assert len(keys) == 2


def test_towers_that_record_nothing_and_bad_values():
    model, processor = load_preset("tiny", seed=0)
    assert processor.image_processor.stain_normalize is None
    assert PaLlava(model, processor, stain_normalize="macenko").stain_normalize == "macenko"
    assert resolve_stain_normalize(None, "macenko") == "macenko"  # no flag: the model's own
    with pytest.raises(ValueError, match="stain_normalize must be null .* got 'vahadane'"):
        PaLlavaImageProcessor(stain_normalize="vahadane")
    with pytest.raises(ValueError, match="--stain-normalize must be null .* got 'vahadane'"):
        resolve_stain_normalize("vahadane", None)
    assistant = PaLlava(model, processor)
    with pytest.raises(ValueError, match="stain_normalize must be"):
        assistant.stain_normalize = "vahadane"
