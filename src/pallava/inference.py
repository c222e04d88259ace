"""High-level use of a trained assistant: `PaLlava.from_pretrained(dir).ask(image, question)`."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from pallava.models.image_features import ImageFeatureCache
from pallava.models.modeling_pa_llava import PaLlavaForConditionalGeneration
from pallava.processing.image import check_max_pixels
from pallava.processing.loading import ImageSource, load_image
from pallava.processing.processor import (
    CROP_FEATURES,
    IGNORE_INDEX,
    MODEL_INPUT_NAMES,
    PaLlavaProcessor,
    Turn,
)
from pallava.processing.stain_norm import check_stain_normalize, resolve_stain_normalize


@dataclass(frozen=True)
class Completion:
    """One generated answer with its token counts and why generation stopped.

    `finish_reason` is `stop` (end of turn), `length` (`max_new_tokens` reached) or `time` (`max_time` ran
    out).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class PaLlava:
    """A model + processor pair with question answering helpers (greedy unless `temperature` > 0)."""

    def __init__(
        self,
        model: PaLlavaForConditionalGeneration,
        processor: PaLlavaProcessor,
        device: str | None = None,
        stain_normalize: str | None = None,
    ):
        self.model = model.eval()
        self.processor = processor
        # None keeps what the vision tower was trained with (recorded in its config, applied by the image
        # processor); "macenko" or "none" overrides it
        recorded = processor.image_processor.stain_normalize
        self.stain_normalize = resolve_stain_normalize(stain_normalize, recorded)
        self.directory: Path | None = None  # the folder it was loaded from, if any
        self._slide_model = None
        self._cache_options: dict = {}  # set by `speed_up_generation`
        self.image_memory: ImageFeatureCache | None = None  # set by `remember_images`
        if device is not None:
            self.model.to(device)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        stain_normalize: str | None = None,
    ) -> PaLlava:
        """Load a model folder; `stain_normalize` overrides the normalisation its tower records."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a pallava model directory (no config.json)")
        model = PaLlavaForConditionalGeneration.from_pretrained(
            directory, dtype=dtype, trust_remote_code=False
        )
        assistant = cls(model, PaLlavaProcessor.from_pretrained(directory), device, stain_normalize)
        assistant.directory = directory  # where `ask_slide` finds the slide stage's position embedding
        return assistant

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def stain_normalize(self) -> str | None:
        """The stain normalisation every image gets before the model reads it (None: off). It is the
        image processor's setting: setting it here changes the processor this assistant wraps."""
        return self.processor.image_processor.stain_normalize

    @stain_normalize.setter
    def stain_normalize(self, method: str | None) -> None:
        self.processor.image_processor.stain_normalize = check_stain_normalize(method)

    @property
    def max_pixels(self) -> int | None:
        """The largest image (width x height) this assistant reads: a larger one is refused before it is
        decoded (None: no limit). The image processor's setting, as `stain_normalize` is."""
        return self.processor.image_processor.max_pixels

    @max_pixels.setter
    def max_pixels(self, value: int | None) -> None:
        self.processor.image_processor.max_pixels = check_max_pixels(value)

    def remember_images(self, max_images: int = 1024) -> PaLlava:
        """Keep the vision features of the last `max_images` distinct images (by their tiled pixels), so that
        further questions about an image skip the vision tower; answers are unchanged. For asking many
        questions about the same images, as an evaluation does. Returns self."""
        self.image_memory = ImageFeatureCache(self.model, max_images)
        return self

    def speed_up_generation(self, compile: bool | None = None, backend: str = "inductor") -> PaLlava:
        """Generate with a static KV cache and, with `compile` (default: on a CUDA device), the language
        model's forward under `torch.compile`; answers are unchanged. Returns self.

        A small model on a GPU spends its first token and each decoding step launching kernels, not
        computing: a static cache gives every step the same shapes, so the compiled forward (mode
        `reduce-overhead`: CUDA graphs on a GPU) is captured once and replayed. The first calls compile
        (tens of seconds); the peers of `benchmarks/` share the language model, so they gain the same.
        """
        self._cache_options = {"cache_implementation": "static"}
        if compile is None:
            compile = self.device.type == "cuda"
        if compile:
            language_model = self.model.language_model
            mode = "reduce-overhead" if backend == "inductor" else None
            language_model.forward = torch.compile(language_model.forward, mode=mode, backend=backend)
        return self

    def tile_grid(self, image: ImageSource) -> tuple[int, int]:
        """(columns, rows) of the tile grid this image gets."""
        return self.processor.image_processor.select_grid(
            load_image(image, self.processor.image_processor.max_pixels).size
        )

    # --- inputs -------------------------------------------------------------------------------------
    def _inputs(
        self, conversations: Sequence[Sequence[Turn]], images: Sequence[Sequence[ImageSource]]
    ) -> dict:
        batch = self.processor(
            text=conversations, images=images, add_generation_prompt=True, padding_side="left"
        )
        if self.image_memory is not None and "pixel_values" in batch:
            pixel_values = batch.pop("pixel_values")
            batch[CROP_FEATURES] = self.image_memory.batch_features(pixel_values, batch["tile_mask"])
        return {k: v.to(self.device) for k, v in batch.items() if k in (*MODEL_INPUT_NAMES, CROP_FEATURES)}

    def _generation_options(
        self, max_new_tokens: int, temperature: float, top_p: float, max_time: float | None = None
    ) -> dict:
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
        if max_time is not None:
            options["max_time"] = max_time
        return {**options, **self._cache_options}

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
        completions = self.complete(conversations, images, max_new_tokens, temperature, top_p)
        return [completion.text for completion in completions]

    @torch.inference_mode()
    def complete(
        self,
        conversations: Sequence[Sequence[Turn]],
        images: Sequence[Sequence[ImageSource]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_time: float | None = None,
        streamer: BaseStreamer | None = None,
    ) -> list[Completion]:
        """Like `generate`, with token counts and finish reasons; stops after `max_time` seconds if given.

        A `streamer` (batch of one only) receives the new tokens as they are generated.
        """
        inputs = self._inputs(conversations, images)
        options = self._generation_options(max_new_tokens, temperature, top_p, max_time)
        output = self.model.generate(**inputs, **options, streamer=streamer)
        prompt_length = inputs["input_ids"].shape[1]
        stops = set(self.processor.stop_token_ids)
        completions = []
        for row, mask in zip(output.tolist(), inputs["attention_mask"], strict=True):
            new = row[prompt_length:]
            end = next((i + 1 for i, token in enumerate(new) if token in stops), None)
            if end is not None:
                used, reason = end, "stop"
            else:
                used, reason = len(new), "length" if len(new) >= max_new_tokens else "time"
            text = self.processor.decode(new)
            completions.append(Completion(text, int(mask.sum()), used, reason))
        return completions

    @torch.inference_mode()
    def answer_log_likelihoods(
        self, image: ImageSource | None, question: str, answers: Sequence[str]
    ) -> list[float]:
        """The model's log-probability of giving each of `answers` (exactly, then ending its turn) to one
        question about one image: rank classification, which can only ever pick one of the candidates.

        The image is tiled and goes through the vision tower once for all candidates.
        """
        if not answers:
            raise ValueError("answers: give at least one candidate answer")
        asked = self.processor.question(question, image is not None)
        conversations = [[*asked, {"role": "assistant", "content": answer}] for answer in answers]
        encoded = [self.processor.encode_conversation(conversation) for conversation in conversations]
        for answer, (ids, _) in zip(answers, encoded, strict=True):
            self.processor.check_length(ids, f"answer {answer[:40]!r} with its question")
        batch = self.processor.pad(encoded, "right")
        inputs = {key: batch[key].to(self.device) for key in ("input_ids", "attention_mask", "labels")}
        if image is not None:
            # the image is tiled and encoded once; every candidate reads the same features
            pixels = self.processor.image_processor([image])
            tile_mask = pixels["tile_mask"].to(self.device)
            if self.image_memory is not None:
                features = self.image_memory.batch_features(pixels["pixel_values"], pixels["tile_mask"])
            else:
                features = self.model.encode_crops(
                    pixels["pixel_values"].to(self.device), self.model.tiles_to_encode(tile_mask)
                )
            inputs.update(
                {
                    CROP_FEATURES: features.expand(len(answers), *features.shape[1:]),
                    "tile_mask": tile_mask.expand(len(answers), -1),
                }
            )
        targets = inputs.pop("labels")[:, 1:]  # the token each position predicts
        scored = targets != IGNORE_INDEX  # the answers' tokens and their end of turn
        logits = self.model(**inputs, use_cache=False).logits[:, :-1]
        # the softmax over the vocabulary only where an answer token is predicted, not over the prompt
        logprobs = torch.log_softmax(logits[scored].float(), dim=-1)
        picked = logprobs.gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
        rows = scored.nonzero()[:, 0]
        return torch.zeros(len(answers), device=picked.device).index_add_(0, rows, picked).tolist()

    def ask(self, image: ImageSource | None, question: str, **options) -> str:
        return self.ask_batch([image], [question], **options)[0]

    def ask_slide(
        self, slide: str | Path, question: str | Sequence[str], out: str | Path | None = None, **options
    ):
        """Answer about a whole slide (a model trained by `pallava train --stage slide`).

        Returns a `WholeSlideAnswer` (answers, attention share per tissue tile, the tiles); with `out`, also
        writes the heat map (attention.png, attention.geojson) and answers.json there. `options`:
        max_new_tokens, and mpp / tile_size / min_tissue / base_mpp to override the trained tiling.
        """
        # The work is done by the slides app (`pallava.slides.whole.ask_slide`), loaded on first use: this
        # layer sits below the apps and must not import them (docs/architecture.md).
        return importlib.import_module("pallava.slides.whole").ask_slide(
            self, slide, question, out, **options
        )

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
        self,
        conversation: Sequence[Turn],
        images: Sequence[ImageSource],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
    ) -> Iterator[str]:
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
