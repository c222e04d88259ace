"""Augmentation keeps shapes and dtypes and changes pixels within stated bounds; stain normalisation."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pallava.processing.augment import (
    Augmentation,
    augment,
    colour_jitter,
    degrade_resolution,
    hed_jitter,
    rescale,
    rotate_hue,
)
from pallava.processing.stain_norm import stain_normalize


@pytest.fixture(scope="module")
def tile(lung_tiles):
    return np.asarray(Image.open(lung_tiles[0]).convert("RGB"))


def _mean_abs(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_every_augmentation_keeps_shape_dtype_and_range(tile):
    rng = random.Random(0)
    for config in (
        Augmentation(),
        Augmentation(stain=0.3, stain_vectors=0.3, stain_amount=3.0, zoom=1.0, max_zoom=4, resolution=1.0),
        Augmentation(hue=0.5, grayscale=0.5),
        Augmentation.off(),
    ):
        for _ in range(5):
            out = augment(tile, rng, config)
            assert out.shape == tile.shape and out.dtype == np.float32
            assert 0 <= out.min() and out.max() <= 255


def test_off_is_the_identity_and_views_are_reproducible(tile):
    assert np.array_equal(augment(tile, random.Random(0), Augmentation.off()), tile.astype(np.float32))
    a = augment(tile, random.Random("s:1:7"), Augmentation())
    assert np.array_equal(a, augment(tile, random.Random("s:1:7"), Augmentation()))
    assert not np.array_equal(a, augment(tile, random.Random("s:2:7"), Augmentation()))


def test_hed_jitter_changes_colour_within_its_strength(tile):
    assert _mean_abs(hed_jitter(tile, random.Random(0), 0.0), tile) < 0.01  # exact round trip
    light = [_mean_abs(hed_jitter(tile, random.Random(s), 0.05), tile) for s in range(8)]
    strong = [_mean_abs(hed_jitter(tile, random.Random(s), 0.3), tile) for s in range(8)]
    assert 0.5 < np.mean(light) < 12 and np.mean(strong) > 2 * np.mean(light)
    # colour only: the layout of dark (nuclei) and light pixels stays
    out = hed_jitter(tile, random.Random(1), 0.3).mean(axis=2)
    assert np.corrcoef(out.ravel(), tile.mean(axis=2).ravel())[0, 1] > 0.9


def test_colour_jitter_is_brightness_then_contrast_then_saturation_in_one_pass(tile):
    """The folded jitter equals the three maps applied in turn: brightness, contrast about the image's
    mean, saturation about each pixel's grey."""
    x = tile.astype(np.float64)
    for brightness, contrast, saturation in ((1.1, 0.9, 1.05), (0.9, 1.1, 0.92), (1.0, 1.0, 1.0)):
        step = x * brightness
        step = (step - step.mean()) * contrast + step.mean()
        grey = step.mean(axis=2, keepdims=True)
        expected = (step - grey) * saturation + grey
        got = colour_jitter(tile.astype(np.float32), brightness, contrast, saturation)
        assert got.dtype == np.float32 and got.shape == tile.shape
        np.testing.assert_allclose(got, expected, atol=1e-3)


def _hed_density(pixels: np.ndarray) -> np.ndarray:
    """Per-pixel haematoxylin, eosin and DAB densities (Ruifrok-Johnston unmixing), (N, 3)."""
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    rgb_from_hed /= np.linalg.norm(rgb_from_hed, axis=1, keepdims=True)
    density = -np.log(np.maximum(pixels.reshape(-1, 3).astype(np.float64), 1.0) / 255.0)
    return density @ np.linalg.inv(rgb_from_hed)


