"""What a client can make the server hold: work after it left, memory for queued images, time before the
model runs, and connections it keeps open without finishing its request. Raw sockets on loopback only."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

import pallava.serve.app as app_module
import pallava.serve.engine as engine_module
from pallava.inference import PaLlava
from pallava.serve.app import BackgroundServer, ServerSettings, create_app

LONG = 900  # tokens: several seconds of generation for the tiny model on a CPU (it never stops early here)
QUESTION = "Describe the tissue in detail."


@pytest.fixture(scope="module")
def assistant(tiny) -> PaLlava:
    return PaLlava(*tiny)


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 160)).save(buffer, format="PNG")  # flat: a few KB
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(*images: str, stream: bool = False, max_tokens: int = LONG) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": QUESTION})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream}


def send(url: str, body: dict) -> socket.socket:
    """POST a chat request on a raw socket and leave it open, unread: a client that may give up at any
    time."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    data = json.dumps(body).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=30).json()


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 90) -> None:
    """Poll until `condition()` holds; the limit only bounds a broken run, it is not what is tested."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(assistant):
    # One request generated at a time: a second one waits in the queue (with room, it would join the
    # running batch at once).
    settings = ServerSettings(
        max_tokens_limit=LONG, default_max_tokens=LONG, batch_window_s=0, max_batch_size=1
    )
    with BackgroundServer(create_app(assistant, settings)) as running:
        yield running


# --- a client that gives up ---------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streaming"])
def test_a_client_that_disconnects_stops_its_generation(server, stream):
    before = health(server)
    client = send(server.url, chat(stream=stream))
    wait_until(lambda: health(server)["running"] == 1, "the generation to start")
    client.close()
    wait_until(lambda: health(server)["running"] == 0, "the generation to stop")
    after = health(server)
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["completed"] == before["completed"]  # stopped, not run to its 900 tokens


def test_a_queued_request_whose_client_left_is_dropped_from_the_queue(server):
    before = health(server)
    busy = send(server.url, chat(stream=True))  # holds the worker
    wait_until(lambda: health(server)["running"] == 1, "the first generation to start")
    waiting = send(server.url, chat())
    wait_until(lambda: health(server)["queued"] == 1, "the second request to queue")
    waiting.close()
    wait_until(lambda: health(server)["queued"] == 0, "the queue to drop the request")
    assert health(server)["running"] == 1  # dropped while the first one still runs
    busy.close()
    wait_until(lambda: health(server)["running"] == 0, "the first generation to stop")
    after = health(server)
    assert after["cancelled"] - before["cancelled"] == 2 and after["completed"] == before["completed"]


# --- memory -------------------------------------------------------------------------------------------
def test_a_queued_request_holds_model_ready_crops_not_its_decoded_image(server, assistant):
    url = png_data_url(2048, 1536)
    crops = assistant.processor.image_processor.tile(Image.new("RGB", (2048, 1536))).pixel_values.shape[0]
    busy = send(server.url, chat(stream=True))
    wait_until(lambda: health(server)["running"] == 1, "the first generation to start")
    waiting = send(server.url, chat(url))
    wait_until(lambda: health(server)["queued"] == 1, "the image request to queue")
    held = health(server)["image_pixels_held"]
    waiting.close()
    busy.close()
    wait_until(lambda: health(server)["running"] == health(server)["queued"] == 0, "the server to go idle")
    assert held == crops * 224 * 224 < 2048 * 1536 / 6  # the queue holds the crops, not the 3.1 Mpx image
    assert health(server)["image_pixels_held"] == 0  # given back with the request


def test_queued_image_pixels_have_a_budget(assistant):
    crops = assistant.processor.image_processor.tile(Image.new("RGB", (224, 224))).pixel_values.shape[0]
    one_image = crops * 224 * 224
    settings = ServerSettings(
        max_tokens_limit=LONG, batch_window_s=0, max_queued_pixels=one_image + 1, max_batch_size=1
    )
    with BackgroundServer(create_app(assistant, settings)) as running:
        busy = send(running.url, chat(stream=True))
        wait_until(lambda: health(running)["running"] == 1, "the first generation to start")
        waiting = send(running.url, chat(png_data_url(224, 224)))
        wait_until(lambda: health(running)["queued"] == 1, "the image request to queue")
        refused = httpx.post(
            f"{running.url}/v1/chat/completions", json=chat(png_data_url(224, 224)), timeout=60
        )
        text_only = send(running.url, chat())  # holds no pixels: still queued
        wait_until(lambda: health(running)["queued"] == 2, "the text request to queue")
        for sock in (waiting, text_only, busy):
            sock.close()
        wait_until(
            lambda: health(running)["running"] == health(running)["queued"] == 0, "the server to go idle"
        )
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "overloaded" and "pixels" in refused.json()["error"]["message"]


def test_the_worker_gives_memory_back_when_a_burst_is_over(server, monkeypatch):
    engine = server.server.config.app.state.engine
    trims = []
    monkeypatch.setattr(engine_module, "release_memory", lambda: trims.append(engine.stats["queued"]))
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat(max_tokens=2), timeout=60)
    assert reply.status_code == 200
    wait_until(lambda: trims, "the worker to hand memory back after the burst")
    assert trims == [0]  # once, with nothing left in the queue


# --- time before the model runs -----------------------------------------------------------------------
def test_checks_and_image_decoding_count_against_the_timeout(assistant, monkeypatch):
    load = app_module.load_request_image

    def slow_load(*args, **kwargs):
        time.sleep(0.6)  # past the 0.5 s limit: a huge image, or a starved CPU
        return load(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_request_image", slow_load)
    settings = ServerSettings(timeout_s=0.5, max_tokens_limit=8, default_max_tokens=8, batch_window_s=0)
    with BackgroundServer(create_app(assistant, settings)) as running:
        reply = httpx.post(
            f"{running.url}/v1/chat/completions", json=chat(png_data_url(64, 64), max_tokens=8), timeout=60
        )
        stats = health(running)
    assert reply.status_code == 504, reply.text
    assert reply.json()["error"]["code"] == "timeout" and "0.5 s" in reply.json()["error"]["message"]
    assert stats["batches"] == stats["completed"] == 0  # the model never ran for it


# --- slow clients -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_server(assistant):
    settings = ServerSettings(header_timeout_s=1, body_timeout_s=1, keep_alive_s=1, batch_window_s=0)
    with BackgroundServer(create_app(assistant, settings)) as running:
        yield running


def connect(server) -> socket.socket:
    parts = urlsplit(server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)  # bounds a broken run only


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a hang fails at the socket timeout)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app"],
    ids=["nothing", "half the headers"],
)
def test_a_connection_whose_headers_do_not_arrive_is_closed(strict_server, sent):
    with connect(strict_server) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""  # closed without a word
    assert health(strict_server)["status"] == "ok"


def test_a_body_that_does_not_arrive_gets_a_408_and_the_connection_is_closed(strict_server):
    with connect(strict_server) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"messages": ['
        )
        response = read_until_closed(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), response
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_a_kept_alive_connection_must_finish_its_next_headers_too(strict_server):
    with connect(strict_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"}" not in first:  # the whole JSON answer
            first += sock.recv(65536)
        sock.sendall(b"GET /heal")  # the next request starts, and stalls
        assert first.startswith(b"HTTP/1.1 200") and read_until_closed(sock) == b""


def test_a_lone_request_does_not_wait_out_the_batch_window_but_one_being_admitted_is_waited_for(assistant):
    engine = engine_module.BatchingEngine(assistant, max_batch_size=8, window_s=20.0)
    image = assistant.processor.image_processor.tile(Image.new("RGB", (224, 224)))
    answered = {}

    def job(name: str) -> engine_module.Job:
        conversation = assistant.processor.question("What is shown?", True)
        options = engine_module.GenerationOptions(4)
        return engine_module.Job(
            conversation, [image], options, 60.0, lambda _, n=name: answered.update({n: 1})
        )

    engine.start()
    try:
        started = time.monotonic()
        engine.submit(job("alone"))
        wait_until(lambda: "alone" in answered, "the lone request's answer")
        assert time.monotonic() - started < 10.0  # answered well inside the 20 s window
        assert engine.stats["largest_batch"] == 1
        engine.expect()  # a second request is still being admitted: the first waits for it
        engine.submit(job("first"))
        time.sleep(0.3)
        assert "first" not in answered
        engine.unexpect()
        engine.submit(job("second"))
        wait_until(lambda: {"first", "second"} <= set(answered), "both answers")
        assert engine.stats["largest_batch"] == 2 and engine.stats["batches"] == 2
    finally:
        engine.close()
