"""Anyres tiling, letterboxing, normalisation and the safety limits of image loading."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pallava.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    PAPER_GRIDS,
    PaLlavaImageProcessor,
    letterbox_pixels,
    normalize_to_tensor,
)
from pallava.processing.loading import CorruptImageError, ImageTooLargeError, load_image


def quadrants(size: int) -> Image.Image:
    """A 2x2 image of four flat colours: red, green / blue, white."""
    array = np.zeros((2 * size, 2 * size, 3), np.uint8)
    array[:size, :size] = (255, 0, 0)
    array[:size, size:] = (0, 255, 0)
    array[size:, :size] = (0, 0, 255)
    array[size:, size:] = (255, 255, 255)
    return Image.fromarray(array)


def colour_of(crop: torch.Tensor) -> tuple[int, int, int]:
    """Undo CLIP normalisation at a crop's centre pixel."""
    pixel = crop[:, crop.shape[1] // 2, crop.shape[2] // 2]
    rgb = (pixel * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)) * 255
    return tuple(int(round(v)) for v in rgb.tolist())


def test_default_policy_keeps_small_images_small():
    processor = PaLlavaImageProcessor(tile_size=224)
    assert processor.select_grid((224, 224)) == (1, 1)
    assert processor.select_grid((448, 224)) == (2, 1)
    assert all(c * r <= processor.max_tiles for c, r in processor.grids)


def test_paper_policy_uses_their_fifteen_grids():
    processor = PaLlavaImageProcessor(tile_size=224, grid_policy="paper")
    assert processor.grids == PAPER_GRIDS
    # Every grid has at least 4 tiles: the tie between the least-waste ones goes to the first listed.
    assert processor.select_grid((224, 224)) == (1, 4)
    assert processor.select_grid((1000, 300)) == (4, 2)
    assert min(c * r for c, r in processor.grids) == 4