def test_stain_amount_multiplies_each_dye_by_a_factor_within_its_range(tile):
    # Pixels far from saturation (no clipping at 0 or 255), where the densities can be read back exactly.
    keep = ((tile > 20) & (tile < 200)).all(axis=2).ravel()
    before = _hed_density(tile)[keep]
    factors = []
    for seed in range(24):
        after = _hed_density(hed_jitter(tile, random.Random(seed), 0.0, amount=2.0).round().astype(np.uint8))
        after = after[keep]
        strong = np.abs(before) > 0.2  # read a ratio only where the dye is present
        ratio = [np.median(after[strong[:, i], i] / before[strong[:, i], i]) for i in range(3)]
        assert 0.45 < ratio[0] < 2.1 and 0.45 < ratio[1] < 2.1  # in [1/2, 2], up to uint8 rounding
        assert abs(ratio[2] - 1) < 0.05  # DAB is left alone
        factors.append(ratio[:2])
    factors = np.log(np.array(factors))
    # log-uniform: darker and paler views alike, and the two dyes drawn apart
    assert factors.min() < -0.3 and factors.max() > 0.3
    assert np.abs(factors[:, 0] - factors[:, 1]).max() > 0.3
    assert np.array_equal(  # seeded, and off at 1: the same view as without the argument
        hed_jitter(tile, random.Random(5), 0.1, amount=1.0), hed_jitter(tile, random.Random(5), 0.1)
    )


def test_stain_vectors_change_the_hue_more_the_stronger_they_are(tile):
    def chroma(a):  # each channel's share of the pixel's sum: the hue and saturation, not the brightness
        a = a.astype(np.float32) + 1
        return a / a.sum(axis=2, keepdims=True)

    def hue_change(vectors):
        return np.mean(
            [
                np.abs(chroma(hed_jitter(tile, random.Random(s), 0.0, vectors)) - chroma(tile)).mean()
                for s in range(6)
            ]
        )

    assert hue_change(0.0) < 0.001 < hue_change(0.05) < 0.5 * hue_change(0.3)
    out = hed_jitter(tile, random.Random(3), 0.1, 0.2)
    assert out.shape == tile.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 255
    assert np.corrcoef(out.mean(axis=2).ravel(), tile.mean(axis=2).ravel())[0, 1] > 0.9
    assert np.array_equal(out, hed_jitter(tile, random.Random(3), 0.1, 0.2))  # seeded
    with pytest.raises(ValueError, match="'stain_vectors' must be in"):
        Augmentation(stain_vectors=1.5)


