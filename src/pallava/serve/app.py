"""An OpenAI-compatible HTTP API for the assistant (FastAPI): chat completions, models, health.

`create_app(assistant, settings)` builds the app; `run_server` serves it with uvicorn. Every refusal is an
OpenAI-style error body `{"error": {"message", "type", "param", "code"}}` and never stops the server.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pallava import __version__
from pallava.inference import Completion, PaLlava
from pallava.models.image_features import pixel_key
from pallava.processing.image import TiledImage
from pallava.processing.loading import DEFAULT_MAX_PIXELS, ImageTooLargeError
from pallava.serve.engine import (
    BATCHING,
    BatchingEngine,
    EngineUnavailable,
    GenerationOptions,
    GenerationTimeout,
    Job,
    JobCancelled,
    time_limit_error,
)
from pallava.serve.images import load_request_image
from pallava.serve.protocol import APIError, ChatCompletionRequest, error_body, request_model, to_conversation
from pallava.serve.server import BackgroundServer, ClientWatch, RequestGuard, uvicorn_config

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "run_server"]

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# How long past its deadline a request waits for the worker (a prefill step cannot be interrupted).
RESULT_GRACE_S = 1.0
# Pydantic puts the tag of a tagged union (content part type, message role) into error locations.
_UNION_TAGS = {"text", "image_url", "system", "developer", "user", "assistant"}
HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
}


@dataclass
class ServerSettings:
    """Behaviour and limits of the API server; each limit is enforced on every request."""

    model_name: str = "pallava"
    api_key: str | None = None  # when set, every route but PUBLIC_PATHS needs `Authorization: Bearer <key>`
    allow_local_dir: Path | None = None  # image paths relative to this folder; None refuses local paths
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 4
    max_tokens_limit: int = 1024  # upper bound a client may ask for
    default_max_tokens: int = 256
    timeout_s: float = 120.0  # per request once read: checks, decoding, tokenising, queueing, generation
    max_batch_size: int = 16
    batch_window_s: float = 0.02
    batching: str = "continuous"  # requests join and leave the running batch; "static": one generate a batch
    generation_threads: str | None = "auto"  # "auto": DecodeThreads picks the token steps' CPU threads
    image_cache: int = 32  # images whose vision features are kept for later turns that resend them; 0: none
    max_queue: int = 256
    max_queued_pixels: int = 2**25  # image pixels (as model-ready crops) held by queued and running requests
    decode_workers: int = 2  # requests decoding their images at once (a decoded image is held only meanwhile)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this of its first byte
    body_timeout_s: float = 60.0  # and its whole body within this of its headers
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_slide_bytes: int = (
        4 * 2**30
    )  # whole-slide routes: a slide file (local or uploaded) above this is refused

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_images",
            "max_tokens_limit",
            "default_max_tokens",
            "max_batch_size",
            "max_queue",
            "max_queued_pixels",
            "decode_workers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"server setting {name} must be at least 1, got {getattr(self, name)}")
        for name in ("timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"server setting {name} must be > 0 seconds, got {getattr(self, name)}")
        if self.generation_threads not in ("auto", None):
            raise ValueError(
                f"server setting generation_threads must be 'auto' or None, got {self.generation_threads!r}"
            )
        if self.batching not in BATCHING:
            raise ValueError(
                f"server setting batching must be one of {', '.join(BATCHING)}, got {self.batching!r}"
            )
        if self.image_cache < 0:
            raise ValueError(f"server setting image_cache must be >= 0, got {self.image_cache}")
        if self.batch_window_s < 0:
            raise ValueError(f"server setting batch_window_s must be >= 0, got {self.batch_window_s}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is over max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        if self.allow_local_dir is not None:
            self.allow_local_dir = Path(self.allow_local_dir)
            if not self.allow_local_dir.is_dir():
                raise ValueError(f"--allow-local-dir {self.allow_local_dir} is not a directory")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(assistant: PaLlava, settings: ServerSettings | None = None) -> FastAPI:
    """The API app; its lifespan starts and stops the batching worker."""
    settings = settings or ServerSettings()
    engine = BatchingEngine(
        assistant,
        settings.max_batch_size,
        settings.batch_window_s,
        settings.max_queue,
        settings.max_queued_pixels,
        settings.generation_threads,
        settings.image_cache,
        settings.batching,
    )
    processor = assistant.processor
    context = min(processor.max_length, assistant.model.config.text_config.max_position_embeddings)
    reserved = [t.content for t in processor.tokenizer.added_tokens_decoder.values() if t.special]
    # No token spans more characters than the longest vocabulary entry (bytes, for byte-level BPE), so a
    # text longer than this cannot fit the context: it is refused before it is tokenised.
    max_prompt_chars = context * max(map(len, processor.tokenizer.get_vocab()))
    decoding = asyncio.Semaphore(settings.decode_workers)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(
        title="pallava",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible Chat Completions for the pathology assistant.",
    )
    app.state.engine, app.state.settings = engine, settings
    app.add_middleware(
        RequestGuard,
        api_key=settings.api_key,
        public_paths=PUBLIC_PATHS,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    _add_error_handlers(app)

    model_card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "pallava"}

    from pallava.serve.slides import add_slide_routes

    add_slide_routes(app, assistant, settings)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, **engine.stats}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(
                404,
                f"model {model_id!r} not found; this server serves {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card

    def prepare(
        request: ChatCompletionRequest, max_new_tokens: int, check: Callable[[], None]
    ) -> tuple[list, list[TiledImage]]:
        """Off the event loop: the conversation and its images cut into model-ready crops, all checked.

        Each decoded image is dropped once tiled, so a queued request holds crops, not full images.
        `check()` between steps stops the work once the request's time is up or its client left.
        """
        conversation, refs = to_conversation(
            request.messages, reserved, settings.max_images, max_prompt_chars
        )
        images = []
        for param, url in refs:
            check()
            image = load_request_image(
                url, param, settings.max_image_bytes, settings.max_image_pixels, settings.allow_local_dir
            )
            try:
                tiled = processor.image_processor.tile(image)
            except ValueError as error:
                code = "image_too_large" if isinstance(error, ImageTooLargeError) else "invalid_image"
                raise APIError(400, f"{param}: {error}", param=param, code=code) from error
            if settings.image_cache:
                tiled.key = pixel_key(image)  # a later turn that sends it again reuses its features
            images.append(tiled)
        check()
        prompt_tokens = len(processor.encode_conversation(conversation, add_generation_prompt=True)[0])
        if prompt_tokens + max_new_tokens > context:
            raise APIError(
                400,
                f"the prompt is {prompt_tokens} tokens and max_tokens is {max_new_tokens}: together over "
                f"the model's context of {context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        return conversation, images

    async def admit(
        request: ChatCompletionRequest, max_new_tokens: int, started: float, watch: ClientWatch
    ) -> tuple[list, list[TiledImage]]:
        """`prepare` with at most `decode_workers` requests at it at once, within the request's time."""
        deadline = started + settings.timeout_s

        def check() -> None:
            if watch.gone.is_set():
                raise ClientGone()
            if time.monotonic() >= deadline:
                raise time_limit_error(settings.timeout_s)

        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await decoding.acquire()
        except TimeoutError:
            raise _as_api_error(time_limit_error(settings.timeout_s)) from None
        try:
            return await run_in_threadpool(prepare, request, max_new_tokens, check)
        except (ClientGone, GenerationTimeout) as error:
            raise _as_api_error(error) from error
        finally:
            decoding.release()

    RequestModel = request_model(settings.max_tokens_limit)  # a class, built per server for its limit

    @app.post("/v1/chat/completions")
    async def chat_completions(body: RequestModel, request: Request):
        max_new_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        options = GenerationOptions(max_new_tokens, body.temperature or 0.0, body.top_p or 1.0)
        started = time.monotonic()  # the time limit covers everything from here
        watch = ClientWatch(request.receive)
        try:
            engine.expect()  # a batch forming meanwhile waits for this request (up to its window)
            try:
                conversation, images = await admit(body, max_new_tokens, started, watch)
            finally:
                engine.unexpect()  # no await until it is submitted below: the batch sees it queued
            work = {
                "conversation": conversation,
                "images": images,
                "options": options,
                "timeout_s": settings.timeout_s,
                "started": started,
            }
            if body.stream:
                watch.stop()  # the streaming response listens for the disconnect itself
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return _stream(engine, work, settings.model_name, include_usage)
            completion = await _complete(engine, work, watch)
        finally:
            watch.stop()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(completion),
        }

    return app