def test_tiles_are_row_major_and_global_view_first():
    processor = PaLlavaImageProcessor(tile_size=32)
    tiled = processor.tile(quadrants(32))
    assert tiled.grid == (2, 2)
    assert tiled.pixel_values.shape == (5, 3, 32, 32)
    colours = [colour_of(crop) for crop in tiled.pixel_values[1:]]
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def test_global_view_is_letterboxed_not_stretched():
    processor = PaLlavaImageProcessor(tile_size=64, padding="black")
    wide = Image.new("RGB", (256, 64), (255, 255, 255))
    global_view = processor.tile(wide).pixel_values[0]
    assert colour_of(global_view) == (255, 255, 255)
    top_row = global_view[:, 0, global_view.shape[2] // 2]
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(top_row, black)  # padding band above the image


def test_letterbox_bands_mirror_the_image_by_default():
    # a wide image with a red top half and a blue bottom half: the band above mirrors the red rows, the band
    # below the blue ones, and no pixel is black (a band no tile in training had)
    pixels = np.zeros((40, 160, 3), np.uint8)
    pixels[:20, :, 0], pixels[20:, :, 2] = 255, 255
    pixels[:, :, 1] = np.arange(160, dtype=np.uint8)[None, :]  # a horizontal ramp, kept by vertical mirroring
    square = letterbox_pixels(torch.from_numpy(pixels), 160, 160).numpy()
    top = (160 - 40) // 2
    np.testing.assert_array_equal(square[top : top + 40], pixels)  # the image itself, unscaled, centred
    np.testing.assert_array_equal(square[top - 1], pixels[0])  # reflected at the edge
    np.testing.assert_array_equal(square[top + 40], pixels[-1])
    assert (square.sum(axis=-1) > 0).all()
    tall = letterbox_pixels(torch.from_numpy(pixels[:, :4]), 160, 160).numpy()  # bands 39x wider than it
    assert tall.shape == (160, 160, 3) and (tall.sum(axis=-1) > 0).all()
    processor = PaLlavaImageProcessor(tile_size=64)
    assert processor.padding == "mirror"
    global_view = processor.tile(Image.fromarray(pixels)).pixel_values[0]
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert not torch.isclose(global_view, black.view(3, 1, 1)).all(dim=0).any()
    with pytest.raises(ValueError, match=r"padding must be one of 'mirror', 'black', got 'grey'"):
        letterbox_pixels(torch.from_numpy(pixels), 160, 160, "grey")


def test_stretched_global_view_is_available_for_reference_weights():
    processor = PaLlavaImageProcessor(tile_size=64, global_view="stretch")
    wide = Image.new("RGB", (256, 64), (255, 255, 255))
    global_view = processor.tile(wide).pixel_values[0]
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(global_view[:, 0, 32], white)  # no padding band: the image fills the square
    with pytest.raises(ValueError, match="global_view"):
        PaLlavaImageProcessor(global_view="squash")


def test_normalisation_matches_clip_constants():
    white = normalize_to_tensor(Image.new("RGB", (8, 8), (255, 255, 255)), 8)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(white[:, 3, 3], expected)


def test_batch_pads_tiles_and_masks_them():
    processor = PaLlavaImageProcessor(tile_size=32)
    batch = processor([Image.new("RGB", (32, 32)), quadrants(32)])
    assert batch["pixel_values"].shape == (2, 5, 3, 32, 32)
    assert batch["tile_mask"].tolist() == [[True, False, False, False], [True, True, True, True]]
    assert batch["grids"].tolist() == [[1, 1], [2, 2]]


@pytest.mark.parametrize("size", [(224, 224), (1, 1), (150, 160)])
def test_paper_grid_tiles_that_hold_no_pixels_are_masked(size):
    # The paper's grid list has no 1x1: a small image lands on 1x4 with empty tiles above and below.
    processor = PaLlavaImageProcessor(tile_size=224, grid_policy="paper", padding="black")
    image = Image.new("RGB", size, (255, 255, 255))
    tiled = processor.tile(image)
    assert tiled.grid == (1, 4)
    assert tiled.tile_mask.tolist() == [False, True, True, False]
    mirrored = PaLlavaImageProcessor(tile_size=224, grid_policy="paper").tile(image)
    assert torch.equal(mirrored.tile_mask, tiled.tile_mask)  # where the image is, not what fills the rest
    black = (torch.zeros(3) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    for tile, keep in zip(tiled.pixel_values[1:], tiled.tile_mask, strict=True):
        assert keep == (not torch.allclose(tile, black[:, None, None].expand_as(tile)))
    batch = processor([image, quadrants(448)])
    assert batch["tile_mask"].tolist() == [[False, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("size", [(224, 224), (1, 1), (100, 300), (3000, 200), (1000, 1000), (250, 2000)])
def test_default_grid_tiles_all_hold_pixels(size):
    # Ties go to the least wasted area, so the default policy never picks a grid with an empty tile.
    processor = PaLlavaImageProcessor(tile_size=224)
    tiled = processor.tile(Image.new("RGB", size, (255, 255, 255)))
    assert tiled.tile_mask.all() and len(tiled.tile_mask) == tiled.num_tiles


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size and whose pixel data is missing: decoding would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageTooLargeError, match="5000x4000 = 20,000,000 pixels, over the limit"):
        load_image(huge_png_header(5000, 4000))
    with pytest.raises(ImageTooLargeError):  # far past Pillow's own bomb guard too
        load_image(huge_png_header(100_000, 100_000), max_pixels=None)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (20, 20)), max_pixels=100)


def test_corrupt_and_missing_images_give_clear_errors(tmp_path):
    with pytest.raises(CorruptImageError, match="cannot decode"):
        load_image(b"not an image at all")
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(truncated, format="JPEG")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(truncated.getvalue()[:40])
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        load_image(broken)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.png")


def test_real_tiles_and_arrays_load_as_rgb(lung_tiles):
    image = load_image(lung_tiles[0])
    assert image.mode == "RGB" and image.size == (224, 224)
    assert load_image(np.asarray(image)).size == (224, 224)
    assert load_image(lung_tiles[0].read_bytes()).size == (224, 224)


def test_float_images_in_zero_one_load_like_their_uint8_form(lung_tiles):
    pixels = np.asarray(load_image(lung_tiles[0]))
    unit = pixels.astype(np.float32) / 255.0
    assert np.array_equal(np.asarray(load_image(unit)), pixels)
    assert np.array_equal(np.asarray(load_image(unit.astype(np.float64))), pixels)
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(unit))), pixels)  # (H, W, 3) tensor
    assert np.array_equal(
        np.asarray(load_image(torch.from_numpy(unit).permute(2, 0, 1))), pixels
    )  # (3, H, W)
    grey = np.full((8, 8), 0.5, np.float32)
    assert np.asarray(load_image(grey))[0, 0].tolist() == [128, 128, 128]
    assert (
        PaLlavaImageProcessor()([unit])["pixel_values"].shape
        == PaLlavaImageProcessor()([pixels])["pixel_values"].shape
    )


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((8, 8, 3), 200.0, np.float32), r"values from 200 to 200; expected floats in \[0, 1\]"),
        (np.full((8, 8, 3), -0.5, np.float32), r"values from -0.5 to -0.5"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
        (np.array([[[0.1, np.inf, 0.2]]], np.float32), "NaN or infinite"),
    ],
)
def test_float_images_outside_zero_one_or_not_finite_are_refused(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)
    with pytest.raises(ValueError, match=message):
        load_image(torch.from_numpy(array))


