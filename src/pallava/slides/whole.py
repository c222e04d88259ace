"""Questions about a whole slide, with the connector's cross-attention drawn over the slide.

`ask_whole_slide` reads (or loads from the cache) the slide's features, runs the slide model once, answers
each question from the same P image tokens, and writes into `out`:
  attention.png       the thumbnail with each tissue tile's share of the cross-attention (0 = least, 1 = most)
  attention.geojson   one QuPath tile object per tissue tile, measurements `attention`, `attention share`
  answers.json        slide, questions, answers, tile count, timings
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pallava.slides.features import (
    SlideFeatureCache,
    SlideFeatures,
    default_slide_cache_root,
    encoder_namespace,
    slide_features,
)
from pallava.slides.heatmap import _caption, heatmap_overlay
from pallava.slides.mapping import TilingOptions
from pallava.slides.model import SlideAssistant
from pallava.slides.reader import Slide

# Uploads and server requests: slides larger than this are refused before being read.
DEFAULT_MAX_SLIDE_BYTES = 4 * 1024**3


@dataclass
class WholeSlideAnswer:
    questions: list[str]
    answers: list[str]
    attention: np.ndarray  # (N,) share of the cross-attention per tissue tile, sums to 1
    features: SlideFeatures
    seconds: dict[str, float]
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "questions": self.questions,
            "answers": self.answers,
            "tissue_tiles": len(self.features),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "files": {k: str(v) for k, v in self.files.items()},
        }


def default_slide_cache(slide_model: SlideAssistant) -> SlideFeatureCache:
    root = default_slide_cache_root()
    return SlideFeatureCache(
        root, encoder_namespace(slide_model.model, slide_model.assistant.processor, {"dtype": "float16"})
    )


def tiling_of(slide_model: SlideAssistant, overrides: dict | None = None) -> TilingOptions:
    """The tiling the slide model was trained with (its slide_config.json), with `overrides` on top."""
    settings = dict(getattr(slide_model, "tiling", None) or {})
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TilingOptions(**settings)


def attention_geojson(features: SlideFeatures, attention: np.ndarray) -> dict:
    """Tissue tiles as QuPath tile objects with the attention they received."""
    scaled = attention / attention.max() if attention.max() > 0 else attention
    collection = []
    for tile, share, value in zip(features.grid.tiles, attention, scaled, strict=True):
        x0, y0, x1, y1 = tile.x, tile.y, tile.x + tile.w, tile.y + tile.h
        collection.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"tile:{x0},{y0},{tile.w},{tile.h}")),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": {
                    "objectType": "tile",
                    "name": f"tile r{tile.row} c{tile.col}",
                    "measurements": {
                        "attention": round(float(value), 6),
                        "attention share": round(float(share), 8),
                        "tissue fraction": float(tile.tissue),
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "features": collection}


def write_attention(
    slide: Slide, features: SlideFeatures, attention: np.ndarray, out: Path, title: str
) -> dict:
    """attention.png (thumbnail overlay) and attention.geojson in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    thumbnail, downsample = slide.thumbnail(2048)
    scaled = attention / attention.max() if attention.max() > 0 else attention
    overlay = heatmap_overlay(thumbnail, downsample, features.grid, scaled, colormap="inferno")
    png = out / "attention.png"
    _caption(
        overlay,
        title,
        "cross-attention per tissue tile, scaled to the most attended tile",
        colormap="inferno",
    ).save(png, compress_level=3)
    geojson = out / "attention.geojson"
    geojson.write_text(json.dumps(attention_geojson(features, attention), separators=(",", ":")))
    return {"heatmap": png, "geojson": geojson}


def check_slide_size(path: str | Path, max_bytes: int = DEFAULT_MAX_SLIDE_BYTES) -> None:
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(
            f"{path}: {size / 1024**2:.0f} MiB is over the limit of {max_bytes / 1024**2:.0f} MiB"
        )


def ask_whole_slide(
    slide_model: SlideAssistant,
    slide: Slide,
    questions: Sequence[str],
    out: str | Path | None = None,
    cache: SlideFeatureCache | None = None,
    options: TilingOptions | None = None,
    max_new_tokens: int = 64,
) -> WholeSlideAnswer:
    """Answer `questions` about the whole slide (one connector pass); with `out`, write the heat map files."""
    questions = [q for q in questions if q.strip()]
    if not questions:
        raise ValueError("the question must not be empty")
    started = time.perf_counter()
    features = slide_features(
        slide,
        slide_model.model,
        slide_model.assistant.processor,
        cache or default_slide_cache(slide_model),
        options or tiling_of(slide_model),
    )
    read = time.perf_counter()
    with torch.inference_mode():
        embeds, mass = slide_model.features_embeddings(features)
        answers = [slide_model.answer(embeds, question, max_new_tokens) for question in questions]
    done = time.perf_counter()
    attention = mass[0].float().cpu().numpy()
    result = WholeSlideAnswer(
        list(questions), answers, attention, features, {"features": read - started, "answer": done - read}
    )
    if out is not None:
        out = Path(out)
        result.files = write_attention(
            slide, features, attention, out, f"where the model looked: {questions[0]}"
        )
        result.files["answers"] = out / "answers.json"
        (out / "answers.json").write_text(
            json.dumps({"slide": str(slide.path), **result.to_dict()}, indent=2)
        )
    return result


def ask_slide(
    assistant, slide: str | Path, question: str | Sequence[str], out: str | Path | None = None, **options
):
    """`PaLlava.ask_slide`: the slide model is built once per assistant (its folder's position embedding)."""
    from pallava.slides.reader import open_slide

    if getattr(assistant, "_slide_model", None) is None:
        assistant._slide_model = SlideAssistant.from_assistant(assistant, assistant.directory)
    max_new_tokens = options.pop("max_new_tokens", 64)
    questions = [question] if isinstance(question, str) else list(question)
    with open_slide(slide) as opened:
        return ask_whole_slide(
            assistant._slide_model,
            opened,
            questions,
            out,
            options=tiling_of(assistant._slide_model, options),
            max_new_tokens=max_new_tokens,
        )
