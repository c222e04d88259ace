"""An OpenAI-compatible HTTP API for the assistant (FastAPI): chat completions, models, health.

`create_app(assistant, settings)` builds the app; `run_server` serves it with uvicorn. Every refusal is an
OpenAI-style error body `{"error": {"message", "type", "param", "code"}}` and never stops the server.
"""

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pallava import __version__
from pallava.inference import Completion, PaLlava
from pallava.processing.image import DEFAULT_MAX_PIXELS
from pallava.serve.engine import BatchingEngine, EngineUnavailable, GenerationOptions, GenerationTimeout, Job
from pallava.serve.images import load_request_image
from pallava.serve.protocol import APIError, ChatCompletionRequest, error_body, request_model, to_conversation

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# How long past its deadline a request waits for the worker (a prefill step cannot be interrupted).
RESULT_GRACE_S = 1.0
# Pydantic puts the tag of a tagged union (content part type, message role) into error locations.
_UNION_TAGS = {"text", "image_url", "system", "developer", "user", "assistant"}


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
    timeout_s: float = 120.0  # queue wait + generation, per request
    max_batch_size: int = 8
    batch_window_s: float = 0.02
    max_queue: int = 256

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
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"server setting {name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.batch_window_s < 0:
            raise ValueError("timeout_s must be > 0 and batch_window_s >= 0")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) is over max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        if self.allow_local_dir is not None:
            self.allow_local_dir = Path(self.allow_local_dir)
            if not self.allow_local_dir.is_dir():
                raise ValueError(f"--allow-local-dir {self.allow_local_dir} is not a directory")


class BodyTooLarge(StarletteHTTPException):
    """A 413 raised while a chunked body is read, answered by the app's HTTP error handler."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit:,} bytes")


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from its Content-Length, or while a chunked body is read."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            body = error_body(error.detail, "invalid_request_error", code="request_too_large")
            return await JSONResponse(body, status_code=413)(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)  # inside the route: answered by the HTTP error handler
            return message

        await self.app(scope, limited_receive, send)


def create_app(assistant: PaLlava, settings: ServerSettings | None = None) -> FastAPI:
    """The API app; its lifespan starts and stops the batching worker."""
    settings = settings or ServerSettings()
    engine = BatchingEngine(assistant, settings.max_batch_size, settings.batch_window_s, settings.max_queue)
    processor = assistant.processor
    context = min(processor.max_length, assistant.model.config.text_config.max_position_embeddings)
    reserved = [t.content for t in processor.tokenizer.added_tokens_decoder.values() if t.special]
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
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def require_api_key(request: Request, call_next):
        if settings.api_key and request.url.path not in PUBLIC_PATHS:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), settings.api_key.encode()
            ):
                body = error_body(
                    "missing or invalid API key; send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="invalid_api_key",
                )
                return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    _add_error_handlers(app)

    model_card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "pallava"}

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

    def prepare(request: ChatCompletionRequest, max_new_tokens: int) -> tuple[list, list, int]:
        """Off the event loop: the conversation, its decoded images and its prompt length, all checked."""
        conversation, refs = to_conversation(request.messages, reserved, settings.max_images)
        images = [
            load_request_image(
                url, param, settings.max_image_bytes, settings.max_image_pixels, settings.allow_local_dir
            )
            for param, url in refs
        ]
        prompt_tokens = len(processor.encode_conversation(conversation, add_generation_prompt=True)[0])
        if prompt_tokens + max_new_tokens > context:
            raise APIError(
                400,
                f"the prompt is {prompt_tokens} tokens and max_tokens is {max_new_tokens}: together over "
                f"the model's context of {context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        return conversation, images, prompt_tokens

    RequestModel = request_model(settings.max_tokens_limit)  # a class, built per server for its limit

    @app.post("/v1/chat/completions")
    async def chat_completions(request: RequestModel):
        max_new_tokens = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
        options = GenerationOptions(max_new_tokens, request.temperature or 0.0, request.top_p or 1.0)
        conversation, images, _ = await run_in_threadpool(prepare, request, max_new_tokens)
        work = (conversation, images, options, settings.timeout_s)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return _stream(engine, work, settings.model_name, include_usage)
        completion = await _complete(engine, work)
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
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    log.error("generation failed: %r", error)
    return APIError(500, "internal error during generation", type="server_error")


def _submit(engine: BatchingEngine, job: Job) -> None:
    try:
        engine.submit(job)
    except EngineUnavailable as error:
        raise _as_api_error(error) from error


async def _complete(engine: BatchingEngine, work: tuple) -> Completion:
    """Queue one request (conversation, images, options, timeout) and wait for its batch."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()
    job = Job(*work, on_done=lambda result: loop.call_soon_threadsafe(_resolve, future, result))
    _submit(engine, job)
    try:
        return await asyncio.wait_for(future, job.deadline - time.monotonic() + RESULT_GRACE_S)
    except TimeoutError:
        raise _as_api_error(job.timed_out()) from None
    except Exception as error:
        raise _as_api_error(error) from error
    finally:
        job.cancel()  # no-op once done; stops work for a client that left


def _resolve(future: asyncio.Future, result: Completion | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _stream(engine: BatchingEngine, work: tuple, model: str, include_usage: bool) -> StreamingResponse:
    """Server-sent events in the OpenAI chunk format; an error after the first byte is sent as an event."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(
        *work,
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
            job.cancel()

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
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        body = error_body(str(error.detail), kind, code=codes.get(error.status_code))
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=error)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def run_server(
    assistant: PaLlava,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve the API with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(assistant, settings), host=host, port=port, log_level=log_level)


class BackgroundServer:
    """Serve an ASGI app with uvicorn in a background thread: `with BackgroundServer(app) as server:
    server.url`.

    `port=0` picks a free port. Used by the tests, the load benchmark and notebooks.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        import uvicorn

        self.host, self.start_timeout_s = host, start_timeout_s
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.port = port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self._thread = threading.Thread(target=self.server.run, name="pallava-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
