"""`POST /v1/slides/ask`: a question about a whole slide, answered by a slide-stage model, with its heat map.

Two ways in, both size-limited:
  * JSON `{"slide": "relative/path.svs", "question": "...", "max_tokens": 64}`: a slide inside the server's
    `--allow-local-dir` (the same rules as local images: relative, no `..`, no symbolic links), at most
    `max_slide_bytes`;
  * `POST /v1/slides/ask/upload?question=...` with the slide file as the raw body: refused above the
    server's body limit (`--max-body-mb`) and `max_slide_bytes`, written to a temporary file that is deleted
    after the answer.
The answer comes with the attention each tissue tile received, as a GeoJSON FeatureCollection (QuPath).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from pallava.inference import PaLlava
from pallava.serve.images import _local_path
from pallava.serve.protocol import APIError


class SlideQuestion(BaseModel):
    slide: str = Field(description="slide path relative to the server's allowed folder")
    question: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)


def add_slide_routes(app: FastAPI, assistant: PaLlava, settings) -> None:
    """Register the whole-slide routes on the API app."""
    max_slide = getattr(settings, "max_slide_bytes", 4 * 2**30)

    def answer(path: Path, question: str, max_tokens: int | None) -> dict:
        limit = min(max_tokens or settings.default_max_tokens, settings.max_tokens_limit)
        try:
            result = assistant.ask_slide(path, question, max_new_tokens=limit)
        except ValueError as error:  # not a slide, unreadable, no tissue (SlideReadError is a ValueError)
            raise APIError(
                400,
                f"slide: {error}".replace(str(path), Path(path).name),
                param="slide",
                code="invalid_slide",
            ) from None
        from pallava.slides.whole import attention_geojson

        return {
            "object": "slide.answer",
            "model": settings.model_name,
            "question": question,
            "answer": result.answers[0],
            "tissue_tiles": len(result.features),
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
            "attention": attention_geojson(result.features, result.attention),
        }

    @app.post("/v1/slides/ask")
    async def ask_slide(request: SlideQuestion) -> dict:
        if not request.question.strip():
            raise APIError(400, "question: must not be empty", param="question", code="invalid_value")
        path = _local_path(request.slide, "slide", max_slide, settings.allow_local_dir)
        return await run_in_threadpool(answer, path, request.question, request.max_tokens)

    @app.post("/v1/slides/ask/upload")
    async def ask_uploaded_slide(
        request: Request,
        question: str = Query(min_length=1),
        max_tokens: int | None = Query(default=None, ge=1),
    ) -> dict:
        if not question.strip():
            raise APIError(400, "question: must not be empty", param="question", code="invalid_value")
        with tempfile.TemporaryDirectory(prefix="pallava-slide-") as folder:
            path = Path(folder) / "upload.slide"
            size = 0
            with path.open("wb") as handle:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_slide:
                        raise APIError(
                            413,
                            f"slide: the upload is over the limit of {max_slide:,} bytes",
                            param="slide",
                            code="slide_too_large",
                        )
                    handle.write(chunk)
            if size == 0:
                raise APIError(
                    400,
                    "slide: empty upload; send the slide file as the request body",
                    param="slide",
                    code="invalid_slide",
                )
            return await run_in_threadpool(answer, path, question, max_tokens)