def _pil_letterbox(image: Image.Image, width: int, height: int) -> np.ndarray:
    """Independent reference: PIL's bicubic resize, aspect kept, centred on black."""
    scale = min(width / image.width, height / image.height)
    new_w, new_h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((width - new_w) // 2, (height - new_h) // 2))
    return np.asarray(canvas).astype(np.int16)


@pytest.mark.parametrize("size", [(224, 224), (1024, 768), (150, 400)])
def test_resizing_matches_pil_bicubic_within_two_grey_levels(lung_tiles, size):
    # the tiles are resized in torch (uint8 antialiased bicubic) for speed; they must stay PIL's bicubic
    image = Image.open(lung_tiles[0]).convert("RGB").resize(size, Image.LANCZOS)
    processor = PaLlavaImageProcessor(grid_policy="paper", padding="black")
    cols, rows = processor.select_grid(image.size)
    crops = processor([image])["pixel_values"][0]
    grey_levels = (crops * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)) * 255
    ours = grey_levels.round().to(torch.int16).permute(0, 2, 3, 1).numpy()  # (1 + tiles, S, S, 3)
    canvas = _pil_letterbox(image, cols * 224, rows * 224)
    reference_tiles = (
        canvas.reshape(rows, 224, cols, 224, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 224, 224, 3)
    )
    assert np.abs(ours[0] - _pil_letterbox(image, 224, 224)).max() <= 2
    assert np.abs(ours[1:] - reference_tiles).max() <= 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_tiles": 100_000}, r"max_tiles must be an integer from 1 to 64, got 100000"),
        ({"max_tiles": 0}, r"max_tiles must be an integer from 1 to 64, got 0"),
        ({"max_tiles": True}, r"max_tiles must be an integer from 1 to 64, got True"),
        ({"max_tiles": 8.5}, r"max_tiles must be an integer from 1 to 64, got 8\.5"),
        ({"tile_size": 1_000_000}, r"tile_size must be an integer from 8 to 1,024, got 1000000"),
        ({"tile_size": "224"}, r"tile_size must be an integer from 8 to 1,024, got '224'"),
        (
            {"max_pixels": -1},
            r"max_pixels must be null \(no limit\) or an integer from 1 to 268,435,456, got -1",
        ),
        ({"max_pixels": 10**13}, r"max_pixels must be null .* got 10000000000000"),
        ({"grid_policy": "huge"}, r"grid_policy must be one of 'default', 'paper', got 'huge'"),
        (
            {"global_view": ["stretch"]},
            r"global_view must be one of 'letterbox', 'stretch', got \['stretch'\]",
        ),
        ({"padding": "white"}, r"padding must be one of 'mirror', 'black', got 'white'"),
    ],
)
def test_absurd_processor_settings_are_refused_on_load(tmp_path, settings, message):
    PaLlavaImageProcessor().save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    with pytest.raises(ValueError, match=rf"preprocessor_config\.json: {message}"):
        PaLlavaImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        PaLlavaImageProcessor(**{**PaLlavaImageProcessor().to_dict(), **settings})


def test_unreadable_processor_file_names_the_file(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: not valid JSON"):
        PaLlavaImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[8]")
    with pytest.raises(
        ValueError, match=r"preprocessor_config\.json: expected a JSON object at the top level, got list"
    ):
        PaLlavaImageProcessor.from_pretrained(tmp_path)
    edge = PaLlavaImageProcessor(tile_size=1024, max_tiles=64, max_pixels=None, grid_policy="paper")
    edge.save_pretrained(tmp_path)
    assert PaLlavaImageProcessor.from_pretrained(tmp_path) == edge
