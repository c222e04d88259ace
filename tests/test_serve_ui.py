"""The web page: heat-map geometry, and an end-to-end run in a real headless chromium."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pallava.inference import PaLlava
from pallava.processing.image import letterbox, letterbox_box
from pallava.serve.ui import example_images, heatmap_overlay, launch_ui
from test_serve_safety import png_header_only

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.mark.parametrize("size", [(500, 300), (300, 500), (224, 224), (1000, 37)])
def test_letterbox_box_is_where_letterbox_puts_the_image(size):
    canvas = np.asarray(letterbox(Image.new("RGB", size, "white"), 448, 224, "black")).max(axis=2)
    rows, cols = np.nonzero(canvas > 127)
    assert letterbox_box(size, 448, 224) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_heatmap_lands_on_the_part_of_the_image_its_tile_saw():
    image = Image.new("RGB", (400, 200), (128, 128, 128))  # fills a 2x1 grid of 224 px tiles exactly
    heat = np.zeros((7, 14), dtype=np.float32)
    heat[:, :7] = 1.0  # all attention on the left tile
    overlay = np.asarray(heatmap_overlay(image, heat, (2, 1), 224), dtype=np.int16)
    assert overlay.shape == (200, 400, 3)
    changed = np.abs(overlay - 128).sum(axis=2) > 0
    assert changed[:, :180].all() and not changed[:, 230:].any()  # bilinear blur only near the seam
    untouched = heatmap_overlay(image, np.zeros_like(heat), (2, 1), 224)
    assert np.array_equal(np.asarray(untouched), np.asarray(image))


def test_model_heatmap_overlay_on_a_real_image(tiny, shared_data):
    assistant = PaLlava(*tiny)
    image = Image.open(shared_data / "samples" / "pathology" / "stardist_histo.jpg").convert("RGB")
    heat, grid = assistant.attention_heatmap(image)
    assert heat.min() == 0.0 and heat.max() == 1.0  # the tiny preset has tile cross-attention
    overlay = heatmap_overlay(image, heat, grid, assistant.processor.image_processor.tile_size)
    assert overlay.size == image.size and not np.array_equal(np.asarray(overlay), np.asarray(image))


def test_example_images_are_found_recursively(shared_data, tmp_path):
    found = example_images(shared_data / "samples" / "crc")
    assert len(found) == 9 and found == sorted(found)
    assert example_images(tmp_path / "missing") == [] and example_images(None) == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Gradio reads the header too
def test_the_page_checks_the_image_size_on_the_header_before_decoding(tiny, tmp_path):
    import gradio as gr
    from gradio.data_classes import ImageData

    from pallava.serve.ui import build_ui

    bomb = tmp_path / "huge.png"
    bomb.write_bytes(png_header_only(12_000, 12_000))  # claims 12000x12000 pixels, holds almost none
    assistant = PaLlava(*tiny)
    upload = next(b for b in build_ui(assistant).blocks.values() if getattr(b, "elem_id", None) == "image")
    received = upload.preprocess(ImageData(path=str(bomb), orig_name="huge.png"))
    assert received == str(bomb)  # Gradio hands over the file, undecoded
    from pallava.serve.ui import answer_question

    with pytest.raises(gr.Error, match=r"12000x12000 = 144,000,000 pixels, over the limit"):
        answer_question(assistant, received, "What is it?", 4, 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.slow
def test_web_page_answers_and_draws_a_heat_map_in_a_real_browser(tiny, shared_data):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (make browser installs it); the web page test needs it")
    from playwright.sync_api import sync_playwright

    upload = shared_data / "samples" / "pathology" / "stardist_histo.jpg"  # 500x300: a 3x2 tile grid
    demo = launch_ui(
        PaLlava(*tiny),
        port=free_port(),
        examples_dir=shared_data / "samples" / "crc",
        block=False,
        max_tokens=8,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(demo.local_url, wait_until="networkidle", timeout=60_000)
            page.set_input_files("#image input[type=file]", str(upload), timeout=60_000)
            page.wait_for_selector("#image img", timeout=60_000)
            page.fill("#question textarea", "Which tissue is shown here?")
            page.click("#ask")
            page.wait_for_function(
                "() => document.querySelector('#answer textarea')?.value.length > 0", timeout=120_000
            )
            page.wait_for_selector("#heatmap img", timeout=60_000)
            size = page.eval_on_selector("#heatmap img", "img => [img.naturalWidth, img.naturalHeight]")
            note = page.inner_text("#note")
            shown = page.evaluate(
                "() => [...document.querySelectorAll('img')].filter(i => i.naturalWidth > 0).length"
            )
            page.screenshot(path=str(ARTIFACTS / "serve_ui.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
    assert size == [500, 300]  # the heat map is drawn over the uploaded image, not the tile canvas
    assert "3×2 tiles" in note
    assert shown >= 2 + 9  # upload preview, heat map, and the nine TIFF examples converted for the browser
