"""A web page for the assistant (Gradio): upload or pick an image, ask, read the answer, and see where the
connector looked, as a heat map of its cross-attention over the image's tiles."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from PIL import Image

from pallava.inference import PaLlava
from pallava.processing.image import heat_on_image
from pallava.processing.loading import ImageSource, load_image

if TYPE_CHECKING:
    import gradio as gr

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
BROWSER_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what a browser can show as-is
DEFAULT_QUESTION = "What tissue is shown in this image?"


def heatmap_overlay(
    image: Image.Image,
    heat: np.ndarray,
    grid: tuple[int, int],
    tile_size: int,
    alpha: float = 0.5,
    colormap: str = "inferno",
) -> Image.Image:
    """Draw a heat map over the letterboxed tile canvas (values in [0, 1]) onto the original image; the
    geometry is `heat_on_image`'s."""
    image = image.convert("RGB")
    values = np.clip(heat_on_image(heat, grid, tile_size, image.size), 0.0, 1.0)
    colours = (matplotlib.colormaps[colormap](values)[..., :3] * 255).astype(np.float32)
    weight = alpha * values[..., None]  # cold regions keep the image, hot ones take the colour
    blended = np.asarray(image, dtype=np.float32) * (1 - weight) + colours * weight
    return Image.fromarray(blended.round().astype(np.uint8))


def example_images(directory: str | Path | None) -> list[Path]:
    """Image files under `directory` (recursively, sorted); none when it is missing."""
    if directory is None or not Path(directory).is_dir():
        return []
    return sorted(p for p in Path(directory).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def browser_ready(paths: Sequence[Path], folder: Path) -> list[Path]:
    """Examples a browser can display: TIFF/BMP files are converted to PNG copies in `folder`."""
    ready = []
    for index, path in enumerate(paths):
        if path.suffix.lower() in BROWSER_SUFFIXES:
            ready.append(path)
            continue
        copy = folder / f"{index:03d}-{path.stem}.png"
        load_image(path).save(copy)
        ready.append(copy)
    return ready


def answer_question(
    assistant: PaLlava, image: ImageSource | None, question: str, max_new_tokens: int, temperature: float
) -> tuple[str, Image.Image, str]:
    """The page's answer: (text, heat-map overlay, tile note). `image` is the uploaded file's path, so its
    header is checked against the pixel limit before it is decoded; any refusal is a `gr.Error` for the
    page."""
    import gradio as gr

    if image is None:
        raise gr.Error("Upload an image or pick an example first.")
    if not question or not question.strip():
        raise gr.Error("Type a question about the image.")
    try:
        picture = load_image(image, assistant.processor.image_processor.max_pixels)
        text = assistant.ask(
            picture, question.strip(), max_new_tokens=max_new_tokens, temperature=temperature
        )
        heat, grid = assistant.attention_heatmap(picture)
    except ValueError as error:
        raise gr.Error(str(error)) from error
    tile_size = assistant.processor.image_processor.tile_size
    note = f"{grid[0]}×{grid[1]} tiles of {tile_size} px."
    if not heat.any():
        note += " This model has no tile cross-attention, so the map is empty."
    return text, heatmap_overlay(picture, heat, grid, tile_size), note


def build_ui(assistant: PaLlava, examples: Sequence[Path] = (), max_tokens: int = 64) -> gr.Blocks:
    """The Gradio page: image + question in, answer + heat-map overlay out."""
    import gradio as gr

    def answer(image: str | None, question: str, max_new_tokens: float, temperature: float):
        return answer_question(assistant, image, question, int(max_new_tokens), float(temperature))

    with gr.Blocks(title="pallava", analytics_enabled=False) as demo:
        gr.Markdown("# pallava\nAsk the pathology assistant about an image.")
        with gr.Row():
            with gr.Column():
                # A file path, not a decoded image: Gradio would decode it before the size check otherwise.
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Image",
                    sources=["upload", "clipboard"],
                    elem_id="image",
                )
                question = gr.Textbox(label="Question", value=DEFAULT_QUESTION, elem_id="question")
                with gr.Accordion("Generation options", open=False):
                    tokens = gr.Slider(1, 512, value=max_tokens, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer_box = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                overlay = gr.Image(
                    type="pil", label="Where the connector looked", interactive=False, elem_id="heatmap"
                )
                note = gr.Markdown(elem_id="note")
        if examples:
            gr.Examples([[str(p), DEFAULT_QUESTION] for p in examples], inputs=[image, question])
        inputs = [image, question, tokens, temperature]
        ask.click(answer, inputs, [answer_box, overlay, note])
        question.submit(answer, inputs, [answer_box, overlay, note])
    return demo


def launch_ui(
    assistant: PaLlava,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples_dir: str | Path | None = None,
    max_file_size: str = "32mb",
    block: bool = True,
    max_tokens: int = 64,
) -> gr.Blocks:
    """Serve the page; with `block=False` return the running Blocks (for tests and notebooks)."""
    converted = Path(tempfile.mkdtemp(prefix="pallava-ui-"))  # browser-viewable copies of TIFF examples
    atexit.register(shutil.rmtree, converted, ignore_errors=True)
    examples = browser_ready(example_images(examples_dir), converted)
    demo = build_ui(assistant, examples, max_tokens)
    demo.queue(default_concurrency_limit=1)  # one generation at a time on the model
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=max_file_size,
        allowed_paths=[str(Path(examples_dir).resolve()), str(converted)] if examples else None,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return demo