def _usage(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, GenerationTimeout):
        return APIError(504, str(error), code="timeout", type="timeout_error")
    if isinstance(error, EngineUnavailable):
        return APIError(503, str(error), code="overloaded", type="server_error")
    if isinstance(error, (ClientGone, JobCancelled)):  # nobody reads this answer; it names the case in logs
        return APIError(499, "the client closed the request", code="client_closed_request")
    if isinstance(error, ValueError):
        return APIError(400, str(error), code="invalid_request")
    log.error("generation failed: %r", error)
    return APIError(500, "internal error during generation", code="internal_error", type="server_error")


def _submit(engine: BatchingEngine, job: Job) -> None:
    try:
        engine.submit(job)
    except EngineUnavailable as error:
        raise _as_api_error(error) from error


async def _complete(engine: BatchingEngine, work: dict, watch: ClientWatch) -> Completion:
    """Queue one request (`Job` fields) and wait for its batch, or for its client to leave (then its work is
    dropped)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    job = Job(**work, on_done=lambda result: loop.call_soon_threadsafe(_resolve, future, result))
    _submit(engine, job)
    gone = loop.create_task(watch.gone.wait())
    try:
        timeout = job.deadline - time.monotonic() + RESULT_GRACE_S
        done, _ = await asyncio.wait({future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        raise ClientGone() if gone in done else job.timed_out()
    except Exception as error:
        raise _as_api_error(error) from error
    finally:
        gone.cancel()
        engine.cancel(job)  # no-op once answered; otherwise stops work for a client that left


def _resolve(future: asyncio.Future, result: Completion | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _stream(engine: BatchingEngine, work: dict, model: str, include_usage: bool) -> StreamingResponse:
    """Server-sent events in the OpenAI chunk format; an error after the first byte is sent as an event."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(
        **work,
        on_done=lambda result: loop.call_soon_threadsafe(queue.put_nowait, result),
        on_text=lambda text: loop.call_soon_threadsafe(queue.put_nowait, text),
    )
    _submit(engine, job)
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
        chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            yield event({"role": "assistant", "content": ""})
            while True:
                try:
                    item = await asyncio.wait_for(
                        queue.get(), job.deadline - time.monotonic() + RESULT_GRACE_S
                    )
                except TimeoutError:
                    item = job.timed_out()
                if isinstance(item, str):
                    yield event({"content": item})
                    continue
                if isinstance(item, BaseException):
                    yield f"data: {json.dumps(_as_api_error(item).body())}\n\n"
                    return
                yield event({}, item.finish_reason)
                if include_usage:
                    yield event(None, usage=_usage(item))
                yield "data: [DONE]\n\n"
                return
        finally:
            engine.cancel(job)  # no-op once answered; stops generation for a client that left

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """The most specific validation problem as (message, param), e.g. `messages[0].content[1].type: ...`."""
    errors = error.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        detail = next(e for e in errors if e["type"] == "json_invalid").get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    first = max(errors, key=lambda e: len(e["loc"]))
    param, previous = "", None
    for part in first["loc"][1:] if first["loc"][:1] == ("body",) else first["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif (
            "[" in str(part)
            or part in ("str", "int", "float", "bool", "none")
            or (isinstance(previous, int) and part in _UNION_TAGS)
        ):
            continue  # pydantic's names for union branches, not fields
        else:
            param += f".{part}" if param else str(part)
        previous = part
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = param or "body"
    return f"{where}: {first['msg']}{more}", param or None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = HTTP_CODES.get(error.status_code, f"http_{error.status_code}")
        body = error_body(str(error.detail), kind, None, code)
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=error)
        body = error_body("internal server error", "server_error", None, "internal_error")
        return JSONResponse(body, status_code=500)


def run_server(
    assistant: PaLlava,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve the API with uvicorn until interrupted, with the settings' slow-client limits."""
    import uvicorn

    uvicorn.Server(uvicorn_config(create_app(assistant, settings), host, port, log_level)).run()
