"""HTTP plumbing of the API server: what a client may make it hold, and for how long.

* `RequestGuard` (ASGI middleware): the API key; the body's size (413 from `Content-Length` at once, or
  while a chunked body arrives) and its arrival time (408 and the connection closed when the whole body has
  not arrived within `body_timeout_s`).
* `header_timeout_protocol`: uvicorn's HTTP/1.1 protocol, closing a connection whose request headers have
  not all arrived `header_timeout_s` after its first byte (or after it opened). uvicorn itself only times
  out idle keep-alive connections.
* `ClientWatch`: notices a client that disconnects while its request waits, so its work can be dropped.
* `BackgroundServer`: uvicorn in a thread with these settings (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pallava.serve.protocol import error_body

CLOSE = {"Connection": "close"}  # the server closes the connection after this response


class BodyTooLarge(StarletteHTTPException):
    """A 413 raised while a chunked body is read, answered by the app's HTTP error handler."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit:,} bytes", headers=CLOSE)


class BodyTimeout(StarletteHTTPException):
    """A 408 raised when the body is still incomplete at its deadline; the connection is then closed."""

    def __init__(self, limit_s: float):
        super().__init__(408, f"the request body did not arrive within {limit_s:g} s", headers=CLOSE)


class RequestGuard:
    """Checks every HTTP request before the app sees it: the API key, then the body's size and arrival
    time."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        public_paths: Collection[str],
        max_body_bytes: int,
        body_timeout_s: float,
    ):
        self.app, self.api_key, self.public_paths = app, api_key, public_paths
        self.max_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key and scope["path"] not in self.public_paths and not self._authorised(headers):
            body = error_body(
                "missing or invalid API key; send 'Authorization: Bearer <key>'",
                "authentication_error",
                None,
                "invalid_api_key",
            )
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            body = error_body(error.detail, "invalid_request_error", None, "request_too_large")
            return await JSONResponse(body, status_code=413, headers=CLOSE)(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        received, complete = 0, False

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None  # inside the route: the HTTP error handler
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)

    def _authorised(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


def header_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class, closing connections whose request headers arrive too slowly."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[valid-type, misc]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection that never sends a byte is dropped as well

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if self._header_timer is None and (cycle is None or cycle.response_complete):
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not cycle:  # the headers are complete: a new request began
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A uvicorn config with the slow-client limits of the app's `ServerSettings` (`app.state.settings`)."""
    import uvicorn

    settings = getattr(getattr(app, "state", None), "settings", None)
    header_timeout_s = getattr(settings, "header_timeout_s", 10.0)
    keep_alive_s = getattr(settings, "keep_alive_s", 5.0)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_timeout_protocol(header_timeout_s),
        timeout_keep_alive=keep_alive_s,
    )


class ClientWatch:
    """Sets `gone` when the client disconnects. Read the next ASGI message only once the body has been read;
    `stop()` before handing `receive` to anything else (a streaming response listens for itself)."""

    def __init__(self, receive: Receive):
        self.gone = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._listen(receive))

    async def _listen(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    def stop(self) -> None:
        self._task.cancel()


class BackgroundServer:
    """Serve an ASGI app with uvicorn in a background thread: `with BackgroundServer(app) as server:
    server.url`.

    `port=0` picks a free port. Used by the tests, the load benchmark and notebooks.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        import uvicorn

        self.host, self.start_timeout_s = host, start_timeout_s
        self.server = uvicorn.Server(uvicorn_config(app, host, port, log_level="warning"))
        self.port = port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
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
