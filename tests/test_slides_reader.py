"""Slide reading on the real Aperio sample and on broken files: metadata, bounded reads, clear errors."""

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from pallava.cli import main
from pallava.slides.reader import SlideReadError, open_slide

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_pyramid(path: Path, mpp: float | None = 0.25) -> np.ndarray:
    """A 3-level tiled TIFF (768 x 1024 at `mpp`, or without a physical size): glass with a magenta block."""
    image = np.full((1024, 768, 3), 240, np.uint8)
    image[200:800, 100:600] = (180, 60, 150)
    with tifffile.TiffWriter(path) as writer:
        for level in range(3):
            step = 2**level
            resolution = 1e4 / (mpp * step) if mpp else 1.0  # pixels per centimetre
            writer.write(
                np.ascontiguousarray(image[::step, ::step]),
                tile=(128, 128),
                photometric="rgb",
                compression="zlib",
                resolution=(resolution, resolution),
                resolutionunit="CENTIMETER" if mpp else "NONE",
                subfiletype=1 if level else 0,
            )
    return image


def test_info_fields_of_real_aperio_slide(svs, capsys):
    with open_slide(svs) as slide:
        info = slide.info
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (2220, 2967)
    assert (
        info.level_count == 1
        and info.level_dimensions == ((2220, 2967),)
        and info.level_downsamples == (1.0,)
    )
    assert info.mpp_x == pytest.approx(0.499) and info.mpp_y == pytest.approx(0.499)
    assert info.objective_power == 20
    assert len(info.quickhash) == 64

    assert main(["slide", "info", str(svs)]) == 0
    text = capsys.readouterr().out
    assert "2220 x 2967" in text and "aperio" in text and "0.4990" in text
    assert main(["slide", "info", "--json", str(svs)]) == 0
    assert '"vendor": "aperio"' in capsys.readouterr().out


def test_region_read_matches_openslide_and_outside_is_white(svs):
    with open_slide(svs) as slide:
        crop = slide.read_region_scaled(1000, 1200, 50, 40, (50, 40))
        edge = slide.read_region_scaled(2200, 2950, 40, 40, (40, 40))
    raw = openslide.OpenSlide(str(svs)).read_region((1000, 1200), 0, (50, 40)).convert("RGB")
    assert crop.mode == "RGB" and crop.size == (50, 40)
    assert np.array_equal(np.asarray(crop), np.asarray(raw))
    # Pixels past the slide's right/bottom edge are transparent in OpenSlide and must come back white.
    assert (np.asarray(edge)[25:, 25:] == 255).all()


def test_thumbnail_is_bounded_and_scaled(svs):
    with open_slide(svs) as slide:
        thumb, downsample = slide.thumbnail(512)
    assert max(thumb.size) == 512
    assert downsample == pytest.approx(2967 / 512, rel=1e-3)


def test_pyramid_level_choice_and_chunked_reads(tmp_path, monkeypatch):
    image = write_pyramid(tmp_path / "pyramid.tiff")
    with open_slide(tmp_path / "pyramid.tiff") as slide:
        assert slide.info.vendor == "generic-tiff" and slide.info.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp() == pytest.approx(0.25)
        assert [slide.best_level(d) for d in (1, 1.9, 2, 3.5, 4, 16)] == [0, 0, 1, 1, 2, 2]
        # A 4x shrink reads level 2 directly: identical to the stored level-2 pixels.
        region = slide.read_region_scaled(128, 256, 256, 256, (64, 64))
        assert np.array_equal(np.asarray(region), image[::4, ::4][64:128, 32:96])
        # Force the chunked path: the assembled thumbnail matches the one-shot read closely.
        whole, _ = slide.thumbnail(256)
        monkeypatch.setattr("pallava.slides.reader.MAX_READ_PIXELS", 64 * 64)
        reads = []
        read_region = slide._slide.read_region
        monkeypatch.setattr(slide._slide, "read_region", lambda *a: reads.append(a) or read_region(*a))
        chunked, _ = slide.thumbnail(256)
        # Every OpenSlide read stayed within the limit, at level 2 (the 4x shrink), and together they tile it.
        assert reads and all(w * h <= 64 * 64 and level == 2 for _, level, (w, h) in reads)
    assert whole.size == chunked.size == (192, 256)
    difference = np.abs(np.asarray(whole, np.int16) - np.asarray(chunked, np.int16))
    assert difference.mean() < 2


def test_mpp_override_and_missing_mpp(tmp_path):
    write_pyramid(tmp_path / "unscaled.tiff", mpp=None)
    with open_slide(tmp_path / "unscaled.tiff") as slide:
        assert slide.info.mpp_x is None and slide.info.mpp_y is None
        with pytest.raises(
            SlideReadError, match=r"unscaled\.tiff: the slide does not record microns per pixel"
        ):
            slide.mpp()
        assert slide.mpp(0.5) == 0.5
        with pytest.raises(ValueError, match="positive"):
            slide.mpp(0)


def test_corrupt_and_non_slide_files_give_clear_errors(svs, tmp_path, capsys):
    data = bytearray(svs.read_bytes())
    with tifffile.TiffFile(svs) as tiff:
        page = tiff.pages[0]
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            data[offset + 2 : offset + count - 2] = b"\xab" * (count - 4)  # garble every JPEG tile
    garbled = tmp_path / "garbled.svs"
    garbled.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(svs.read_bytes()[:100_000])
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")

    with pytest.raises(SlideReadError, match=r"garbled\.svs: corrupt or unreadable aperio slide"):
        open_slide(garbled)
    with pytest.raises(SlideReadError, match=r"truncated\.svs: a TIFF that is truncated, corrupt"):
        open_slide(truncated)
    with pytest.raises(
        SlideReadError, match=r"notes\.svs: not a whole-slide image; OpenSlide reads Aperio SVS"
    ):
        open_slide(text)
    with pytest.raises(SlideReadError, match=r"coffee\.png: not a whole-slide image"):
        open_slide(SHARED / "samples" / "non-pathology" / "coffee.png")
    with pytest.raises(SlideReadError, match="no such slide file"):
        open_slide(tmp_path / "missing.svs")
    assert issubclass(SlideReadError, ValueError)

    assert main(["slide", "info", str(garbled)]) == 1
    assert "pallava slide: error:" in capsys.readouterr().err
