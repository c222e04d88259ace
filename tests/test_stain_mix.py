"""Stain mixing across training datasets: estimated stains, the re-staining map, and its use in training."""

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image

from pallava.processing.augment import Augmentation, augment
from pallava.processing.stain_mix import StainBank, estimate_stain, transfer_matrix

DATASETS = ("lc25000-lung", "lc25000-colon", "oscc")


def _train_images(shared_data, dataset: str, count: int) -> list[str]:
    import csv

    with open(shared_data / dataset / "manifest.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    rows = random.Random(0).sample(rows, count)
    return [str(shared_data / dataset / row["path"]) for row in rows]


@pytest.fixture(scope="module")
def images(shared_data) -> dict[str, list[str]]:
    return {dataset: _train_images(shared_data, dataset, 12) for dataset in DATASETS}


@pytest.fixture(scope="module")
def bank(images) -> StainBank:
    return StainBank.estimate([(d, path) for d, paths in images.items() for path in paths], per_dataset=8)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_each_shared_dataset_gets_its_own_stain(bank, images):
    assert set(bank.stains) == set(DATASETS) and bank.mixes
    for stain in bank.stains.values():
        assert np.allclose(np.linalg.norm(stain.vectors, axis=1), 1) and (stain.scale > 0).all()
        assert (stain.vectors >= -0.05).all()  # dyes absorb: densities are not negative
    lung, oral = bank.stains["lc25000-lung"], bank.stains["oscc"]
    assert np.abs(lung.vectors - oral.vectors).max() > 0.1  # two labs, two stains
    assert len(bank.fingerprint()) == 12
    assert bank.fingerprint() != StainBank({"lc25000-lung": lung}).fingerprint()
    assert "stain mixing between" in bank.summary() and "oscc" in bank.summary()
    # the images drawn depend on which images each dataset holds, not on their order
    items = [(d, path) for d, paths in images.items() for path in paths]
    assert StainBank.estimate(items[::-1], per_dataset=8).fingerprint() == bank.fingerprint()


def test_blank_glass_has_no_stain_to_estimate():
    with pytest.raises(ValueError, match="too little stained tissue"):
        estimate_stain([np.full((32, 32, 3), 255, np.uint8)])
    with pytest.raises(ValueError, match="dataset 'glass'"):
        StainBank.estimate([("glass", 0)], load=lambda _: np.full((32, 32, 3), 250, np.uint8))


def test_transfer_maps_one_stain_onto_another_and_keeps_the_rest(bank):
    """Densities made of lung's two stains come out as the same amounts (rescaled) of oral mucosa's; a part
    outside both stains (here orthogonal to them) is kept as it is."""
    lung, oral = bank.stains["lc25000-lung"], bank.stains["oscc"]
    amounts = np.random.default_rng(0).uniform(0, 1, size=(64, 2)) * lung.scale
    rest = 0.05 * np.cross(lung.vectors[0], lung.vectors[1])
    density = amounts @ lung.vectors + rest
    expected = (amounts * oral.scale / lung.scale) @ oral.vectors + rest
    assert np.allclose(density @ transfer_matrix(lung, oral), expected)
    assert np.allclose(transfer_matrix(lung, lung), np.eye(3))


def test_mixed_views_change_colour_not_tissue(bank, images):
    config = dataclasses.replace(Augmentation.off(), stain_mix=1.0)
    changes = []
    for index, path in enumerate(images["lc25000-lung"]):
        tile = _pixels(path)
        out = augment(tile, random.Random(index), config, bank, "lc25000-lung")
        assert out.shape == tile.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
        grey_in, grey_out = tile.mean(axis=2).ravel(), out.mean(axis=2).ravel()
        assert np.corrcoef(grey_in, grey_out)[0, 1] > 0.8  # colour changes, the tissue does not
        changes.append(float(np.abs(out - tile).mean()))
    assert np.median(changes) > 3  # grey levels: a visible change of stain on most views


def test_white_stays_white_and_own_stain_is_the_identity(bank):
    white = np.full((16, 16, 3), 255, np.uint8)
    config = Augmentation(flips=False, stain=0.0, colour=0.0, zoom=0.0, resolution=0.0, stain_mix=1.0)
    assert np.allclose(augment(white, random.Random(0), config, bank, "oscc"), 255, atol=0.5)
    lung = bank.stains["lc25000-lung"]
    same = StainBank({"a": lung, "b": lung})  # another dataset with the very same stain
    assert np.allclose(same.mixing_matrix("a", random.Random(0)), np.eye(3))


def test_nothing_to_mix_leaves_views_and_their_random_draws_unchanged(bank, lung_tiles):
    tile = _pixels(lung_tiles[0])
    one = StainBank({"lc25000-lung": bank.stains["lc25000-lung"]})
    assert not one.mixes and one.mixing_matrix("lc25000-lung", random.Random(0)) is None
    assert "does nothing" in one.summary()
    assert bank.mixing_matrix("another-lab", random.Random(0)) is None  # not a training dataset
    plain = augment(tile, random.Random(3), Augmentation())
    # stain_mix off: a bank changes nothing, not even the random stream of the other augmentations
    assert np.array_equal(plain, augment(tile, random.Random(3), Augmentation(), bank, "lc25000-lung"))
    mixed = Augmentation(stain_mix=1.0)
    a = augment(tile, random.Random(3), mixed, bank, "lc25000-lung")
    assert np.array_equal(a, augment(tile, random.Random(3), mixed, bank, "lc25000-lung"))  # reproducible
    assert not np.array_equal(a, plain)


def test_training_views_use_the_datasets_stains(bank, images):
    """PLIP's dataset and the assistant's augmented views re-stain by each sample's dataset; the view cache
    key changes with the stains, and stays as before without them."""
    from pallava.train.config import AugmentSection
    from pallava.train.data import Sample, ViewMaker
    from pallava.train.plip_data import PlipDataset, PlipSample

    paths = [(d, p) for d in DATASETS for p in images[d][:2]]
    samples = [PlipSample(p, "a caption", None, i, i, dataset=d) for i, (d, p) in enumerate(paths)]
    config = dataclasses.replace(Augmentation.off(), stain_mix=1.0)
    plain = PlipDataset(samples, 224, augmentation=config)
    mixed = PlipDataset(samples, 224, augmentation=config, stains=bank)
    off = PlipDataset(samples, 224, augmentation=Augmentation.off())
    assert plain[0]["pixel_values"].equal(off[0]["pixel_values"])  # no bank: nothing to mix
    assert not plain[0]["pixel_values"].equal(mixed[0]["pixel_values"])

    section = AugmentSection(views=1, image={"stain_mix": 1.0, "zoom": 0.0})
    conversation = [{"from": "human", "value": "<image>\nOrgan?"}, {"from": "gpt", "value": "lung"}]
    train = [Sample(f"s{i}", conversation, image=p, dataset=d) for i, (d, p) in enumerate(paths)]
    views = ViewMaker.for_samples(section, 0, train)
    assert set(views.stains.stains) == set(DATASETS)
    without = ViewMaker(section, 0)
    assert views.tag != without.tag
    assert ViewMaker.for_samples(AugmentSection(views=1), 0, train).stains is None  # stain_mix off
    d, p = paths[0]
    assert views.view(p, 1, d).tobytes() != without.view(p, 1, d).tobytes()
    assert views.view(p, 1, d).tobytes() == views.view(p, 1, d).tobytes()
