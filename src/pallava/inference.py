"""High-level use of a trained assistant: `PaLlava.from_pretrained(dir).ask(image, question)`."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import TextIteratorStreamer

from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.processing.image import ImageSource, load_image
from pallava.processing.processor import PaLlavaProcessor, Turn

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "tile_mask")


class PaLlava:
    """A model + processor pair with question answering helpers (greedy unless `temperature` > 0)."""

    def __init__(
        self, model: PaLlavaForConditionalGeneration, processor: PaLlavaProcessor, device: str | None = None
    ):
        self.model = model.eval()
        self.processor = processor
        if device is not None:
            self.model.to(device)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | None = None, dtype: torch.dtype | None = None
    ) -> PaLlava:
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a pallava model directory (no config.json)")
        model = PaLlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype)
        return cls(model, PaLlavaProcessor.from_pretrained(directory), device)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tile_grid(self, image: ImageSource) -> tuple[int, int]:
        """(columns, rows) of the tile grid this image gets."""
        return self.processor.image_processor.select_grid(
            load_image(image, self.processor.image_processor.max_pixels).size
        )

    # --- inputs -------------------------------------------------------------------------------------
    def _inputs(
        self, conversations: Sequence[Sequence[Turn]], images: Sequence[Sequence[ImageSource]]
    ) -> dict:
        batch = self.processor(conversations, images, add_generation_prompt=True, padding_side="left")
        return {k: v.to(self.device) for k, v in batch.items() if k in MODEL_INPUTS}

    def _generation_options(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        options = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.processor.stop_token_ids,
            "pad_token_id": self.processor.pad_id,
        }
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            options.update(do_sample=False)
        return options

    # --- answers ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        conversations: Sequence[Sequence[Turn]],
        images: Sequence[Sequence[ImageSource]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Answer a batch of conversations (each ending with a user turn)."""
        inputs = self._inputs(conversations, images)
        output = self.model.generate(**inputs, **self._generation_options(max_new_tokens, temperature, top_p))
        prompt_length = inputs["input_ids"].shape[1]
        return [self.processor.decode(row[prompt_length:]) for row in output]

    def ask(self, image: ImageSource | None, question: str, **options) -> str:
        return self.ask_batch([image], [question], **options)[0]

    def ask_batch(
        self, images: Sequence[ImageSource | None], questions: Sequence[str], batch_size: int = 8, **options
    ) -> list[str]:
        """Answer one question per image, `batch_size` at a time, in input order."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            chunk = range(start, min(start + batch_size, len(questions)))
            conversations = [self.processor.question(questions[i], images[i] is not None) for i in chunk]
            chunk_images = [[images[i]] if images[i] is not None else [] for i in chunk]
            answers += self.generate(conversations, chunk_images, **options)
        return answers

    def stream(
        self, conversation: Sequence[Turn], images: Sequence[ImageSource], max_new_tokens: int = 64,
        temperature: float = 0.0, top_p: float = 1.0,
    ) -> Iterator[str]:  # fmt: skip
        """Yield the answer's text piece by piece as it is generated."""
        inputs = self._inputs([conversation], [list(images)])
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = self._generation_options(max_new_tokens, temperature, top_p)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, **options, streamer=streamer)
            except BaseException as error:  # surfaced to the caller below
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    @torch.inference_mode()
    def attention_heatmap(self, image: ImageSource) -> tuple[np.ndarray, tuple[int, int]]:
        """Where the connector looked: cross-attention mass per tile patch, laid out over the tile grid.

        Returns (heat map of shape (rows*side, cols*side) normalised to [0, 1], grid). The map covers the
        letterboxed tile canvas; all zeros when the model has no tile cross-attention.
        """
        batch = self.processor.image_processor([image])
        grid = tuple(int(v) for v in batch["grids"][0])
        attention = self.model.cross_attention_map(
            batch["pixel_values"].to(self.device), batch["tile_mask"].to(self.device)
        )
        cols, rows = grid
        side = int(round(self.processor.num_image_tokens**0.5))
        if attention.shape[-1] == 0:
            return np.zeros((rows * side, cols * side), dtype=np.float32), grid
        tiles = attention[0, : cols * rows].reshape(rows, cols, side, side).float().cpu().numpy()
        heat = tiles.transpose(0, 2, 1, 3).reshape(rows * side, cols * side)
        heat = heat - heat.min()
        return (heat / heat.max() if heat.max() > 0 else heat).astype(np.float32), grid