def test_rescale_zooms_in_and_out(tile):
    zoom_in = rescale(tile, random.Random(0), 2.0)
    zoom_out = rescale(tile, random.Random(0), 0.5)
    assert zoom_in.shape == zoom_out.shape == tile.shape and zoom_in.dtype == np.uint8

    # zoomed in, neighbouring pixels are more alike (bigger structures); zoomed out, less alike
    def roughness(a):
        return np.abs(np.diff(a.astype(np.float32), axis=1)).mean()

    assert roughness(zoom_in) < roughness(tile) < roughness(zoom_out)
    # zooming out by 2 keeps the whole tile, shrunk, somewhere in the view, mirrored around it
    shrunk = np.asarray(Image.fromarray(tile).resize((tile.shape[1] // 2, tile.shape[0] // 2), Image.BICUBIC))
    h, w = shrunk.shape[:2]
    found = [
        (top, left)
        for top in range(tile.shape[0] - h + 1)
        for left in range(tile.shape[1] - w + 1)
        if np.array_equal(zoom_out[top : top + h, left : left + w], shrunk)
    ]
    assert len(found) == 1
    top, left = found[0]
    if left > 0:  # the column left of the tile mirrors its first column
        assert np.array_equal(zoom_out[top : top + h, left - 1], shrunk[:, 0])
    assert rescale(tile, random.Random(0), 1.0).shape == tile.shape


def test_resolution_jitter_removes_detail_but_keeps_colour(tile):
    blurred = degrade_resolution(tile, 4.0)
    assert blurred.shape == tile.shape
    assert abs(blurred.mean() - tile.mean()) < 3
    assert (
        np.abs(np.diff(blurred.astype(float), axis=1)).mean()
        < 0.6 * np.abs(np.diff(tile.astype(float), axis=1)).mean()
    )


def test_bad_settings_and_inputs_are_refused(tile):
    with pytest.raises(ValueError, match="'stain' must be in"):
        Augmentation(stain=2.0)
    with pytest.raises(ValueError, match="'stain_amount' must be in \\[1, 4\\]"):
        Augmentation(stain_amount=0.5)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tint'\]"):
        Augmentation.from_dict({"tint": 0.1})
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        augment(tile.astype(np.float32), random.Random(0), Augmentation())


def test_macenko_normalisation_maps_two_stainings_closer(tile):
    reference = np.asarray(stain_normalize(Image.fromarray(tile), "macenko"))
    assert reference.shape == tile.shape and reference.dtype == np.uint8
    before, after = [], []
    for seed in (1, 2):  # the same tissue restained strongly (another lab's haematoxylin and eosin)
        restained = hed_jitter(tile, random.Random(seed), 0.3).astype(np.uint8)
        before.append(_mean_abs(tile, restained))
        after.append(_mean_abs(reference, np.asarray(stain_normalize(Image.fromarray(restained), "macenko"))))
    assert np.mean(after) < 0.8 * np.mean(before)
    assert stain_normalize(Image.fromarray(tile), None) is not None
    with pytest.warns(UserWarning, match="too little stained tissue"):
        blank = stain_normalize(Image.new("RGB", (32, 32), "white"), "macenko")
    assert blank.size == (32, 32)
    with pytest.raises(ValueError, match="unknown stain normalisation"):
        stain_normalize(Image.fromarray(tile), "reinhard-ish")


def test_stain_normalisation_at_inference_is_off_by_default_and_changes_inputs(tiny, lung_tiles):
    from pallava.inference import PaLlava

    model, processor = tiny
    assistant = PaLlava(model, processor)
    assert assistant.stain_normalize is None
    conversation = [processor.question("What is shown?", True)]
    plain = assistant._inputs(conversation, [[lung_tiles[0]]])
    assistant.stain_normalize = "macenko"  # set on the processor it wraps (the session's shared fixture)
    try:
        normalised = assistant._inputs(conversation, [[lung_tiles[0]]])
        assert normalised["pixel_values"].shape == plain["pixel_values"].shape
        assert not torch.equal(normalised["pixel_values"], plain["pixel_values"])
        assert isinstance(assistant.ask(lung_tiles[0], "What is shown?", max_new_tokens=2), str)
    finally:
        assistant.stain_normalize = None


def test_hue_turns_colours_about_the_grey_axis(tile):
    pixels = tile.astype(np.float32)
    turned = rotate_hue(pixels, 0.1)
    assert _mean_abs(turned, pixels) > 5  # the colours moved
    np.testing.assert_allclose(turned.mean(axis=2), pixels.mean(axis=2), atol=1e-3)  # brightness kept
    grey = np.full((4, 4, 3), 120.0, dtype=np.float32)
    np.testing.assert_allclose(rotate_hue(grey, 0.3), grey, atol=1e-3)  # greys stay grey
    np.testing.assert_allclose(rotate_hue(turned, -0.1), pixels, atol=1e-2)  # and it turns back
    np.testing.assert_allclose(rotate_hue(pixels, 1 / 3), pixels[..., [2, 0, 1]], atol=1e-2)  # a third: R->G


def test_grey_views_and_hue_turns_come_only_when_asked(tile):
    views = [augment(tile, random.Random(i), Augmentation(grayscale=0.5)) for i in range(20)]
    grey = [bool(np.allclose(v[..., 0], v[..., 1]) and np.allclose(v[..., 1], v[..., 2])) for v in views]
    assert 3 <= sum(grey) <= 17  # about half
    plain = Augmentation()
    for seed in range(5):  # off (the default): the same views as before the fields existed
        assert not np.allclose(augment(tile, random.Random(seed), plain)[..., 0], 0)
        assert np.array_equal(
            augment(tile, random.Random(seed), plain),
            augment(tile, random.Random(seed), Augmentation(hue=0.0, grayscale=0.0)),
        )
    with pytest.raises(ValueError, match="'hue' must be in"):
        Augmentation(hue=0.6)
    with pytest.raises(ValueError, match="'grayscale' must be in"):
        Augmentation(grayscale=2)
